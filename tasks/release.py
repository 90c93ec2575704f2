"""Task: promote the new draft under a release name only when it beats the current one
(eagle_core.release); the comparison is a UI artifact, the decision a log line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.evaluate import EvalConfig
    from eagle_core.release import ReleaseConfig, ReleaseOutcome


@stage_task("release", timeout_s=12 * 3600)
def release(
    export_ref: StageRef,
    evaluate_ref: StageRef,
    eval_cfg: EvalConfig,
    cfg: ReleaseConfig,
    store_url: str,
    provenance: dict[str, list[StageRef]] | None = None,
) -> dict[str, Any]:
    """Measure the current release like the new draft, decide, record the decision.

    Args:
        export_ref / evaluate_ref: the new draft and its evaluation.
        eval_cfg: the evaluation settings of `evaluate_ref` (the current release is
            measured with the same ones, on the same target).
        cfg: `eagle_core.release.ReleaseConfig` (name, tolerance).
        store_url: artifact root (the release lives under `<root>/releases/<name>/`).
        provenance: the run's artifacts by stage, recorded in the history entry.

    Returns:
        `ReleaseOutcome.to_dict()`: promoted, action, reason, the export to serve...
    """
    from eagle_core.release import release as run

    log, store = get_run_logger(), ArtifactStore(store_url)
    progress = ui.progress_callback("release", f"speculative decoding of release {cfg.name}")
    out = run(
        store,
        cfg,
        export_ref,
        evaluate_ref,
        eval_cfg,
        provenance=provenance,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        progress=progress,
    )
    if out.decision.promoted or out.decision.action == "unchanged":
        log.info("release %s: %s -> %s", cfg.name, out.decision.reason, out.current_url)
    else:
        log.warning("release %s: %s (serving %s)", cfg.name, out.decision.reason, out.current_url)
    ui.markdown(
        "release",
        "decision",
        comparison_markdown(out),
        description=f"release {cfg.name}: {out.decision.reason}",
    )
    return out.to_dict()


def comparison_markdown(out: ReleaseOutcome) -> str:
    """Both drafts side by side: τ (all and per kind), per-position acceptance, the decision."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    new, cur = out.new, out.current
    lines = [
        f"## release `{out.name}`: {out.decision.action}",
        "",
        f"**{out.decision.reason}**",
        "",
        f"serving: `{out.current_url or '(none)'}` (pointer `{out.pointer_url}`)",
        "",
        "| | new draft | current release |",
        "|---|---|---|",
        f"| export | `{new.export_url}` | `{cur.export_url if cur else '-'}` |",
        f"| τ | {fmt(new.tau)} | {fmt(cur.tau) if cur else '-'} |",
    ]
    for kind in sorted(set(new.tau_per_kind) | set(cur.tau_per_kind if cur else {})):
        c = fmt((cur.tau_per_kind if cur else {}).get(kind)) if cur else "-"
        lines.append(f"| τ [{kind}] | {fmt(new.tau_per_kind.get(kind))} | {c} |")

    def lossless(m: Any) -> str:
        return "n/a (sampling)" if m.lossless is None else f"{m.prompts - m.mismatched}/{m.prompts}"

    lines.append(f"| lossless | {lossless(new)} | {lossless(cur) if cur else '-'} |")
    n_pos = max(len(new.per_position_acceptance), len(cur.per_position_acceptance) if cur else 0)
    for k in range(n_pos):
        a = new.per_position_acceptance[k] if k < len(new.per_position_acceptance) else None
        b = cur.per_position_acceptance[k] if cur and k < len(cur.per_position_acceptance) else None
        lines.append(f"| acceptance @{k + 1} | {fmt(a)} | {fmt(b) if cur else '-'} |")
    return "\n".join(lines) + "\n"
