"""A training step of the real loop (data + step + logging) vs the draft's own forward+backward.

Both sides train the same EAGLE-3 draft (same target, config, seed, batches, TTT settings —
`cfg.ttt()`, so both recompute each step's logits in backward: `checkpoint_head=True`) on the
demo target's hidden-state shards, INTERLEAVED step by step in one process:
- real: `eagle_core.launch.launch_training(..., launcher="inline")`, i.e. the pipeline's own
  loop: read + collate the batch from the Parquet shards, DeepSpeed engine forward / backward
  / step, grad-norm check, step statistics, tqdm, a metrics.jsonl record EVERY step
  (log_every=1, the most logging the loop does).
- bare: the same batches collated and moved to tensors BEFORE timing, then per step
  `compute_loss` + `backward` + grad clipping + `torch.optim.AdamW.step` — nothing else.

Interleaving: right after the real loop writes the metrics record of step s, the bare side
runs its step s (on the batch real step s used) inside that call; then the real loop goes on.
Real step s is the time from the end of bare step s-1 to the record of step s, so it holds
everything the loop does for one step and none of the bare side's work; machine load hits
both sides of a pair alike. The figure is the median of the paired ratios real[s] / bare[s]
(and the ratio of the medians, for reference); steps <= `--warmup` are dropped. Where the time
goes is recorded too: the real step split into data wait / engine forward / backward / step /
the rest, the bare one into forward / backward / optimizer.
Target: real <= 1.2x bare.

Run: .venv/bin/python -m benchmarks.bench_train_step --target <demo target artifact URL>
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

import eagle_core.train as train_mod
from benchmarks.bench_quality import (
    Budget,
    add_common_args,
    budget_from_args,
    prepare,
    resolve_target,
    setup_logging,
)
from benchmarks.measure import save
from eagle_core.launch import launch_training
from eagle_core.loss import compute_loss
from eagle_core.metrics import MetricsLogger
from eagle_core.train import TrainConfig, build_models, resolve_inputs, to_draft_batch
from eagle_core.train_data import BatchPrefetcher, ShardDataset, collate
from storage import ArtifactStore

# the real step's phases: what the loop calls, by label
REAL_PHASES = ("data", "forward", "backward", "optimizer")
BARE_PHASES = ("forward", "backward", "optimizer")


@contextlib.contextmanager
def timed_phases(sink: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in the real loop's data wait and DeepSpeed engine calls to `sink`."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    targets = [
        (BatchPrefetcher, "__next__", "data"),
        (DeepSpeedEngine, "forward", "forward"),
        (DeepSpeedEngine, "backward", "backward"),
        (DeepSpeedEngine, "step", "optimizer"),
    ]
    originals = []
    for owner, name, label in targets:
        fn = owner.__dict__[name]

        def wrapper(*a: Any, _fn: Callable = fn, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                sink[_label] += time.perf_counter() - t0

        functools.update_wrapper(wrapper, fn)
        originals.append((owner, name, fn))
        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


class BareSide:
    """The draft's own forward + backward + clip + AdamW on preloaded batches."""

    def __init__(self, setup: Any, cfg: TrainConfig, batches: list[Any]) -> None:
        torch.manual_seed(cfg.seed)
        self.draft = copy.deepcopy(setup.draft).train()
        self.head, self.batches, self.cfg, self.ttt = setup.head, batches, cfg, cfg.ttt()
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=0.0
        )

    def step(self, i: int) -> dict[str, float]:
        """Train on batch i; seconds per phase and in total."""
        t0 = time.perf_counter()
        out = compute_loss(self.draft, self.batches[i], self.head, self.ttt)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}


class _PairedLogger(MetricsLogger):
    """The loop's own metrics logger; after each train record, the bare side's step runs."""

    on_train_record: Callable[[int], None] | None = None

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        hook = _PairedLogger.on_train_record
        if record.get("kind") == "train" and hook is not None:
            hook(int(record["step"]))


