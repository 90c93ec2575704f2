"""The core's errors, under the root in storage/errors.py. Each says what, where, and the fix."""

from storage.errors import ArtifactError, PipelineError, StoreError


class ConfigError(PipelineError, ValueError):
    """An invalid parameter or combination of parameters."""


class DataError(PipelineError, ValueError):
    """An unusable record or file (past the reject threshold, or nothing usable left)."""


class ModelMismatchError(PipelineError):
    """Target, tokenizer, vocab map, hidden shards or draft disagree."""


class TrainingError(PipelineError):
    """Training stopped: NaN/inf loss, a crashed rank, an unusable checkpoint."""


__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "ModelMismatchError",
    "PipelineError",
    "StoreError",
    "TrainingError",
]
