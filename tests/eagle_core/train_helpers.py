"""Tiny real inputs for the training tests: a random Llama target, token and hidden artifacts.

The target is a seeded random LlamaForCausalLM (8 layers, H=32) saved with save_pretrained;
token shards follow the tokenize column contract and hidden shards are made by the real
extract_hidden stage, so training reads exactly what the pipeline writes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from storage import ArtifactStore, StageRef
from storage.shards import build_table, write_parquet

# the DeepSpeed shm comm op is JIT-built once (~60 s) and cached here (the Makefile sets the same)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".venv", "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

VOCAB = 96


def make_tiny_target(out_dir: str, seed: int = 0) -> str:
    """A seeded random 8-layer Llama (H=32, 4 heads, 2 kv heads, V=96) saved to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
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
