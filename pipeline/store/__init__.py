"""DuckDB store: schema and migrations (`schema`), the connection with atomic batch writes
(`connection`), and the queries grouped by who asks them: the loop (`runs`), training
(`training`), the evaluation (`evaluation`), re-judging (`judging`) and the user
(`inspect`). All SQL of the
library lives in this package.

Writes insert Arrow batches and skip rows whose primary key is already stored, so a
re-run of finished work inserts nothing. DuckDB admits one writer process; only the flow
process opens the store for writing.
"""

from pipeline.store.evaluation import EvaluationQueries, RoundLabels
from pipeline.store.inspect import InspectQueries
from pipeline.store.judging import JudgingQueries
from pipeline.store.runs import RunQueries
from pipeline.store.schema import MIGRATIONS, SCHEMA_VERSION
from pipeline.store.training import TrainingQueries

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "RoundLabels", "Store"]


class Store(RunQueries, TrainingQueries, EvaluationQueries, InspectQueries, JudgingQueries):
    """One DuckDB file with every query. Use as a context manager; `read_only=True` for
    inspection."""
