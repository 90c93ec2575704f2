"""Task: the target rewrites the answers / FIM middles of a records artifact (optional)."""

from __future__ import annotations

import time

from prefect import get_run_logger

from eagle_core.regenerate import RegenerateConfig, stats_rows
from eagle_core.regenerate import regenerate as run
from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task


@stage_task("regenerate", timeout_s=48 * 3600, task_run_name="regenerate-{records.key}")
def regenerate(
    records: StageRef, cfg: RegenerateConfig, store_url: str, force: bool = False
) -> StageRef:
    """Replace the answers with the target's own; resumes at the first unfinished shard.

    Args:
        records: the download artifact.
        cfg: backend (local / OpenAI-compatible server) and generation settings; the API
            key is read from the environment variable it names, never passed here.
        store_url: artifact root.
        force: recompute even if the artifact exists.
    """
    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    progress = ui.progress_callback("regenerate", f"regenerating {records.url}")
    ref = run(store, records, cfg, force=force, progress=progress)
    ui.report_outcome(log, store, ref, started)
    ui.table(
        "regenerate",
        "stats",
        stats_rows(ref.counts),
        description=f"regenerate of {records.url}: kept, rejected by reason, tokens/s",
    )
    return ref
