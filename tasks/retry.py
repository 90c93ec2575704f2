"""Which task failures Prefect retries: transient I/O only.

A `PipelineError` (bad config, bad data, a model mismatch, a corrupt artifact) fails the same
way every time, so retrying only delays the message. Network and filesystem hiccups (an S3
503, a reset connection, a timeout) are retried with exponential backoff; a retried task
resumes from the store's journal, so finished shards are not redone.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from storage.errors import PipelineError

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=10)  # 10 s, 20 s, 40 s
RETRY_JITTER = 0.5  # spread retries of parallel tasks hitting the same flaky endpoint
# Exceptions from these libraries are network/object-store failures, whatever their class.
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "httpx", "s3fs")


def is_transient(exc: BaseException) -> bool:
    """True if `exc` is worth retrying: I/O, network or object-store trouble, not our errors."""
    if isinstance(exc, PipelineError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        # a missing file or a permission problem does not fix itself
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run only when its error is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failure being classified
        return is_transient(exc)
    return False
