"""Task: train the draft (DeepSpeed / torchrun / inline), resuming from the last checkpoint."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from storage import ArtifactStore, StageRef
from tasks import ui
from tasks.retry import stage_task

if TYPE_CHECKING:
    from eagle_core.train import TrainConfig

METRICS_FILE = "metrics.jsonl"


@stage_task("train", timeout_s=7 * 24 * 3600)
def train(
    cfg: TrainConfig,
    nproc: int,
    launcher: str,
    store_url: str,
    force: bool = False,
    hostfile: str = "",
) -> StageRef:
    """Launch `python -m eagle_core.train` on `nproc` processes and wait for its artifact.

    A retry (or a rerun of the flow) restarts training from its latest complete checkpoint.

    Args:
        cfg: `eagle_core.train.TrainConfig` (carries the data, vocab map and target refs).
        nproc: training processes on this node.
        launcher: "deepspeed", "torchrun" or "inline" (in the worker process).
        store_url: artifact root (the config's store must agree).
        force: retrain from scratch even if the final artifact exists.
        hostfile: DeepSpeed hostfile for several nodes ("" = this node only).
    """
    from eagle_core.launch import launch_training

    log, store, started = get_run_logger(), ArtifactStore(store_url), time.time()
    ref = launch_training(
        cfg, nproc=nproc, launcher=launcher, store=store, hostfile=hostfile or None, force=force
    )
    ui.report_outcome(log, store, ref, started)
    ui.counts_table(ref, description="training: steps, tokens, final loss")
    _curves(store, ref)
    return ref


def _curves(store: ArtifactStore, ref: StageRef) -> None:
    """Training-curve image (loss) and per-TTT-step accuracy table from metrics.jsonl."""
    if METRICS_FILE not in store.list_files(ref):
        return
    rows = [
        json.loads(line)
        for line in store.read_bytes(ref, METRICS_FILE).splitlines()
        if line.strip()
    ]
    train_rows = [r for r in rows if r.get("kind", "train") == "train" and "loss" in r]
    if not train_rows:
        return
    if "loss.png" in store.list_files(ref):  # the trainer's own plot
        png = store.read_bytes(ref, "loss.png")
    else:
        series = {"loss": ([r["step"] for r in train_rows], [float(r["loss"]) for r in train_rows])}
        png = ui.line_plot_png(series, title="draft training loss", xlabel="step")
    ui.markdown(
        "train",
        "curves",
        ui.png_markdown(png, "training loss") + "\n\n" + _accuracy_text(train_rows[-1]),
        description="training loss and accuracy",
    )
    acc = _step_accuracy(train_rows[-1])
    ui.table(
        "train",
        "step-accuracy",
        [{"ttt_step": k, "accuracy": a} for k, a in acc],
        description="per-TTT-step accuracy at the last logged step",
    )


def _step_accuracy(row: dict[str, Any]) -> list[tuple[int, float]]:
    acc = row.get("step_acc") or row.get("acc")
    if isinstance(acc, list):
        return [(k, float(a)) for k, a in enumerate(acc)]
    return sorted(
        (int(k.rsplit("_", 1)[1]), float(v))
        for k, v in row.items()
        if k.startswith("acc_") and k.rsplit("_", 1)[1].isdigit()
    )


def _accuracy_text(row: dict[str, Any]) -> str:
    acc = _step_accuracy(row)
    cells = " | ".join(f"{a:.3f}" for _, a in acc)
    head = " | ".join(f"k={k}" for k, _ in acc)
    if not acc:
        return ""
    rule = "|---" * len(acc) + "|"
    return f"Per-step accuracy at step {row.get('step')}:\n\n| {head} |\n{rule}\n| {cells} |"
