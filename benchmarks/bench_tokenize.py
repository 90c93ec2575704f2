"""tokenize stage throughput vs a per-sample Python loop calling the tokenizer.

Same records (multi-turn chats built from stdlib source), same tokenizer (the demo family:
byte-level BPE, ChatML template with generation markers). Our side: the whole tokenize stage
(batched fast-tokenizer calls, masks from offsets, Parquet shards, publish). Reference side:
one `apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True)` call per
sample, as the reference trainers' preprocessing does. Target: >= 5x faster.

Run: .venv/bin/python -m benchmarks.bench_tokenize [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

from transformers import AutoTokenizer

from benchmarks.measure import interleaved, save
from eagle_core.demo.corpus import list_stdlib_files, stdlib_root
from eagle_core.demo.tokenizer import build_tokenizer
from eagle_core.download import DownloadConfig, SourceSpec, download
from eagle_core.tokenize import TokenizeConfig, tokenize
from storage import ArtifactStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-proc", type=int, default=1)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-tok-")
    rng = random.Random(0)
    root = stdlib_root()
    files = [os.path.join(root, f) for f in sorted(list_stdlib_files(root))[:200]]
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    tok_dir = build_tokenizer(texts[:60], 8192, f"{work}/tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)

    chunks = [t[i : i + 600] for t in texts for i in range(0, len(t) - 600, 600)]
    records = []
    for i in range(args.samples):
        turns = rng.randint(1, 3)
        msgs = [{"role": "system", "content": "You are a Python expert."}]
        for _ in range(turns):
            msgs.append({"role": "user", "content": rng.choice(chunks)[:200]})
            msgs.append({"role": "assistant", "content": rng.choice(chunks)})
        records.append({"id": f"r{i}", "messages": msgs})
    path = os.path.join(work, "chat.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)

    store = ArtifactStore(f"{work}/store")
    recs = download(store, DownloadConfig(sources=(SourceSpec(path=path, kind="chat"),)))
    cfg = TokenizeConfig(tokenizer=tok_dir, format="chat", max_length=4096)

    def ours() -> None:
        tokenize(store, recs, cfg, force=True, num_proc=args.num_proc)

    def reference() -> None:
        for r in records:
            tok.apply_chat_template(
                r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )

    t_ours, t_ref = interleaved(ours, reference, repeats=args.repeats)
    ref = tokenize(store, recs, cfg)
    # both sides must agree on what is learned: compare masks on a sample of records
    from eagle_core.tokenize import samples

    ours_by_id = {s["sample_id"]: s for s in samples(store, ref)}
    agree = checked = 0
    for r in records[:200]:
        enc = tok.apply_chat_template(
            r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        mine = next((v for k, v in ours_by_id.items() if k.endswith(r["id"])), None)
        if mine is None:
            continue
        checked += 1
        agree += list(mine["input_ids"]) == list(enc["input_ids"])
    tokens = int(ref.counts.get("tokens", 0))
    rows = [
        {
            "measure": "speedup vs per-sample loop",
            "value": t_ref / t_ours,
            "target": ">= 5",
            "met": t_ref / t_ours >= 5,
            "detail": f"{t_ours:.2f}s vs {t_ref:.2f}s, {args.samples} chats, {tokens:,} tokens",
        },
        {
            "measure": "same input_ids as apply_chat_template",
            "value": agree / max(checked, 1),
            "target": "1",
            "met": agree == checked and checked > 0,
            "detail": f"{agree}/{checked} samples",
        },
    ]
    save("tokenize", rows, samples=args.samples, num_proc=args.num_proc)


if __name__ == "__main__":
    main()
