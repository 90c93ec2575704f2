"""scan_vocab vs a Python `collections.Counter` loop over the same tokenized shards.

Both sides read the same Parquet shards through the artifact store; the reference counts
masked ids one by one in a Counter and picks the top N with the same tie rule (lower id
first), as the reference trainers' vocab-mapping scripts do. Target: >= 100x faster,
identical d2t / t2d.

Run: .venv/bin/python -m benchmarks.bench_vocab [--tokens 6000000]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from benchmarks.measure import interleaved, save
from eagle_core.vocab import VOCAB_FILE, VocabConfig, VocabMap, scan_vocab
from storage import ArtifactStore
from storage.shards import build_table, iter_batches, write_parquet


def reference_scan(store: ArtifactStore, ref, n: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    counter: Counter[int] = Counter()
    for batch in iter_batches(store, ref, columns=["input_ids", "loss_mask"]):
        for ids, mask in zip(
            batch.column("input_ids").to_pylist(),
            batch.column("loss_mask").to_pylist(),
            strict=True,
        ):
            for tok, m in zip(ids, mask, strict=True):
                if m:
                    counter[tok] += 1
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    chosen = sorted(t for t, _ in ranked)
    unseen = (t for t in range(vocab) if t not in counter)
    while len(chosen) < n:
        chosen.append(next(unseen))
    chosen = np.array(sorted(chosen), dtype=np.int64)
    d2t = chosen - np.arange(n)
    t2d = np.zeros(vocab, dtype=bool)
    t2d[chosen] = True
    return d2t, t2d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10_000_000, help="tokens (about half masked)")
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--draft-vocab", type=int, default=32_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    length = 2048
    n_samples = args.tokens // length
    store = ArtifactStore(tempfile.mkdtemp(prefix="bench-vocab-"))
    key = store.key("tokenize", {"bench": "vocab", "tokens": args.tokens})
    with store.publish("tokenize", key) as w:
        for shard in range(0, n_samples, 512):
            rows = range(shard, min(shard + 512, n_samples))
            ids = (rng.zipf(1.2, size=(len(rows), length)) - 1) % args.vocab  # Zipf, like text
            mask = rng.random((len(rows), length)) < 0.5
            table = build_table(
                {
                    "sample_id": [f"s{i}" for i in rows],
                    "source": ["bench"] * len(rows),
                    "input_ids": pa.array(list(ids.astype(np.int32)), type=pa.list_(pa.int32())),
                    "loss_mask": pa.array(list(mask.astype(np.int8)), type=pa.list_(pa.int8())),
                }
            )
            write_parquet(w, f"shard-{shard // 512:05d}.parquet", table)
        w.meta.update(vocab_size=args.vocab, tokenizer_hash="bench")
    tokens = store.ref("tokenize", key)
    cfg = VocabConfig(draft_vocab_size=args.draft_vocab)

    def ours() -> None:
        scan_vocab(store, tokens, cfg, force=True)

    def reference() -> None:
        reference_scan(store, tokens, args.draft_vocab, args.vocab)

    t_ours, t_ref = interleaved(ours, reference, repeats=args.repeats)
    vref = scan_vocab(store, tokens, cfg)
    vm = VocabMap.load(store.local_copy(vref, VOCAB_FILE, tempfile.mkdtemp()))
    d2t, t2d = reference_scan(store, tokens, args.draft_vocab, args.vocab)
    same = torch.equal(vm.d2t, torch.from_numpy(d2t)) and torch.equal(vm.t2d, torch.from_numpy(t2d))
    masked = int(vref.counts["masked_tokens"])
    rows = [
        {
            "measure": "speedup vs Counter loop",
            "value": t_ref / t_ours,
            "target": ">= 100",
            "met": t_ref / t_ours >= 100,
            "detail": f"{t_ours:.3f}s vs {t_ref:.3f}s",
        },
        {
            "measure": "identical d2t/t2d",
            "value": float(same),
            "target": "1",
            "met": same,
            "detail": f"{masked:,} masked tokens, V={args.vocab}, Vd={args.draft_vocab}",
        },
    ]
    save("vocab_scan", rows, masked_tokens=masked)


if __name__ == "__main__":
    main()
