"""Training metrics: a JSONL log (rank 0), PNG plots, optional TensorBoard / W&B mirrors.

One JSON object per line, always with `kind` ("train" | "eval") and `step`:

    {"kind": "train", "step": 10, "epoch": 0, "loss": 3.2, "lr": 5e-05, "step_acc": [...],
     "tokens_per_s": 812.0, "tokens": 20480, "samples": 80}
    {"kind": "eval", "step": 10, "loss": 3.4, "step_acc": [0.31, 0.22, ...], "tokens": 900}

`step_acc[k]` is the accuracy of TTT step k (the draft's argmax equals the target's argmax,
over the positions that step is trained on).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
ACCURACY_PNG = "accuracy.png"


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file; a torn last line (killed writer) is skipped."""
    out: list[dict[str, Any]] = []
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError:
                    log.warning("skipping a torn line in %s", path)
    except FileNotFoundError:
        pass
    return out


class MetricsLogger:
    """Appends records to `<run dir>/metrics.jsonl`; mirrors them to TensorBoard / W&B.

    On resume (`resume_step` given), records after that step — written by the killed run
    after its last complete checkpoint — are dropped, so the file reads as one clean run.

    Args:
        path: the JSONL file.
        resume_step: the step of the checkpoint the run resumed from, or None (fresh run:
            an existing file is truncated).
        tensorboard_dir: write TensorBoard scalars there (needs `tensorboard` installed).
        wandb_project: log to this W&B project (needs `wandb` installed and logged in).
    """

    def __init__(
        self,
        path: str,
        resume_step: int | None = None,
        tensorboard_dir: str | None = None,
        wandb_project: str | None = None,
        run_name: str | None = None,
    ) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        keep = []
        if resume_step is not None:
            keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step]
        with open(path, "w") as fh:
            for r in keep:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
        self._fh = open(path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        self._tb = None
        self._wandb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning(
                    "tensorboard is not installed: TensorBoard logging is off "
                    "(pip install tensorboard)"
                )
            else:
                self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("wandb is not installed: W&B logging is off (pip install wandb)")
            else:
                self._wandb = wandb.init(project=wandb_project, name=run_name, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once: a killed run keeps what it logged)."""
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        kind, step = record.get("kind", "train"), int(record.get("step", 0))
        scalars = {}
        for k, v in record.items():
            if k in ("kind", "step"):
                continue
            if isinstance(v, int | float):
                scalars[f"{kind}/{k}"] = float(v)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    if isinstance(x, int | float):
                        scalars[f"{kind}/{k}_{i}"] = float(x)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Write `loss.png` (train and eval loss by step) and `accuracy.png` (eval accuracy per
    TTT step, or train accuracy when there was no eval). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "loss" in r]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (sum over TTT steps, weighted)")
    ax.set_title("draft training loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    paths.append(os.path.join(out_dir, LOSS_PNG))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    acc_src, label = (evals, "held-out") if evals else (train, "train")
    fig, ax = plt.subplots(figsize=(7, 4))
    n_steps = max((len(r.get("step_acc", [])) for r in acc_src), default=0)
    for k in range(n_steps):
        pts = [(r["step"], r["step_acc"][k]) for r in acc_src if len(r.get("step_acc", [])) > k]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"TTT step {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{label} accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("per-step draft accuracy (top-1 = target argmax)")
    ax.grid(alpha=0.3)
    if n_steps:
        ax.legend(fontsize=7, ncol=2)
    paths.append(os.path.join(out_dir, ACCURACY_PNG))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
