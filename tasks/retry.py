"""Which task failures Prefect retries: transient I/O only.

A `PipelineError` (bad config, bad data, a model mismatch, a corrupt artifact) fails the same
way every time, so retrying only delays the message. Network and filesystem hiccups (an S3
503, a reset connection, a timeout) are retried with exponential backoff; a retried task
resumes from the store's journal, so finished shards are not redone.

`stage_task` is the one `@task` decorator every stage module uses, so these settings (and
"the artifact store's manifest is the cache", STYLE.md §4) are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from storage.errors import PipelineError

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=10)  # 10 s, 20 s, 40 s
RETRY_JITTER = 0.5  # spread retries of parallel tasks hitting the same flaky endpoint
# Exceptions from these libraries are network/object-store failures, whatever their class.
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "httpx", "s3fs")

P = ParamSpec("P")
R = TypeVar("R")


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


def stage_task(
    name: str,
    *,
    timeout_s: float | None,
    task_run_name: str | Callable[[], str] | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """The `@task` decorator of a pipeline stage: no Prefect cache, transient-only retries.

    Prefect's result cache stays off: the artifact store's manifest is the cache (STYLE.md
    §4), so a rerun returns the published `StageRef` without Prefect's help. Retries are
    `RETRIES` with `RETRY_DELAYS` backoff and `RETRY_JITTER`, only when `retry_transient`
    says the failure is I/O.

    Args:
        name: the task name flows and the UI show (the stage name).
        timeout_s: wall-clock limit of one attempt in seconds (None = no limit).
        task_run_name: a template over the task's parameters (`"tokenize-{records.key}"`) or a
            callable returning the run name; None keeps Prefect's default.

    Returns:
        The decorator; `@stage_task("tokenize", timeout_s=3600)` over the stage function.
    """
    return task(
        name=name,
        task_run_name=task_run_name,
        cache_policy=NO_CACHE,
        retries=RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_jitter_factor=RETRY_JITTER,
        retry_condition_fn=retry_transient,
        timeout_seconds=timeout_s,
    )
