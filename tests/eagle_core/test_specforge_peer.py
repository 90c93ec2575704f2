"""`alignment="reference"` equals SpecForge 0.2.0's own EAGLE-3 training step.

The real SpecForge (its own venv, `.ci/engine-venv specforge`) warm-starts its draft model from
our `eagle3` export (its own loading path) and runs its offline training path on the same
samples
(tests/peers/specforge_forward.py: normalize_offline_sample, DataCollatorWithPadding,
Eagle3TrainStrategy.forward_loss, with its plain loss formula in place of the Triton kernel).
Its per-step logits, per-step losses, total loss, accuracy hits and gradients equal ours with
`alignment="reference"`; `alignment="aligned"` is the same forward with other loss weights
and averaging (rebuilt here from SpecForge's own logits).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from engines import ROOT, engine_python
from safetensors.torch import load_file, save_file
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

from eagle_core.capture import TargetStates, capture_states, target_head_weight
from eagle_core.draft import DraftConfig, build_draft
from eagle_core.export import ExportConfig, export_state_dict
from eagle_core.loss import (
    DraftBatch,
    TTTConfig,
    compute_loss,
    shift_left,
    step_weights,
    target_distribution,
)

pytestmark = pytest.mark.slow

V, VD, K = 96, 40, 4
LENGTHS = (14, 9, 5)  # right padded to 14; the longest sample ends inside a loss-mask span


def _vocab_map():
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True

    class Map:
        d2t = ids - torch.arange(VD)

    Map.t2d = t2d
    return Map


def _setup():
    torch.manual_seed(0)
    target = LlamaForCausalLM(tiny_llama_config(V, initializer_range=0.2)).eval()
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=VD)
    torch.manual_seed(1)
    draft = build_draft(cfg, target, vocab_map=_vocab_map())
    with torch.no_grad():  # norms off 1 (their order and placement matter), a sharp head
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
        draft.lm_head.weight.mul_(8.0)
    g = torch.Generator().manual_seed(5)
    samples = []
    for n in LENGTHS:
        x = torch.randint(0, V, (n,), generator=g)
        m = (torch.rand(n, generator=g) < 0.7).long()
        samples.append((x, m))
    samples[0][1][-3:] = 1  # SpecForge zeroes the last token's mask; ours never weighs it
    return target, cfg, draft, samples


def _batch(target, samples) -> DraftBatch:
    b, t = len(samples), max(LENGTHS)
    x = torch.zeros(b, t, dtype=torch.long)
    att, lm = torch.zeros_like(x), torch.zeros_like(x)
    for i, (xi, mi) in enumerate(samples):
        x[i, : len(xi)], att[i, : len(xi)], lm[i, : len(xi)] = xi, 1, mi
    st = capture_states(target, x, att)
    # zero past each sample's end, as SpecForge's collator pads the hidden states
    keep = att[..., None].float()
    return DraftBatch(x, att, lm, last_hidden=st.last * keep, aux_hidden=st.aux * keep)


def _run_specforge(work: Path, target, cfg, draft, samples) -> dict[str, torch.Tensor]:
    export_state_dict(
        draft.state_dict(),
        cfg,
        target.config,
        ExportConfig(format="eagle3", dtype="float32", include_embeddings=True, target="tiny"),
        str(work / "draft"),
    )
    target.config.save_pretrained(work / "target")
    inputs = {"target_head": target_head_weight(target).detach().clone()}
    for i, (x, m) in enumerate(samples):
        st = capture_states(target, x[None])
        inputs |= {
            f"input_ids.{i}": x,
            f"loss_mask.{i}": m,
            f"hidden_state.{i}": st.last,
            f"aux_hidden_state.{i}": st.aux,
        }
    save_file({k: v.contiguous() for k, v in inputs.items()}, work / "inputs.safetensors")
    proc = subprocess.run(
        [engine_python("specforge"), str(ROOT / "tests/peers/specforge_forward.py"), str(work)]
        + [str(K)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loading = json.loads((work / "loading.json").read_text())
    assert loading["class"] == "LlamaForCausalLMEagle3"
    # every tensor of the model from the export (16: with the embeddings and d2t / t2d)
    assert loading["missing_keys"] == [] and loading["loaded_embedding"]
    assert loading["loaded_keys"] == len(loading["state_keys"]) == 16
    return load_file(work / "out.safetensors")


def test_reference_alignment_equals_specforge_training_step(tmp_path: Path) -> None:
    target, cfg, draft, samples = _setup()
    sf = _run_specforge(tmp_path, target, cfg, draft, samples)
    batch = _batch(target, samples)
    head = target_head_weight(target).detach()

    # per-step logits at every index of every sample (past a sample's end SpecForge also
    # masks padded keys; those positions carry weight 0 in both)
    with torch.no_grad():
        hidden0 = draft.init_hidden(TargetStates(aux=batch.aux_hidden, last=batch.last_hidden))
        ours = torch.stack([lg for _, lg in draft.ttt_steps(batch.input_ids, hidden0, K)])
    assert sf["logits"].shape == ours.shape == (K, len(LENGTHS), max(LENGTHS), VD)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(sf["logits"][:, i, :n], ours[:, i, :n], rtol=1e-4, atol=1e-5)

    # the loss, step by step, and its gradients
    draft.zero_grad()
    ref = compute_loss(draft, batch, head, TTTConfig(steps=K, alignment="reference"))
    ref.loss.backward()
    torch.testing.assert_close(torch.tensor(ref.step_loss), sf["plosses"], rtol=1e-5, atol=1e-7)
    assert ref.loss.item() == pytest.approx(sf["loss"].item(), rel=1e-5)
    grads = {n: p.grad for n, p in draft.named_parameters() if p.grad is not None}
    assert set(grads) == {k[5:] for k in sf if k.startswith("grad.")} - {"embed_tokens.weight"}
    for name, g in grads.items():
        torch.testing.assert_close(g, sf[f"grad.{name}"], rtol=1e-4, atol=1e-6, msg=name)
    # accuracy: the same hits; SpecForge divides by #loss_mask[t+k] (out-of-vocab targets
    # count as misses there), we by the weighted positions
    hits = [round(a * c) for a, c in zip(ref.step_acc, ref.step_count, strict=True)]
    assert hits == sf["acc_corrects"].round().long().tolist() and sum(hits) > 0
    assert all(c <= d for c, d in zip(ref.step_count, sf["acc_denoms"].tolist(), strict=True))

    # aligned: SpecForge's own logits with the aligned weights and averaging give our
    # aligned loss; the reference weights and B·T averaging give SpecForge's
    aligned = compute_loss(draft, batch, head, TTTConfig(steps=K, alignment="aligned"))
    probs, _, in_vocab = target_distribution(batch.last_hidden, head, draft.draft_target_ids)
    rebuilt = {"aligned": 0.0, "reference": 0.0}
    for k in range(K):
        ce = -(shift_left(probs, 1 + k) * torch.log_softmax(sf["logits"][k], -1)).sum(-1)
        for scheme in rebuilt:
            w = step_weights(batch.loss_mask, batch.attention_mask, in_vocab, k, scheme)
            denom = w.sum().clamp(min=1) if scheme == "aligned" else w.numel()
            rebuilt[scheme] += 0.8**k * float((w * ce).sum() / denom)
    assert rebuilt["reference"] == pytest.approx(sf["loss"].item(), rel=1e-5)
    assert rebuilt["aligned"] == pytest.approx(aligned.loss.item(), rel=1e-5)
    assert abs(aligned.loss.item() - ref.loss.item()) > 1e-2
