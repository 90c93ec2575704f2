"""Tiny real inputs for the training tests: a random Llama target, token and hidden artifacts.

The target is a seeded random LlamaForCausalLM (8 layers, H=32) saved with save_pretrained;
token shards follow the tokenize column contract and hidden shards are made by the real
extract_hidden stage, so training reads exactly what the pipeline writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tiny_llama import tiny_llama_config

from storage import ArtifactStore, StageRef
from storage.shards import build_table, write_parquet

if TYPE_CHECKING:
    from eagle_core.train import TrainConfig

# the DeepSpeed shm comm op is JIT-built once (~60 s) and cached here (the Makefile sets the same)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".venv", "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

VOCAB = 96


def make_tiny_target(out_dir: str, seed: int = 0) -> str:
    """A seeded random 8-layer Llama (H=32, 4 heads, 2 kv heads, V=96) saved to `out_dir`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.3,  # peaked target distributions: a draft can learn them quickly
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


def make_samples(n: int, seed: int = 0, min_len: int = 8, max_len: int = 24) -> list[dict]:
    """Learnable sequences: arithmetic progressions mod V with a loss mask on the second half."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(min_len, max_len + 1))
        start, step = int(rng.integers(0, VOCAB)), int(rng.integers(1, 4))
        ids = [(start + step * j) % VOCAB for j in range(t)]
        mask = [0] * (t // 2) + [1] * (t - t // 2)
        out.append({"sample_id": f"s{seed}-{i:04d}", "input_ids": ids, "loss_mask": mask})
    return out


def publish_tokens(
    store: ArtifactStore, samples: list[dict], name: str = "t", shard_rows: int = 16
) -> StageRef:
    """A tokenize artifact (columns sample_id, source, input_ids, loss_mask) of `samples`."""
    key = store.key("tokenize", {"test": name, "n": len(samples)})
    with store.publish("tokenize", key) as w:
        for s, start in enumerate(range(0, len(samples), shard_rows)):
            part = samples[start : start + shard_rows]
            table = build_table(
                {
                    "sample_id": [p["sample_id"] for p in part],
                    "source": ["test"] * len(part),
                    "input_ids": [p["input_ids"] for p in part],
                    "loss_mask": [p["loss_mask"] for p in part],
                }
            )
            write_parquet(w, f"shard-{s:05d}.parquet", table)
        w.counts.update(rows=len(samples))
    return store.ref("tokenize", key)


def publish_hidden(store: ArtifactStore, tokens: StageRef, target_dir: str) -> StageRef:
    """Hidden-state shards of `tokens` made by the real extract_hidden stage (bf16)."""
    from eagle_core.extract import ExtractConfig, extract_hidden

    return extract_hidden(
        store, tokens, ExtractConfig(target=target_dir, batch_size=4, shard_size=16)
    )


def publish_corrupt_hidden(store: ArtifactStore, hidden: StageRef, bad_id: str) -> StageRef:
    """A copy of a hidden artifact whose sample `bad_id` has NaN aux states (same meta)."""
    from eagle_core.extract import iter_hidden_samples

    rows = list(iter_hidden_samples(store, hidden))
    assert any(r["sample_id"] == bad_id for r in rows)
    for r in rows:
        if r["sample_id"] == bad_id:
            r["aux_hidden"] = r["aux_hidden"].clone()
            r["aux_hidden"][1] = float("nan")
    manifest = store.manifest(hidden.stage, hidden.key)
    key = store.key("extract_hidden", {"corrupt": bad_id, "of": hidden.key})
    with store.publish("extract_hidden", key) as w:
        table = build_table(
            {
                "sample_id": [r["sample_id"] for r in rows],
                "input_ids": [[int(x) for x in r["input_ids"]] for r in rows],
                "loss_mask": [[int(x) for x in r["loss_mask"]] for r in rows],
            },
            {
                "aux_hidden": [r["aux_hidden"] for r in rows],
                "last_hidden": [r["last_hidden"] for r in rows],
            },
        )
        write_parquet(w, "shard-00000.parquet", table)
        w.meta.update(manifest.meta)
        w.counts.update(samples=len(rows))
    return store.ref("extract_hidden", key)


def train_inputs(base: Path) -> dict[str, Any]:
    """A tiny target, 48 samples' token shards and their real extract_hidden shards under `base`.

    Returns:
        {"target": target dir, "store": the inputs' ArtifactStore, "tokens": tokenize ref,
        "hidden": extract_hidden ref}.
    """
    target = make_tiny_target(str(base / "target"))
    store = ArtifactStore(str(base / "inputs"))
    tokens = publish_tokens(store, make_samples(48, seed=7))
    hidden = publish_hidden(store, tokens, target)
    return {"target": target, "store": store, "tokens": tokens, "hidden": hidden}


def train_config(inputs: dict[str, Any], root: str, **kw: Any) -> TrainConfig:
    """A small offline TrainConfig over `inputs["hidden"]` (8 steps, batch 2, 3 TTT steps,
    20% held out); `kw` overrides any field."""
    from eagle_core.train import TrainConfig

    base: dict[str, Any] = dict(
        store=root,
        target=inputs["target"],
        data=(inputs["hidden"].url,),
        steps=8,
        batch_size=2,
        lr=1e-2,
        ttt_steps=3,
        heldout_fraction=0.2,
        log_every=1,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def plain_torch_loop(
    store: ArtifactStore, cfg: TrainConfig
) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """`cfg`'s run redone as a plain PyTorch loop on the same micro batches: per optimizer step
    the loss / grad_accum of each micro batch is backpropagated, `clip_grad_norm_` clips, AdamW
    and the run's schedule step. One process, fp32, offline data.

    Returns the mean micro-batch loss and the pre-clip gradient norm of every step, and the
    draft's final state dict.
    """
    from eagle_core import train as T
    from eagle_core.loss import compute_loss
    from eagle_core.train_data import ShardDataset, collate, micro_batch_index

    assert cfg.steps is not None, "give the run a step count"
    assert cfg.noise_scale() == 0, "the plain loop adds no feature noise (eagle1: feature_noise=0)"
    inputs = T.resolve_inputs(store, cfg)
    setup = T.build_models(store, cfg, inputs, torch.device("cpu"))
    ds = ShardDataset(None, inputs.data, hidden=True, split="train", seed=cfg.seed)
    plan = T._plan(ds, cfg, 0, 1)
    assert cfg.steps * cfg.grad_accum <= len(plan), "the plain loop replays epoch 0 only"
    draft = setup.draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(cfg, cfg.steps))
    losses, norms = [], []
    for s in range(cfg.steps):
        step_loss = 0.0
        for a in range(cfg.grad_accum):
            idx = plan[micro_batch_index(s, a, 0, 1, cfg.grad_accum)]
            mb = collate([ds[i] for i in idx], torch.float32)
            batch = T.to_draft_batch(mb, setup, cfg, torch.device("cpu"), torch.float32)
            loss = compute_loss(draft, batch, setup.head, cfg.ttt()).loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses, norms, draft.state_dict()
