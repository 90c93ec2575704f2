"""Task: import a GGUF target file as a HF model directory (`eagle_core.import_target`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.import_target import ImportTargetConfig


@stage_task("import_target", timeout_s=3 * 3600)
def import_target(cfg: ImportTargetConfig, store_url: str, force: bool = False) -> StageRef:
    """Dequantize the GGUF file `cfg.gguf` into `<root>/import_target/<key>/model/`.

    Args:
        cfg: `eagle_core.import_target.ImportTargetConfig`.
        store_url: artifact root.
        force: convert again even if the artifact exists.
    """
    from eagle_core.import_target import import_target as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    progress = ui.progress_callback("import_target", "dequantizing the GGUF target")
    ref = run(store, cfg, force=force, progress=progress)
    ui.report_outcome(log, store, ref, started)
    ui.counts_table(ref, description="imported GGUF target: parameters, vocab, file size")
    return ref
