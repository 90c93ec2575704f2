"""Task: choose the draft vocabulary from loss-masked tokens (eagle_core.vocab)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.vocab import VocabConfig


@stage_task("scan_vocab", timeout_s=6 * 3600)
def scan_vocab(
    tokens: list[StageRef], cfg: VocabConfig, store_url: str, force: bool = False
) -> StageRef:
    """Count target tokens at loss-masked positions and keep the most frequent.

    Args:
        tokens: the tokenize artifacts of every dataset (the vocab covers their union).
        cfg: `eagle_core.vocab.VocabConfig`.
        store_url: artifact root.
        force: recompute even if the artifact exists.
    """
    from eagle_core.vocab import scan_vocab as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    ref = run(store, tokens, cfg, force=force)
    ui.report_outcome(log, store, ref, started)
    ui.counts_table(ref, description="draft vocabulary: size and coverage of masked tokens")
    coverage = ref.counts.get("coverage")
    if isinstance(coverage, (int, float)):
        ui.markdown(
            "scan_vocab",
            "coverage",
            f"**Draft vocab coverage:** {100 * coverage:.2f}% of loss-masked target "
            f"tokens fall in the {ref.counts.get('draft_vocab_size', '?')} draft ids.",
            description="share of training tokens the draft can predict",
        )
    return ref
