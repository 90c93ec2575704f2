"""The project's error hierarchy root (standard library only: every layer may import it).

Every message says what went wrong, where (file, record, parameter) and how to fix it. URLs
in a message are redacted (userinfo, secret-looking query values: `storage.urls`), so an
error never echoes a credential someone put into a `--store` or data URL.
"""

from storage.urls import redact_text


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    def __init__(self, what: str, *, fix: str) -> None:
        what, fix = redact_text(str(what)), redact_text(str(fix))
        super().__init__(f"{what}. Fix: {fix}")
        self.what = what
        self.fix = fix


class ArtifactError(PipelineError):
    """A missing, partial or corrupt artifact."""


class StoreError(PipelineError):
    """The artifact root cannot be used: unknown protocol, permission denied, disk full."""
