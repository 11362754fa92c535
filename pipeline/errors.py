"""User-facing errors: one line that names the file, the field and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class PrefloopError(Exception):
    """An error caused by input the user can fix."""


class ConfigError(PrefloopError):
    pass


class TemplateError(PrefloopError):
    pass


class StoreError(PrefloopError):
    pass


class ModelError(PrefloopError):
    pass


class EngineError(PrefloopError):
    pass


class TransientEngineError(EngineError):
    """A fault that may pass on its own (a server's 5xx or 429, a timeout): the flows
    retry the batch; every other error fails at once."""
