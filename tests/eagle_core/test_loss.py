"""TTT loss: restricted target head, weights, a slow dense reference, padding, training."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from eagle_core.capture import capture_states, target_head_weight
from eagle_core.draft import DraftConfig, Eagle1Draft, build_draft
from eagle_core.errors import ConfigError, ModelMismatchError
from eagle_core.loss import (
    DraftBatch,
    TTTConfig,
    compute_loss,
    step_weights,
    target_distribution,
)

V, H, T = 90, 32, 14


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(V, hidden_size=H, initializer_range=0.2)).eval()


def _vocab_map(vd: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(V, generator=g)[:vd].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True

    class Map:
        d2t = ids - torch.arange(vd)

    Map.t2d = t2d
    return Map


def _batch(target, kind: str, seed: int = 0) -> DraftBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (3, T), generator=g)
    att = torch.ones(3, T, dtype=torch.long)
    att[1, 9:] = 0  # right padding
    att[2, 5:] = 0
    x = x * att
    lm = (torch.rand(3, T, generator=g) < 0.7).long() * att
    st = capture_states(target, x, att)
    return DraftBatch(
        input_ids=x,
        attention_mask=att,
        loss_mask=lm,
        last_hidden=st.last,
        aux_hidden=st.aux if kind == "eagle3" else None,
    )


@pytest.mark.parametrize("chunk", [1 << 25, 100], ids=["one-chunk", "many-chunks"])
def test_restricted_head_equals_full_softmax_gathered(chunk: int, monkeypatch) -> None:
    import eagle_core.loss

    monkeypatch.setattr(eagle_core.loss, "_CHUNK_ELEMENTS", chunk)  # head rows per chunk
    g = torch.Generator().manual_seed(0)
    last = torch.randn(2, 20, H, generator=g)
    head = torch.randn(V, H, generator=g) * 0.5
    ids = _vocab_map(30).t2d.nonzero().flatten()
    probs, argmax, in_vocab = target_distribution(last, head, ids)
    full = torch.softmax(last @ head.T, dim=-1)  # [B, T, V]
    gathered = full[..., ids]
    torch.testing.assert_close(probs, gathered / gathered.sum(-1, keepdim=True))
    assert torch.equal(argmax, gathered.argmax(-1))
    want = torch.isin(full.argmax(-1), ids)
    assert torch.equal(in_vocab, want)
    assert 0 < int(want.sum()) < want.numel()  # both cases occur


def test_step_weights_alignment() -> None:
    """Aligned: the PREDICTED token's mask. Reference: two tokens earlier."""
    m = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]])
    att = torch.ones_like(m)
    ok = torch.ones_like(m, dtype=torch.bool)
    # step 0 at t predicts x[t+2]: the span x2..x4 is predicted from t = 0, 1, 2
    assert step_weights(m, att, ok, 0, "aligned").tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    # reference: m[t] -> predicts x4, x5, x6: x2, x3 are never trained, x5, x6 are
    assert step_weights(m, att, ok, 0, "reference").tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]
    assert step_weights(m, att, ok, 1, "aligned").tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    # nothing runs past the sample: t+2+k < len
    full = torch.ones_like(m)
    assert step_weights(full, att, ok, 2, "aligned").tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    short = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    assert step_weights(full, short, ok, 0, "aligned").tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    # the target's argmax at t+1+k must be a draft token
    miss = ok.clone()
    miss[0, 3] = False
    assert step_weights(full, att, miss, 0, "aligned").tolist() == [[1, 1, 0, 1, 1, 1, 0, 0]]


