"""retry_transient: only I/O failures are retried; our own errors fail at once.
stage_task: every stage task carries exactly those retry settings and no Prefect cache."""

from __future__ import annotations

import importlib

import pytest
from prefect.cache_policies import NO_CACHE

from eagle_core.errors import ConfigError, DataError
from storage.errors import ArtifactError, StoreError
from tasks.retry import RETRIES, RETRY_JITTER, is_transient, retry_transient, stage_task


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


# stage -> (task-run name template or None, timeout in hours); the names are what flows and the
# Prefect UI show, so a change here is a visible change
STAGES = {
    "build_demo_target": (None, 3),
    "download": ("<callable>", 6),
    "tokenize": ("tokenize-{records.key}", 12),
    "regenerate": ("regenerate-{records.key}", 48),
    "scan_vocab": (None, 6),
    "extract_hidden": ("extract_hidden-{tokens.key}", 48),
    "train": (None, 7 * 24),
    "export": (None, 2),
    "evaluate": (None, 12),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_tasks_share_the_retry_settings(stage):
    task = getattr(importlib.import_module(f"tasks.{stage}"), stage)
    run_name, hours = STAGES[stage]
    assert task.name == stage
    assert ("<callable>" if callable(task.task_run_name) else task.task_run_name) == run_name
    assert task.timeout_seconds == hours * 3600
    assert task.cache_policy is NO_CACHE
    assert task.retries == RETRIES == 3
    assert task.retry_delay_seconds == [10, 20, 40]
    assert task.retry_jitter_factor == RETRY_JITTER
    assert task.retry_condition_fn is retry_transient


def test_stage_task_without_run_name_or_timeout():
    @stage_task("probe", timeout_s=None)
    def probe(x: int) -> int:
        return x + 1

    assert probe.name == "probe" and probe.task_run_name is None
    assert probe.timeout_seconds is None and probe.retry_condition_fn is retry_transient
    assert probe.fn(1) == 2
