"""The errors the library raises for a problem the user must fix, in one module that imports nothing: every core
module (and the vision path, which needs neither sentence-transformers nor ``datasets`` for them) raises these, and
the commands (:mod:`simcse_flat.cli`) turn :data:`USER_ERRORS` into one ``error:`` line and exit code 2.

Each is still importable from the module that raises it (``simcse_flat.config.ConfigError``, ...).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the file or flag."""


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


class ModelLoadError(ValueError):
    """The model could not be loaded (wrong path, not cached offline, a module that cannot be used)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed from; the message names the file."""


class RunFolderError(ValueError):
    """An output folder that cannot be used as asked; the message names it and says what to do."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the message names the step and the checkpoint kept."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, CheckpointError, ModelLoadError, RunFolderError, TrainingDiverged,
)  # fmt: skip
