"""TTT loss peak memory: draft-vocab-restricted target logits vs full target-vocab fp32 logits.

Each side runs in its own child process (peak RSS is per process) over the same seeded batch:
- ours: `eagle_core.loss.compute_loss` as shipped (target logits over the Vd draft rows only,
  the in-vocab test streamed over chunks of head rows);
- full: the reference way: [B, T, V] fp32 target logits, full softmax, gathered on the draft
  vocab and renormalized, and every step's [B, T, Vd] logits kept for backward;
- nockpt: ours with the per-step logits kept for backward (TTTConfig.checkpoint_head=False),
  to show which of the two changes buys what.
Forward + backward. Target: lower peak memory, same loss value.

Run: .venv/bin/python -m benchmarks.bench_loss_memory [--vocab 128256 --draft-vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def full_vocab_distribution(last_hidden, target_head, draft_target_ids):
    logits = last_hidden.float() @ target_head.float().T  # [B, T, V] fp32: what we avoid
    full = torch.softmax(logits, dim=-1)
    probs = full[..., draft_target_ids]
    probs = probs / probs.sum(-1, keepdim=True)
    arg_full = logits.argmax(-1)  # [B, T] target ids
    is_draft = torch.zeros(target_head.shape[0], dtype=torch.bool)
    is_draft[draft_target_ids] = True
    to_draft = torch.cumsum(is_draft.long(), 0) - 1
    in_vocab = is_draft[arg_full]
    argmax = torch.where(in_vocab, to_draft[arg_full], torch.zeros_like(arg_full))
    return probs, argmax, in_vocab


def child(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig

    import eagle_core.loss as loss_mod
    from eagle_core.draft import DraftConfig, build_draft
    from eagle_core.vocab import VocabMap

    torch.manual_seed(0)
    H, V, Vd, T = args.hidden, args.vocab, args.draft_vocab, args.length
    tcfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=3 * H,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * T,
    )
    ids = torch.randperm(V)[:Vd].sort().values
    vmap = VocabMap.from_draft_ids(ids, V)
    draft = build_draft(DraftConfig.from_target_config(tcfg, draft_vocab_size=Vd), None, vmap)
    head = torch.randn(V, H) * 0.05
    batch = loss_mod.DraftBatch(
        input_ids=torch.randint(0, V, (1, T)),
        attention_mask=torch.ones(1, T, dtype=torch.long),
        loss_mask=torch.ones(1, T, dtype=torch.long),
        last_hidden=torch.randn(1, T, H),
        aux_hidden=torch.randn(1, T, 3 * H),
    )
    if args.side == "full":
        loss_mod.target_distribution = full_vocab_distribution
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ttt = loss_mod.TTTConfig(steps=args.steps, checkpoint_head=args.side == "ours")
    out = loss_mod.compute_loss(draft, batch, head, ttt)
    out.loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"loss": out.loss.item(), "peak_kib": peak, "base_kib": base, "acc": out.step_acc}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ours", "full", "nockpt"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--draft-vocab", type=int, default=32_000)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    if args.side:
        child(args)
        return
    from benchmarks.measure import save

    res = {}
    for side in ("ours", "nockpt", "full"):
        cmd = [sys.executable, "-m", "benchmarks.bench_loss_memory", "--side", side]
        for k in ("hidden", "vocab", "draft_vocab", "length", "steps"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[side] = json.loads(out.strip().splitlines()[-1])
    grow = {s: (r["peak_kib"] - r["base_kib"]) / 1024 for s, r in res.items()}
    same = abs(res["ours"]["loss"] - res["full"]["loss"]) <= 1e-4 * abs(res["full"]["loss"])
    rows = [
        {
            "measure": "loss peak memory (MiB above set-up)",
            "ours": grow["ours"],
            "full-vocab fp32": grow["full"],
            "ratio": grow["ours"] / max(grow["full"], 1e-9),
            "met": grow["ours"] < grow["full"],
        },
        {
            "measure": "without head checkpointing (MiB)",
            "ours": grow["nockpt"],
            "full-vocab fp32": grow["full"],
            "ratio": grow["nockpt"] / max(grow["full"], 1e-9),
            "met": "",
        },
        {
            "measure": "process peak RSS (MiB)",
            "ours": res["ours"]["peak_kib"] / 1024,
            "full-vocab fp32": res["full"]["peak_kib"] / 1024,
            "ratio": res["ours"]["peak_kib"] / res["full"]["peak_kib"],
            "met": "",
        },
        {
            "measure": "loss value",
            "ours": res["ours"]["loss"],
            "full-vocab fp32": res["full"]["loss"],
            "ratio": res["ours"]["loss"] / res["full"]["loss"],
            "met": same,
        },
    ]
    save(
        "loss_memory",
        rows,
        **{k: getattr(args, k) for k in ("hidden", "vocab", "draft_vocab", "length", "steps")},
    )


if __name__ == "__main__":
    main()
