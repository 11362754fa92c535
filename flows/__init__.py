"""The application layer: Prefect flows and the `prefloop` CLI.

The only place that imports prefect.
"""
