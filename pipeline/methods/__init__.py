"""The three AI-feedback methods: functions of (engine, templates, rows, params) -> rows.

None of them opens the database or imports Prefect; each returns `Rows` (table name ->
row dicts) that the caller stores with `Store.write`, in one transaction per batch.
"""
