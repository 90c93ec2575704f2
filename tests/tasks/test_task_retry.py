"""retry_transient: only I/O failures are retried; our own errors fail at once."""

from __future__ import annotations

import pytest

from eagle_core.errors import ConfigError, DataError
from storage.errors import ArtifactError, StoreError
from tasks.retry import is_transient


class _FakeBotocoreError(Exception):
    pass


_FakeBotocoreError.__module__ = "botocore.exceptions"


@pytest.mark.parametrize(
    "exc, transient",
    [
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError(5, "EIO"), True),
        (_FakeBotocoreError("503 SlowDown"), True),
        (FileNotFoundError("x"), False),
        (PermissionError("x"), False),
        (ConfigError("bad", fix="f"), False),
        (DataError("bad", fix="f"), False),
        (ArtifactError("corrupt", fix="f"), False),
        (StoreError("disk full", fix="f"), False),  # our wrapper already decided
        (ValueError("bug"), False),
        (KeyError("bug"), False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient
