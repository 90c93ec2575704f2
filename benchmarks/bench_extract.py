"""extract_hidden: time vs a bare target forward, bytes on disk per token, bit-exact read-back.

Compared side by side in one run:
- the whole stage (read token shards, capture 3 aux + last states, cast to bf16, write Parquet
  shards, publish) vs a bare `model(input_ids)` forward over the same batches (no capture, no
  writing). Target: <= 1.15x.
- Parquet bytes per token vs 8*H (bf16, 3 aux + last; target <= 8*H*1.02) and vs a per-sample
  `torch.save` of the same tensors.
- read-back through `iter_hidden_samples` equals the bf16 states computed directly, bit for bit.

Run: .venv/bin/python benchmarks/bench_extract.py [--hidden 256 --samples 64 --length 256]
"""

from __future__ import annotations

import argparse
import io
import tempfile

import numpy as np
import pyarrow as pa
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.measure import interleaved, save
from eagle_core.capture import capture_states, default_aux_layer_ids
from eagle_core.extract import ExtractConfig, extract_hidden, iter_hidden_samples
from storage import ArtifactStore
from storage.shards import build_table, write_parquet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    H, vocab = args.hidden, 4096
    work = tempfile.mkdtemp(prefix="bench-extract-")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=H,
        intermediate_size=H * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(H // 64, 1),
        num_key_value_heads=max(H // 128, 1),
        max_position_embeddings=args.length * 2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(f"{work}/target")

    store = ArtifactStore(f"{work}/store")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(args.samples, args.length), dtype=np.int32)
    key = store.key("tokenize", {"bench": "extract", "n": args.samples, "T": args.length})
    with store.publish("tokenize", key) as w:
        table = build_table(
            {
                "sample_id": [f"s{i}" for i in range(args.samples)],
                "source": ["bench"] * args.samples,
                "input_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
                "loss_mask": pa.array(
                    [np.ones(args.length, np.int8)] * args.samples, type=pa.list_(pa.int8())
                ),
            }
        )
        write_parquet(w, "shard-00000.parquet", table)
    tokens = store.ref("tokenize", key)
    ecfg = ExtractConfig(target=f"{work}/target", batch_size=args.batch, device="cpu")

    batches = [
        torch.from_numpy(ids[i : i + args.batch].astype(np.int64))
        for i in range(0, args.samples, args.batch)
    ]

    def bare() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)

    def stage() -> None:
        extract_hidden(store, tokens, ecfg, force=True)

    t_bare, t_stage = interleaved(bare, stage, repeats=args.repeats)
    ref = extract_hidden(store, tokens, ecfg)  # cached: the artifact of the last forced run
    parquet_bytes = sum(
        store.manifest(ref.stage, ref.key).files[n].size
        for n in store.list_files(ref, suffix=".parquet")
    )
    n_tokens = args.samples * args.length

    layer_ids = default_aux_layer_ids(args.layers)
    exact = True
    torch_save_bytes = 0
    got = iter(iter_hidden_samples(store, ref))
    by_id = {s["sample_id"]: s for s in got}
    for bi, b in enumerate(batches):
        st = capture_states(model, b, torch.ones_like(b), layer_ids)
        aux, last = st.aux.to(torch.bfloat16), st.last.to(torch.bfloat16)
        for row in range(b.shape[0]):
            s = by_id[f"s{bi * args.batch + row}"]
            exact &= torch.equal(s["aux_hidden"].view(torch.int16), aux[row].view(torch.int16))
            exact &= torch.equal(s["last_hidden"].view(torch.int16), last[row].view(torch.int16))
            buf = io.BytesIO()
            torch.save(
                {
                    "aux_hidden": aux[row].clone(),
                    "last_hidden": last[row].clone(),
                    "input_ids": b[row].clone(),
                },
                buf,
            )
            torch_save_bytes += buf.tell()

    ideal = 8 * H
    rows = [
        {
            "measure": "stage time / bare forward",
            "value": t_stage / t_bare,
            "target": "<= 1.15",
            "met": t_stage / t_bare <= 1.15,
            "detail": f"{t_stage:.3f}s vs {t_bare:.3f}s",
        },
        {
            "measure": "parquet bytes/token / 8H",
            "value": parquet_bytes / n_tokens / ideal,
            "target": "<= 1.02",
            "met": parquet_bytes / n_tokens / ideal <= 1.02,
            "detail": f"{parquet_bytes / n_tokens:.1f} B/token, 8H={ideal}",
        },
        {
            "measure": "torch.save bytes/token / 8H",
            "value": torch_save_bytes / n_tokens / ideal,
            "target": "(reference)",
            "met": "",
            "detail": "per-sample torch.save, same tensors",
        },
        {
            "measure": "bit-exact read-back",
            "value": float(exact),
            "target": "1",
            "met": exact,
            "detail": f"{args.samples} samples, bf16",
        },
    ]
    save("extract", rows, hidden=H, samples=args.samples, length=args.length, batch=args.batch)


if __name__ == "__main__":
    main()
