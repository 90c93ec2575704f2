"""Task: measure acceptance length with real speculative decoding (eagle_core.evaluate)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.evaluate import EvalConfig


@stage_task("evaluate", timeout_s=12 * 3600)
def evaluate(
    export_ref: StageRef,
    cfg: EvalConfig,
    store_url: str,
    force: bool = False,
    train: StageRef | None = None,
) -> StageRef:
    """Draft with the exported model, verify with the target; record tau and acceptance.

    Args:
        export_ref: the export artifact.
        cfg: `eagle_core.evaluate.EvalConfig`.
        store_url: artifact root.
        force: recompute even if the artifact exists.
        train: the training run the export was made from: the artifact then holds the
            consistency report (training accuracy vs measured acceptance), also shown in
            the UI as the `consistency-report` artifact.
    """
    from eagle_core.evaluate import evaluate as run

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    progress = ui.progress_callback("evaluate", f"speculative decoding with {export_ref.url}")
    ref = run(store, export_ref, cfg, force=force, progress=progress, train_ref=train)
    ui.report_outcome(log, store, ref, started)
    log.info("evaluate: acceptance length tau = %s", tau_of(ref))
    _tables(store, ref, export_ref)
    if train is not None:
        _consistency(log, store, ref, train)
    return ref


def _consistency(log: Any, store: ArtifactStore, ref: StageRef, train: StageRef) -> None:
    """Log τ predicted from training accuracy vs τ measured; the report as a UI artifact."""
    from eagle_core.consistency import CONSISTENCY_JSON, CONSISTENCY_MD

    doc = store.read_json(ref, CONSISTENCY_JSON)
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)  # noqa: E731
    for k in doc["kinds"]:
        log.info(
            "consistency [%s]: tau predicted from training accuracy %s, measured %s (gap %s)",
            k["kind"],
            fmt(k["tau_predicted"]),
            fmt(k["tau_measured"]),
            fmt(k["tau_gap"], "+.3f"),
        )
    ui.markdown(
        "consistency",
        "report",
        store.read_bytes(ref, CONSISTENCY_MD).decode(),
        description=f"training accuracy of {train.url} vs acceptance measured by {ref.url}",
    )


def tau_of(ref: StageRef) -> float | None:
    """The measured acceptance length (tokens per target forward) of an evaluate artifact."""
    for name in ("tau", "acceptance_length"):
        if isinstance(ref.counts.get(name), (int, float)):
            return float(ref.counts[name])
    return None


def _tables(store: ArtifactStore, ref: StageRef, export_ref: StageRef) -> None:
    """The evaluation table (tau, speedup, losslessness), per-position acceptance, the
    evaluator's own report and plot."""
    summary: list[dict[str, Any]] = [
        {"metric": k, "value": v}
        for k, v in sorted(ref.counts.items())
        if isinstance(v, (int, float, str, bool))
    ]
    meta = store.manifest(ref.stage, ref.key).meta
    for kind, tau in sorted((meta.get("tau") or {}).items()):
        summary.append({"metric": f"tau[{kind}]", "value": tau})
    ui.table(
        "evaluate",
        "summary",
        summary,
        description=f"speculative decoding of {export_ref.url}: tau = {tau_of(ref)}",
    )
    per_pos = meta.get("per_position_acceptance")
    if isinstance(per_pos, list):
        ui.table(
            "evaluate",
            "acceptance",
            [{"position": i + 1, "acceptance": a} for i, a in enumerate(per_pos)],
            description="share of rounds whose draft token at this position was accepted",
        )
    files = store.list_files(ref)
    text = store.read_bytes(ref, "report.md").decode() if "report.md" in files else ""
    if "acceptance.png" in files:
        text += "\n\n" + ui.png_markdown(store.read_bytes(ref, "acceptance.png"), "acceptance")
    if text:
        ui.markdown("evaluate", "report", text, description=f"tau = {tau_of(ref)}")