# ---- a slow, dense, independent implementation of the whole loss ----------------------------
def _dense_attention(attn, x, cos, sin, keys, values, step):
    """Attention with an explicit [T, (k+1)T] boolean mask over all steps' keys."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys.append(k)
    values.append(v)
    blocks = [torch.ones(t, t, dtype=torch.bool).tril()]  # step-0 keys: causal
    blocks += [torch.eye(t, dtype=torch.bool)] * step  # chain keys: same index only
    mask = torch.cat(blocks, dim=1)  # [T, (k+1)T]
    kk = torch.cat(keys, dim=2).repeat_interleave(attn.groups, dim=1)
    vv = torch.cat(values, dim=2).repeat_interleave(attn.groups, dim=1)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _dense_forward(draft, x, hidden0, steps):
    b, t = x.shape
    keys, values, outs, h = [], [], [], hidden0
    for k in range(steps):
        tok = torch.zeros_like(x)
        tok[:, : max(t - 1 - k, 0)] = x[:, 1 + k :]
        pos = torch.arange(t)[None].expand(b, t) + k
        cos, sin = draft.rotary_emb(h, pos)
        emb = draft.embed_tokens(tok)
        if isinstance(draft, Eagle1Draft):
            layer = draft.layers[0]
            z = draft.fc(torch.cat([emb, h], -1))
            z = z + _dense_attention(layer.self_attn, z, cos, sin, keys, values, k)
            h = z + layer.mlp(layer.post_attention_layernorm(z))
            logits = draft.lm_head(h)
        else:
            ml = draft.midlayer
            xa = torch.cat([ml.input_layernorm(emb), ml.hidden_norm(h)], -1)
            h = h + _dense_attention(ml.self_attn, xa, cos, sin, keys, values, k)
            h = h + ml.mlp(ml.post_attention_layernorm(h))
            logits = draft.lm_head(draft.norm(h))
        outs.append((h, logits))
    return outs


def _dense_loss(draft, batch, head, cfg, shift_targets: int = 0) -> float:
    """Σ_k decay^k · (Σ_weighted CE / #weighted, or / B·T for "reference"), with python
    loops over every (b, t, k)."""
    ids = draft.draft_target_ids
    full = torch.softmax(batch.last_hidden.float() @ head.float().T, dim=-1)  # [B, T, V]
    probs = full[..., ids] / full[..., ids].sum(-1, keepdim=True)
    states_hidden = draft.init_hidden(
        type("S", (), {"aux": batch.aux_hidden, "last": batch.last_hidden})()
    )
    outs = _dense_forward(draft, batch.input_ids, states_hidden, cfg.steps)
    total = 0.0
    b_n, t_n = batch.input_ids.shape
    for k, (h, logits) in enumerate(outs):
        logp = torch.log_softmax(logits.float(), -1)
        num, den, fnum = 0.0, 0.0, 0.0
        for b in range(b_n):
            n = int(batch.attention_mask[b].sum())
            for t in range(t_n):
                p = t + 1 + k + shift_targets  # the target position of step k at t
                if cfg.alignment == "aligned":
                    if t + 2 + k >= n or not batch.loss_mask[b, t + 2 + k]:
                        continue
                else:
                    if t + 1 + k >= n or not batch.loss_mask[b, t + k]:
                        continue
                if p >= t_n or int(full[b, p].argmax()) not in set(ids.tolist()):
                    continue
                num += float(-(probs[b, p] * logp[b, t]).sum())
                if isinstance(draft, Eagle1Draft):
                    fnum += float(F.smooth_l1_loss(h[b, t], batch.last_hidden[b, p]))
                den += 1
        if cfg.alignment == "reference":
            den = b_n * t_n  # every position of the padded batch, as SpecForge's .mean()
        step = num / max(den, 1)
        if isinstance(draft, Eagle1Draft):
            step = cfg.eagle1_feature_weight * fnum / max(den, 1) + cfg.eagle1_ce_weight * step
        total += cfg.decay**k * step
    return total


@pytest.mark.parametrize("alignment", ["aligned", "reference"])
@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_loss_equals_dense_reference(target, kind: str, alignment: str) -> None:
    vd = V if kind == "eagle1" else 40
    cfg = DraftConfig.from_target_config(target.config, kind=kind, draft_vocab_size=vd)
    torch.manual_seed(2)
    draft = build_draft(cfg, target, vocab_map=_vocab_map(40) if kind == "eagle3" else None)
    batch = _batch(target, kind)
    ttt = TTTConfig(steps=4, alignment=alignment)
    head = target_head_weight(target)
    out = compute_loss(draft, batch, head, ttt)
    with torch.no_grad():
        want = _dense_loss(draft, batch, head, ttt)
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len(out.step_loss) == 4 and all(c > 0 for c in out.step_count)
    # the check is sensitive: targets one position off give another value
    with torch.no_grad():
        shifted = _dense_loss(draft, batch, head, ttt, shift_targets=1)
    assert abs(shifted - out.loss.item()) > 1e-3


def test_padding_does_not_leak(target) -> None:
    """A padded batch's per-step sums equal the sums of its samples run alone."""
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    torch.manual_seed(2)
    draft = build_draft(cfg, target, vocab_map=_vocab_map(40))
    batch = _batch(target, "eagle3")
    head = target_head_weight(target)
    ttt = TTTConfig(steps=3)
    both = compute_loss(draft, batch, head, ttt)
    sums = [0.0] * 3
    counts = [0] * 3
    for b in range(3):
        n = int(batch.attention_mask[b].sum())
        one = DraftBatch(
            input_ids=batch.input_ids[b : b + 1, :n],
            attention_mask=batch.attention_mask[b : b + 1, :n],
            loss_mask=batch.loss_mask[b : b + 1, :n],
            last_hidden=capture_states(target, batch.input_ids[b : b + 1, :n]).last,
            aux_hidden=capture_states(target, batch.input_ids[b : b + 1, :n]).aux,
        )
        o = compute_loss(draft, one, head, ttt)
        for k in range(3):
            sums[k] += o.step_loss[k] * o.step_count[k]
            counts[k] += o.step_count[k]
    assert both.step_count == counts
    for k in range(3):
        assert both.step_loss[k] == pytest.approx(sums[k] / counts[k], rel=1e-4)


def test_bad_inputs_are_refused(target) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    draft = build_draft(cfg, target)
    batch = _batch(target, "eagle1")  # no aux states
    with pytest.raises(ModelMismatchError, match="aux_hidden"):
        compute_loss(draft, batch, target_head_weight(target), TTTConfig())
    with pytest.raises(ModelMismatchError, match="target_head"):
        compute_loss(draft, _batch(target, "eagle3"), torch.zeros(V + 1, H), TTTConfig())
    with pytest.raises(ConfigError, match="decay"):
        TTTConfig(decay=1.5)
    with pytest.raises(ConfigError, match="alignment"):
        TTTConfig(alignment="shifted")


# ---- training on the small (trained) target ------------------------------------------------
def _real_batch(tokenizer_dir: str, target) -> DraftBatch:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [inspect.getsource(json.dumps), inspect.getsource(inspect.getsource)]
    rows = [tok(t)["input_ids"][:96] for t in texts]
    t = max(len(r) for r in rows)
    x = torch.zeros(len(rows), t, dtype=torch.long)
    att = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    st = capture_states(target, x, att)
    return DraftBatch(
        input_ids=x,
        attention_mask=att,
        loss_mask=att.clone(),
        last_hidden=st.last,
        aux_hidden=st.aux,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_training_reduces_loss_and_raises_accuracy(
    kind: str, small_target_dir: str, small_tokenizer_dir: str
) -> None:
    target = LlamaForCausalLM.from_pretrained(small_target_dir).eval()
    batch = _real_batch(small_tokenizer_dir, target)
    v = target.config.vocab_size
    cfg = DraftConfig.from_target_config(
        target.config, kind=kind, draft_vocab_size=v if kind == "eagle1" else v // 2
    )
    torch.manual_seed(0)
    draft = build_draft(cfg, target)
    head = target_head_weight(target)
    ttt = TTTConfig(steps=3)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    first = compute_loss(draft, batch, head, ttt)
    for _ in range(40):
        out = compute_loss(draft, batch, head, ttt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = compute_loss(draft, batch, head, ttt)
    # soft CE has the target's entropy as its floor: a 10% drop is most of the reducible part
    assert last.loss.item() < 0.9 * first.loss.item()
    assert last.step_acc[0] > first.step_acc[0] + 0.3


@pytest.mark.parametrize("alignment", ["aligned", "reference"])
def test_checkpointed_attention_gives_the_same_loss_and_grads(target, alignment: str) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    torch.manual_seed(2)
    draft = build_draft(cfg, target, vocab_map=_vocab_map(40))
    batch = _batch(target, "eagle3")
    head = target_head_weight(target)
    results = []
    for ckpt in (False, True):
        draft.zero_grad()
        out = compute_loss(
            draft, batch, head, TTTConfig(steps=4, alignment=alignment, checkpoint_attention=ckpt)
        )
        out.loss.backward()
        results.append((out.loss.detach(), draft.midlayer.self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_checkpoint_head_same_loss_accuracy_and_grads(target, kind: str) -> None:
    """Recomputing each step's logits in backward changes memory, not numbers."""
    if kind == "eagle3":
        cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
        vmap = _vocab_map(40)
    else:
        cfg = DraftConfig.from_target_config(target.config, kind="eagle1")
        vmap = None
    torch.manual_seed(2)
    draft = build_draft(cfg, target, vocab_map=vmap)
    batch = _batch(target, kind)
    head = target_head_weight(target)
    results = []
    for ckpt in (False, True):
        draft.zero_grad()
        out = compute_loss(draft, batch, head, TTTConfig(steps=3, checkpoint_head=ckpt))
        out.loss.backward()
        grads = [p.grad.clone() for p in draft.parameters() if p.grad is not None]
        results.append((out.loss.detach(), out.step_acc, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    assert len(results[0][2]) == len(results[1][2]) > 0
    for a, b in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(a, b)
