"""Task: tokenize records into `input_ids` + `loss_mask` shards (eagle_core.tokenize)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.tokenize import TokenizeConfig


@stage_task("tokenize", timeout_s=12 * 3600, task_run_name="tokenize-{records.key}")
def tokenize(
    records: StageRef, cfg: TokenizeConfig, store_url: str, force: bool = False
) -> StageRef:
    """Render chat / FIM records with the target's tokenizer and mark the loss tokens.

    Args:
        records: the download artifact.
        cfg: `eagle_core.tokenize.TokenizeConfig`.
        store_url: artifact root.
        force: recompute even if the artifact exists.
    """
    from eagle_core.tokenize import tokenize as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    ref = run(store, records, cfg, force=force)
    ui.report_outcome(log, store, ref, started)
    ui.counts_table(ref, description=f"tokenize of {records.url}: samples, tokens, truncated")
    return ref
