"""Task: turn the final training checkpoint into a serving directory (eagle_core.export)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import RETRIES, RETRY_DELAYS, RETRY_JITTER, retry_transient

if TYPE_CHECKING:
    from eagle_core.export import ExportConfig


@task(
    name="export",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient,
    timeout_seconds=2 * 3600,
)
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