def paired_run(cfg: TrainConfig, bare: BareSide) -> list[dict[str, Any]]:
    """One real training run with a bare step after each real one; per step s >= 2:
    {"step", "real": {phase: s, "total": s}, "bare": {phase: s, "total": s}}."""
    sink: dict[str, float] = defaultdict(float)
    rows: list[dict[str, Any]] = []
    mark: list[float] = []  # end of the previous bare step

    def hook(step: int) -> None:
        now = time.perf_counter()
        real = {p: sink[p] for p in REAL_PHASES}
        real["total"] = now - mark[0] if mark else float("nan")
        b = bare.step(step - 1)  # real step s trained on plan batch s-1
        if mark:
            rows.append({"step": step, "real": real, "bare": b})
        sink.clear()
        mark[:] = [time.perf_counter()]

    _PairedLogger.on_train_record = hook
    original = train_mod.MetricsLogger
    train_mod.MetricsLogger = _PairedLogger  # type: ignore[misc]
    try:
        with timed_phases(sink):
            launch_training(cfg, 1, launcher="inline", force=True)
    finally:
        train_mod.MetricsLogger = original  # type: ignore[misc]
        _PairedLogger.on_train_record = None
    return rows


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


def _median(rows: list[dict[str, Any]], side: str, phase: str) -> float:
    return statistics.median(r[side][phase] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--bench-steps", type=int, default=12, help="steps per timed run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps dropped")
    ap.add_argument("--repeats", type=int, default=1, help="real training runs (fresh each)")
    args = ap.parse_args()
    setup_logging()
    budget: Budget = budget_from_args(args)
    store = ArtifactStore(args.store)
    target = resolve_target(store, args.target)
    data = prepare(store, target, budget)
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
    setup, batches = preload(store, cfg)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        rows += [
            r for r in paired_run(cfg, BareSide(setup, cfg, batches)) if r["step"] > args.warmup
        ]
    load_after = os.getloadavg()
    ratios = [r["real"]["total"] / r["bare"]["total"] for r in rows]
    ratio = statistics.median(ratios)
    med_real, med_bare = _median(rows, "real", "total"), _median(rows, "bare", "total")
    real_phases = {p: _median(rows, "real", p) for p in REAL_PHASES}
    real_phases["rest"] = statistics.median(
        r["real"]["total"] - sum(r["real"][p] for p in REAL_PHASES) for r in rows
    )
    bare_phases = {p: _median(rows, "bare", p) for p in BARE_PHASES}
    tokens = sum(int(b.attention_mask.sum()) for b in batches) / len(batches)
    out_rows = [
        {"side": "bare forward+backward+AdamW (preloaded)", "median_step_s": med_bare},
        {"side": "real loop (data+DeepSpeed step+logging)", "median_step_s": med_real},
        {"side": "ratio (median of paired steps)", "median_step_s": ratio},
    ]
    save(
        "train_step",
        out_rows,
        command="python -m benchmarks.bench_train_step --target " + target,
        target_model=target,
        ratio=ratio,
        ratio_of_medians=med_real / med_bare,
        target="real step <= 1.2x bare",
        met=ratio <= 1.2,
        method="interleaved: bare step s runs right after real step s, same batch",
        real_phases_median_s=real_phases,
        bare_phases_median_s=bare_phases,
        per_step=[
            {"step": r["step"], "real_s": r["real"]["total"], "bare_s": r["bare"]["total"]}
            for r in rows
        ],
        load_avg_1_5_15_before=list(load_before),
        load_avg_1_5_15_after=list(load_after),
        steps_per_run=n,
        warmup_dropped=args.warmup,
        repeats=args.repeats,
        paired_steps=len(ratios),
        batch_size=budget.batch_size,
        mean_tokens_per_batch=tokens,
        checkpoint_head=cfg.ttt().checkpoint_head,
        train_config={k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data",)},
    )


if __name__ == "__main__":
    main()
