"""Serving-faithful conditional acceptance counts of compute_loss (LossOutput.step_cond_*).

The draft is a real tiny EAGLE-3 draft whose attention and MLP outputs are zeroed, so its
hidden output at every TTT step is fc(aux[t]) and its argmax at root t is chosen through aux;
the target's argmax at every position is chosen through last_hidden and a target head with
unit rows. So hits, misses and the data tokens are set by hand.
"""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama_config

from eagle_core.draft import DraftConfig, build_draft
from eagle_core.loss import DraftBatch, TTTConfig, compute_loss, step_weights, target_distribution

V, H = 40, 32


def _unit_rows(n: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, H, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=-1, keepdim=True)


def _setup(vd: int = V):
    """A draft whose argmax at root t is the draft id whose lm_head row aux[t][:H] is, and a
    target head [V, H] with unit rows (last_hidden = 5 * row g -> target argmax g)."""
    cfg = DraftConfig.from_target_config(
        tiny_llama_config(V, hidden_size=H), kind="eagle3", draft_vocab_size=vd
    )
    torch.manual_seed(0)
    draft = build_draft(cfg).eval()  # no vocab map: the draft vocab is target ids 0..vd-1
    with torch.no_grad():
        draft.midlayer.self_attn.o_proj.weight.zero_()  # h_out = h at every step
        draft.midlayer.mlp.down_proj.weight.zero_()
        draft.fc.weight.zero_()
        draft.fc.weight[:, :H] = torch.eye(H)  # fc(aux) = aux[:H]
        draft.lm_head.weight.copy_(_unit_rows(vd, 1))
    return draft, _unit_rows(V, 2)


def _batch(draft, head, draft_tok, target_tok, x, lengths=None, loss_mask=None) -> DraftBatch:
    """draft_tok [B, T]: the draft's argmax at root t (every step); target_tok [B, T]: the
    target's full-vocab argmax at position t (it predicts x[t+1]); x [B, T] the data tokens."""
    draft_tok, target_tok, x = (torch.tensor(v) for v in (draft_tok, target_tok, x))
    b, t = x.shape
    att = torch.ones(b, t, dtype=torch.long)
    if lengths is not None:
        for i, n in enumerate(lengths):
            att[i, n:] = 0
    aux = torch.zeros(b, t, 3 * H)
    aux[..., :H] = draft.lm_head.weight.detach()[draft_tok]
    lm = torch.ones(b, t, dtype=torch.long) if loss_mask is None else torch.tensor(loss_mask)
    return DraftBatch(
        input_ids=x * att,
        attention_mask=att,
        loss_mask=lm * att,
        last_hidden=5.0 * head[target_tok],
        aux_hidden=aux,
    )


def test_correlated_errors_give_conditional_one_where_accuracy_is_half() -> None:
    draft, head = _setup()
    a, z = 5, 9
    # roots t=0 (steps 0, 1) and t=1 (step 0 only): loss mask on positions 2, 3
    mask = [[0, 0, 1, 1]] * 2
    good = dict(d=[a, a, a, a], g=[0, a, a, 0], x=[1, 2, a, 3])  # x[2] == g[1]: on path
    bad = dict(d=[a, a, a, a], g=[0, z, z, 0], x=[1, 2, z, 3])  # every step misses
    rows = (good, bad)
    batch = _batch(
        draft, head, [r["d"] for r in rows], [r["g"] for r in rows], [r["x"] for r in rows],
        loss_mask=mask,
    )  # fmt: skip
    out = compute_loss(draft, batch, head, TTTConfig(steps=2))
    assert out.step_count == [4, 2]
    assert out.step_acc == pytest.approx([0.5, 0.5])  # teacher-forced: 2/4, 1/2
    assert out.step_cond_roots == [4, 1]  # only the good row's root 0 is alive at step 1
    assert out.step_cond_hits == [2, 1]  # conditional: 0.5, then 1.0 (not 0.5)
    # the conditional step 0 is the teacher-forced step 0 (same positions)
    assert out.step_cond_hits[0] / out.step_cond_roots[0] == out.step_acc[0]


