"""Task: run the target over tokenized shards and store its hidden states (offline mode)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.extract import ExtractConfig


@stage_task("extract_hidden", timeout_s=48 * 3600, task_run_name="extract_hidden-{tokens.key}")
def extract_hidden(
    tokens: StageRef, cfg: ExtractConfig, store_url: str, force: bool = False
) -> StageRef:
    """Capture aux + last hidden states shard by shard; a rerun resumes at the first
    shard missing from the journal.

    Args:
        tokens: a tokenize artifact.
        cfg: `eagle_core.extract.ExtractConfig`.
        store_url: artifact root.
        force: recompute even if the artifact exists.
    """
    from eagle_core.extract import extract_hidden as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    progress = ui.progress_callback("extract_hidden", f"hidden states of {tokens.url}")
    ref = run(store, tokens, cfg, force=force, progress=progress)
    ui.report_outcome(log, store, ref, started)
    ui.counts_table(ref, description=f"extract_hidden of {tokens.url}: samples, tokens, shards")
    return ref
