"""Task: download one dataset into normalized `records` shards (eagle_core.download)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.download import DownloadConfig


def _run_name() -> str:
    """`download-<file name of the first source>` (the UI's task-run list)."""
    from prefect.runtime import task_run

    cfg = task_run.parameters["cfg"]
    return "download-" + cfg.sources[0].name.rstrip("/").rsplit("/", 1)[-1]


@stage_task("download", timeout_s=6 * 3600, task_run_name=lambda: _run_name())
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
