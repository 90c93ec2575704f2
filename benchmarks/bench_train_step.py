"""A training step of the real loop (data + step + logging) vs the draft's own forward+backward.

Both sides train the same EAGLE-3 draft (same target, config, seed, batches) on the demo
target's hidden-state shards:
- real: `eagle_core.launch.launch_training(..., launcher="inline")`, i.e. the pipeline's own
  loop: read + collate the batch from the Parquet shards, DeepSpeed engine forward / backward
  / step, grad-norm check, step statistics, tqdm, a metrics.jsonl record EVERY step
  (log_every=1, the most logging the loop does). A step's time is the interval between two
  consecutive metrics records, so it includes everything the loop does per step.
- bare: the same batches collated and moved to tensors BEFORE timing, then per step
  `compute_loss` + `backward` + grad clipping + `torch.optim.AdamW.step` — nothing else.
Step i of both sides sees the same batch, so per-step times are paired; the figure is the
median of the paired ratios (and the ratio of the medians, for reference). The first
`--warmup` steps of both are dropped. Sides alternate `--repeats` times.
Target: real <= 1.2x bare.

Run: .venv/bin/python -m benchmarks.bench_train_step --target <demo target artifact URL>
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

import eagle_core.train as train_mod
from benchmarks.bench_quality import parser, start
from benchmarks.measure import save
from eagle_core.launch import launch_training
from eagle_core.loss import compute_loss
from eagle_core.metrics import MetricsLogger
from eagle_core.train import TrainConfig, build_models, resolve_inputs, to_draft_batch
from eagle_core.train_data import ShardDataset, collate
from storage import ArtifactStore


class _TimedLogger(MetricsLogger):
    """The loop's own metrics logger, noting when each train record was written."""

    stamps: list[float] = []

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        if record.get("kind") == "train":
            _TimedLogger.stamps.append(time.perf_counter())


def real_loop(cfg: TrainConfig) -> list[float]:
    """Per-step seconds of the pipeline's training loop (intervals between train records)."""
    _TimedLogger.stamps = []
    original = train_mod.MetricsLogger
    train_mod.MetricsLogger = _TimedLogger  # type: ignore[misc]
    try:
        launch_training(cfg, 1, launcher="inline", force=True)
    finally:
        train_mod.MetricsLogger = original  # type: ignore[misc]
    s = _TimedLogger.stamps
    return [b - a for a, b in zip(s, s[1:], strict=False)]  # interval i = step i+2


def preload(store: ArtifactStore, cfg: TrainConfig) -> tuple[Any, list[Any]]:
    """The draft setup and the loop's first `cfg.steps` batches, as tensors in memory."""
    inputs = resolve_inputs(store, cfg)
    device = torch.device("cpu")
    setup = build_models(store, cfg, inputs, device)
    data = ShardDataset(
        None, inputs.data, hidden=True, split="train", heldout_fraction=0.0, seed=cfg.seed
    )
    plan = train_mod._plan(data, cfg, 0, 1)[: cfg.steps]
    batches = [
        to_draft_batch(
            collate([data[i] for i in idx], torch.float32), setup, cfg, device, torch.float32
        )
        for idx in plan
    ]
    return setup, batches


def bare_loop(setup: Any, cfg: TrainConfig, batches: list[Any]) -> list[float]:
    """Per-step seconds of forward + backward + clip + AdamW step on preloaded batches."""
    torch.manual_seed(cfg.seed)
    draft = setup.draft
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=0.0)
    ttt = cfg.ttt()
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        out = compute_loss(draft, batch, setup.head, ttt)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--bench-steps", type=int, default=12, help="steps per timed run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps dropped")
    ap.add_argument("--repeats", type=int, default=1)
    run = start(ap.parse_args())
    store, data, budget, target, args = run.store, run.data, run.budget, run.target, run.args
    n = args.bench_steps
    cfg = TrainConfig(
        store=store.root,
        target=target,
        data=tuple(h.url for h in data.hidden),
        vocab_map=data.vocab.url,
        lr=budget.lr,
        steps=n,
        batch_size=budget.batch_size,
        heldout_fraction=0.0,  # no held-out evaluation: only steps are timed
        log_every=1,
        seed=0,
    )
    reals: list[list[float]] = []
    bares: list[list[float]] = []
    for _ in range(args.repeats):
        # real first: its intervals start at step 2, aligned below
        reals.append(real_loop(cfg))
        setup, batches = preload(store, cfg)
        bares.append(bare_loop(setup, cfg, batches))
    w = args.warmup
    ratios, real_all, bare_all = [], [], []
    for real, bare in zip(reals, bares, strict=True):
        # real[i] is the interval ending at step i+2, i.e. the time of step i+2 (index i+1)
        for i, r in enumerate(real):
            step = i + 1
            if step < w or step >= len(bare):
                continue
            ratios.append(r / bare[step])
            real_all.append(r)
            bare_all.append(bare[step])
    med_real, med_bare = statistics.median(real_all), statistics.median(bare_all)
    ratio = statistics.median(ratios)
    tokens = sum(int(b.attention_mask.sum()) for b in batches) / len(batches)
    rows = [
        {"side": "bare forward+backward+AdamW (preloaded)", "median_step_s": med_bare},
        {"side": "real loop (data+DeepSpeed step+logging)", "median_step_s": med_real},
        {"side": "ratio (median of paired steps)", "median_step_s": ratio},
    ]
    save(
        "train_step",
        rows,
        command="python -m benchmarks.bench_train_step --target " + target,
        target_model=target,
        ratio=ratio,
        ratio_of_medians=med_real / med_bare,
        target="real step <= 1.2x bare",
        met=ratio <= 1.2,
        steps_per_run=n,
        warmup_dropped=w,
        repeats=args.repeats,
        paired_steps=len(ratios),
        batch_size=budget.batch_size,
        mean_tokens_per_batch=tokens,
        train_config={k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data",)},
    )


if __name__ == "__main__":
    main()
