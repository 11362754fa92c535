"""Per-round evaluation: did the round help, and can its labels be trusted?

`metrics` holds the pure metric functions (rows in, numbers out); `stages` the engine
stages that gather what they need (held-out answers, judge questions) as `Rows`.
"""
