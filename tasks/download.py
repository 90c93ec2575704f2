"""Task: download one dataset into normalized `records` shards (eagle_core.download)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import RETRIES, RETRY_DELAYS, RETRY_JITTER, retry_transient

if TYPE_CHECKING:
    from eagle_core.download import DownloadConfig


def _run_name() -> str:
    """`download-<file name of the first source>` (the UI's task-run list)."""
    from prefect.runtime import task_run

    cfg = task_run.parameters["cfg"]
    return "download-" + cfg.sources[0].name.rstrip("/").rsplit("/", 1)[-1]


@task(
    name="download",
    task_run_name=lambda: _run_name(),
    cache_policy=NO_CACHE,  # the artifact store's manifest is the cache (STYLE.md §4)
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient,
    timeout_seconds=6 * 3600,
)
def download(cfg: DownloadConfig, store_url: str, force: bool = False) -> StageRef:
    """Read, validate and normalize one dataset; rejects are counted by reason.

    Args:
        cfg: `eagle_core.download.DownloadConfig`.
        store_url: artifact root.
        force: recompute even if the artifact exists.
    """
    from eagle_core.download import download as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    ref = run(store, cfg, force=force)
    ui.report_outcome(log, store, ref, started)
    names = ", ".join(src.name for src in cfg.sources)
    ui.counts_table(ref, description=f"download of {names}: rows kept and rejected by reason")
    return ref
