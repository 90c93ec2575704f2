"""Task: run the target over tokenized shards and store its hidden states (offline mode)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import RETRIES, RETRY_DELAYS, RETRY_JITTER, retry_transient

if TYPE_CHECKING:
    from eagle_core.extract import ExtractConfig


@task(
    name="extract_hidden",
    task_run_name="extract_hidden-{tokens.key}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient,
    timeout_seconds=48 * 3600,
)
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
