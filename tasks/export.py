"""Task: turn the final training checkpoint into a serving directory (eagle_core.export)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.export import ExportConfig


@stage_task("export", timeout_s=2 * 3600)
def export(train_ref: StageRef, cfg: ExportConfig, store_url: str, force: bool = False) -> StageRef:
    """Write `config.json` + `model.safetensors` in the layout serving engines load.

    Args:
        train_ref: the train artifact.
        cfg: `eagle_core.export.ExportConfig`.
        store_url: artifact root.
        force: recompute even if the artifact exists.
    """
    from eagle_core.export import export as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    ref = run(store, train_ref, cfg, force=force)
    ui.report_outcome(log, store, ref, started)
    ui.link(
        "export",
        ref.url,
        "exported draft",
        description="serving directory: config.json + model.safetensors",
    )
    return ref
