"""Task: build the offline demo target (tokenizer, tiny Llama, demo data files)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.demo import DemoTargetConfig


@stage_task("build_demo_target", timeout_s=3 * 3600)
def build_demo_target(cfg: DemoTargetConfig, store_url: str, force: bool = False) -> StageRef:
    """Train the demo tokenizer and target on the standard library and write demo data.

    Args:
        cfg: `eagle_core.demo.DemoTargetConfig`.
        store_url: artifact root.
        force: rebuild even if the artifact exists.
    """
    from eagle_core.demo import build_demo_target as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    progress = ui.progress_callback("build_demo_target", "training the demo target")
    ref = run(store, cfg, force=force, progress=progress)
    ui.report_outcome(log, store, ref, started)
    ui.counts_table(ref, description="demo target: size, held-out loss and accuracy")
    return ref