def test_data_token_off_the_target_path_ends_the_chain() -> None:
    draft, head = _setup()
    a = 5
    mask = [[0, 0, 1, 1]]
    on = _batch(draft, head, [[a] * 4], [[0, a, a, 0]], [[1, 2, a, 3]], loss_mask=mask)
    off = _batch(draft, head, [[a] * 4], [[0, a, a, 0]], [[1, 2, 7, 3]], loss_mask=mask)
    ttt = TTTConfig(steps=2)
    out_on, out_off = compute_loss(draft, on, head, ttt), compute_loss(draft, off, head, ttt)
    assert out_on.step_cond_roots == [2, 1] and out_on.step_cond_hits == [2, 1]
    # x[2] = 7 is what teacher forcing feeds step 1; serving would feed a = g[1]: censored
    assert out_off.step_cond_roots == [2, 0] and out_off.step_cond_hits == [2, 0]
    # the teacher-forced accuracy and the loss do not see the difference (the draft ignores x)
    assert out_off.step_acc == out_on.step_acc == [1.0, 1.0]
    assert torch.equal(out_off.loss, out_on.loss)


def _reference_counts(draft, batch, head, ttt) -> tuple[list[int], list[int]]:
    """Chains walked one root at a time in Python (what the vectorised counts must equal)."""
    with torch.no_grad():
        _, g, in_vocab = target_distribution(batch.last_hidden, head, draft.draft_target_ids)
        hidden0 = draft.fc(batch.aux_hidden)
        steps = draft.ttt_steps(batch.input_ids, hidden0, ttt.steps)
        d = [logits.argmax(-1) for _, logits in steps]  # per step [B, T]
    w = [
        step_weights(batch.loss_mask, batch.attention_mask, in_vocab, k, ttt.alignment)
        for k in range(ttt.steps)
    ]
    b_n, t_n = batch.input_ids.shape
    x = batch.input_ids
    hits, roots = [0] * ttt.steps, [0] * ttt.steps
    for b in range(b_n):
        for t in range(t_n - 1):
            for k in range(ttt.steps):
                if t + 1 + k >= t_n or w[k][b, t] <= 0:
                    break
                roots[k] += 1
                if d[k][b, t] != g[b, t + 1 + k]:
                    break
                hits[k] += 1
                if t + 2 + k >= t_n or x[b, t + 2 + k] != g[b, t + 1 + k]:
                    break
    return hits, roots


@pytest.mark.parametrize("alignment", ["aligned", "reference"])
def test_counts_equal_a_chain_walk_with_padding_and_vocab(alignment: str) -> None:
    """Random hits and on/off-path tokens, a draft vocab smaller than V (out-of-vocab target
    argmaxes weigh 0 and end chains), right padding, a sparse loss mask."""
    draft, head = _setup(vd=30)
    gen = torch.Generator().manual_seed(4)
    b, t = 4, 16
    d = torch.randint(0, 2, (b, t), generator=gen)  # the draft's argmax per root
    g = torch.randint(0, 2, (b, t), generator=gen)  # the target's; id 34 is out of the vocab
    g[torch.rand(b, t, generator=gen) < 0.1] = 34
    x = torch.roll(g, 1, dims=1)  # x[i+1] = g[i]: on the target's path ...
    off = torch.rand(b, t, generator=gen) < 0.2
    x[off] = 20  # ... except here
    mask = (torch.rand(b, t, generator=gen) < 0.8).long()
    batch = _batch(draft, head, d.tolist(), g.tolist(), x.tolist(), [16, 11, 7, 14], mask.tolist())
    ttt = TTTConfig(steps=4, alignment=alignment)
    out = compute_loss(draft, batch, head, ttt)
    hits, roots = _reference_counts(draft, batch, head, ttt)
    assert out.step_cond_hits == hits and out.step_cond_roots == roots
    assert roots[0] == out.step_count[0] and hits[1] > 0 and roots[2] > 0  # chains do live
    assert all(r <= c for r, c in zip(roots, out.step_count, strict=True))


def test_counts_are_the_same_with_head_checkpointing() -> None:
    """Both head paths give the same counts, and the counts hold no graph."""
    draft, head = _setup(vd=30)
    gen = torch.Generator().manual_seed(5)
    g = torch.randint(0, 6, (2, 10), generator=gen)
    batch = _batch(draft, head, [[1] * 10, [2] * 10], g.tolist(), torch.roll(g, 1, 1).tolist())
    draft.train()
    out = compute_loss(draft, batch, head, TTTConfig(steps=3, checkpoint_head=False))
    out2 = compute_loss(draft, batch, head, TTTConfig(steps=3, checkpoint_head=True))
    assert out.step_cond_hits == out2.step_cond_hits and out.step_cond_roots == out2.step_cond_roots
    assert out.step_cond_roots[0] == out.step_count[0] > 0
    out.loss.backward()  # the counts hold no graph
    assert draft.fc.weight.grad is not None
