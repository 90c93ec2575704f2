"""Speculative decoding: lossless against greedy decoding (trained and untrained drafts, chain
and tree), τ from counted events, sampling mode, cache surgery."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama_config
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM

from eagle_core.capture import capture_states
from eagle_core.draft import DraftConfig, build_draft
from eagle_core.errors import ConfigError
from eagle_core.loss import DraftBatch, TTTConfig, compute_loss
from eagle_core.models import load_target
from eagle_core.speculate import SpecResult, greedy_generate, speculative_generate

CODE = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "for i in range(10):\n    print(i)\n",
    'def _parse(self, text):\n    """Parse',
    "    if not isinstance(value, str):\n        raise",
    "from collections import",
    "    return self._",
    "def __repr__(self):\n    return",
    "# Copyright",
    "    def close(self):\n",
    "try:\n    import",
]
TRAIN_STEPS, TRAIN_LR = 40, 1e-2
HELDOUT = [
    "def main():\n    ",
    "    for key, value in",
    "class Error(Exception):\n",
    "    raise ValueError(",
    "with open(path) as f:\n",
    "import re\n\n",
]


@pytest.fixture(scope="module")
def small(small_target_dir: str, small_tokenizer_dir: str):
    target = load_target(small_target_dir)
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    return target, tok


def _prompts(tok, texts: list[str]) -> list[torch.Tensor]:
    return [torch.tensor([tok.encode(t)]) for t in texts]


@pytest.fixture(scope="module")
def trained_draft(small):
    """An EAGLE-3 draft (draft vocab 512 with a real map) trained with the TTT loss on the
    target's own greedy continuations of CODE prompts: high acceptance on such text."""
    target, tok = small
    torch.manual_seed(0)
    # the target's own greedy continuations of CODE prompts (their first 3 tokens), batched
    ids = torch.tensor([tok.encode(t)[:3] for t in CODE])  # [12, 3]
    cache = DynamicCache()
    with torch.no_grad():
        step_ids = ids
        for _ in range(32):
            logits = target(input_ids=step_ids, past_key_values=cache, use_cache=True).logits
            step_ids = logits[:, -1:].argmax(-1)  # [12, 1]
            ids = torch.cat([ids, step_ids], dim=1)
    att = torch.ones_like(ids)
    v = target.config.vocab_size
    counts = torch.bincount(ids[att.bool()], minlength=v).float()
    counts += torch.linspace(0, 0.5, v)  # deterministic tie-break, then the top 512
    draft_ids = counts.topk(512).indices.sort().values
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[draft_ids] = True

    class _Map:
        d2t = draft_ids - torch.arange(512)

    _Map.t2d = t2d
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=512)
    draft = build_draft(cfg, target_model=target, vocab_map=_Map)
    states = capture_states(target, ids, attention_mask=att, layer_ids=cfg.aux_layer_ids)
    batch = DraftBatch(
        input_ids=ids,
        attention_mask=att,
        loss_mask=att.clone(),
        last_hidden=states.last,
        aux_hidden=states.aux,
    )
    head = target.get_output_embeddings().weight
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=TRAIN_LR)
    ttt = TTTConfig(steps=5)
    draft.train()
    for _ in range(TRAIN_STEPS):
        out = compute_loss(draft, batch, head, ttt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return draft.eval()


def _untrained(target, kind: str):
    torch.manual_seed(7)
    vd = 300 if kind == "eagle3" else None
    cfg = DraftConfig.from_target_config(target.config, kind=kind, draft_vocab_size=vd)
    return build_draft(cfg, target_model=target).eval()


def _check_lossless(target, draft, prompts, mode: str, n_new: int = 24, **kw) -> list[SpecResult]:
    results = []
    for p in prompts:
        want = greedy_generate(target, p, n_new)
        got = speculative_generate(target, draft, p, n_new, mode=mode, **kw)
        assert got.tokens == want, f"{mode}: speculative output differs from greedy for {p}"
        results.append(got)
    return results


def _check_counts(r: SpecResult, steps: int) -> None:
    # τ from the events: emitted tokens = 1 (prefill) + Σ (accepted + 1), exactly (a round cut
    # by max_new_tokens / EOS counts only what it emitted)
    assert len(r.tokens) == 1 + sum(a + 1 for a in r.accepted_per_forward)
    assert all(0 <= a <= steps for a in r.accepted_per_forward)
    assert r.n_target_forwards == 1 + len(r.accepted_per_forward)
    assert r.tau == pytest.approx(1 + sum(r.accepted_per_forward) / len(r.accepted_per_forward))
    assert r.per_position_accept_counts[0] == sum(a >= 1 for a in r.accepted_per_forward)
    assert all(
        a >= b
        for a, b in zip(
            r.per_position_accept_counts, r.per_position_accept_counts[1:], strict=False
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_trained_draft_is_lossless_and_accepts(small, trained_draft, mode: str) -> None:
    target, tok = small
    results = _check_lossless(target, trained_draft, _prompts(tok, CODE + HELDOUT), mode)
    for r in results:
        _check_counts(r, 5)
    accepted = [a for r in results for a in r.accepted_per_forward]
    tau = 1 + sum(accepted) / len(accepted)
    assert tau > 2.0, f"{mode}: trained draft τ={tau:.2f}, acceptance paths barely exercised"
    # chain: whole chains accepted; tree: the draft's flat distributions put 24 nodes at
    # depths <= 3, and paths that deep are accepted (non-contiguous target-cache rows kept)
    assert max(accepted) == (5 if mode == "chain" else 3)


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_untrained_draft_is_lossless(small, kind: str, mode: str) -> None:
    target, tok = small
    draft = _untrained(target, kind)
    results = _check_lossless(target, draft, _prompts(tok, HELDOUT[:2]), mode, n_new=12)
    for r in results:
        _check_counts(r, 5)


def test_eos_and_max_new_tokens_match_greedy(small) -> None:
    target, tok = small
    draft = _untrained(target, "eagle3")
    p = _prompts(tok, ["def f(x):\n    return"])[0]
    full = greedy_generate(target, p, 20)
    eos = full[5]  # pretend the 6th greedy token is EOS
    want = greedy_generate(target, p, 20, eos_token_id=eos)
    assert want == full[: full.index(eos) + 1]
    for mode in ("chain", "tree"):
        got = speculative_generate(target, draft, p, 20, mode=mode, eos_token_id=[eos])
        assert got.tokens == want
        assert speculative_generate(target, draft, p, 3, mode=mode).tokens == full[:3]
        assert speculative_generate(target, draft, p, 0, mode=mode).tokens == []
    assert greedy_generate(target, p, 0) == []


@pytest.mark.slow
def test_random_target_float64_many_prompts() -> None:
    """A random (untrained) 8-layer target in float64: prompts of many lengths, chain and
    tree, steps 1 and 4 (float64: no near-ties between batched and one-token forwards)."""
    target, draft = _random_pair()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (1, n), generator=gen) for n in (1, 4, 9, 17)]
    for steps in (1, 4):
        for mode in ("chain", "tree"):
            _check_lossless(
                target, draft, prompts, mode, n_new=10, steps=steps, topk=3, total_tokens=10
            )


def _random_pair(vocab: int = 96, head_scale: float = 1.0, seed: int = 0):
    """A random 8-layer float64 target and a random EAGLE-3 draft (draft vocab 64)."""
    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        vocab, hidden_size=64, intermediate_size=96, max_position_embeddings=256
    )
    target = LlamaForCausalLM(cfg).eval().double()
    draft = (
        build_draft(DraftConfig.from_target_config(cfg, draft_vocab_size=64), target_model=target)
        .eval()
        .double()
    )
    with torch.no_grad():  # sharper distributions: a wrong acceptance rule shows clearly
        target.lm_head.weight.mul_(head_scale)
        draft.lm_head.weight.mul_(head_scale)
    return target, draft


@pytest.mark.slow
def test_sampling_mode_follows_the_target_distribution() -> None:
    """Rejection sampling: the distribution of the 2nd new token (the first one a draft
    proposal decides) equals the target's marginal Σ_f p(f) p(s | f), over many seeds."""
    target, draft = _random_pair(head_scale=6.0)
    p = torch.tensor([[3, 14, 15, 9]])
    v = target.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(target(p).logits[0, -1], -1)  # [V]
        both = torch.cat([p.expand(v, -1), torch.arange(v)[:, None]], dim=1)  # [V, 5]
        p2 = torch.softmax(target(both).logits[:, -1], -1)  # [V, V]: p(s | f)
    marginal = (p1[:, None] * p2).sum(0)  # [V]
    n = 400
    hits = torch.zeros(v, dtype=torch.float64)
    accepted = 0
    for seed in range(n):
        # 3 tokens: the round's first token is emitted with one after it, so its acceptance
        # is counted (a round cut after its first token counts 0 accepted)
        r = speculative_generate(target, draft, p, 3, steps=2, temperature=1.0, seed=seed)
        hits[r.tokens[1]] += 1
        accepted += r.accepted_per_forward[0]
    emp = hits / n
    tv = 0.5 * float((emp - marginal).abs().sum())
    noise = 0.5 * float((marginal * (1 - marginal) / n).sqrt().sum())  # ~E[TV] of n samples
    assert tv < 1.5 * noise + 0.02, f"TV {tv:.3f} vs sampling noise {noise:.3f}"
    assert 0 < accepted < n  # both the accept and the residual-resample branches ran


def test_bad_arguments() -> None:
    torch.manual_seed(0)
    cfg = tiny_llama_config(64)
    target = LlamaForCausalLM(cfg).eval()
    draft = build_draft(DraftConfig.from_target_config(cfg), target_model=target)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ConfigError, match="mode"):
        speculative_generate(target, draft, ids, 4, mode="beam")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tree drafting"):
        speculative_generate(target, draft, ids, 4, mode="tree", temperature=0.7)
    with pytest.raises(ConfigError, match="one"):
        speculative_generate(target, draft, torch.ones(2, 3, dtype=torch.long), 4)


def _steps_equal_to_ttt(target, draft, p: torch.Tensor, steps: int) -> int:
    """Generate from prompt p [1, n] recording the draft's calls; assert they give the TTT
    unroll's logits (step 0 at every verified index, chain step k rooted at r = n-1 while its
    proposals equal the greedy continuation). Returns how many chain steps were compared."""
    n = p.shape[1]
    x = torch.tensor([p[0].tolist() + greedy_generate(target, p, steps + 2)])  # [1, n+K+2]
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real_step = draft.step

    def recording_step(ids, hidden, positions, cache):  # type: ignore[no-untyped-def]
        h, logits = real_step(ids, hidden, positions, cache)
        calls.append((ids.clone(), positions.clone(), logits.detach().clone()))
        return h, logits

    draft.step = recording_step
    try:
        speculative_generate(target, draft, p, 1 + steps, steps=steps)
    finally:
        del draft.step
    states = capture_states(target, x, layer_ids=draft.cfg.aux_layer_ids)
    with torch.no_grad():
        ttt = [lg for _h, lg in draft.ttt_steps(x, draft.init_hidden(states), steps)]
    ids0, pos0, logits0 = calls[0]  # the extend over the prompt: entries t = 0..n-1
    assert torch.equal(ids0, x[:, 1 : n + 1]) and torch.equal(pos0[0], torch.arange(n))
    torch.testing.assert_close(logits0, ttt[0][:, :n], rtol=1e-4, atol=1e-5)
    compared = 0
    for k in range(1, steps):
        ids_k, pos_k, logits_k = calls[k]  # chain step k rooted at r = n-1
        assert pos_k.item() == n - 1 + k
        if not torch.equal(ids_k[0], x[0, n + k : n + k + 1]):
            break  # the chain left the greedy path: training has no matching step
        torch.testing.assert_close(logits_k[:, 0], ttt[k][:, n - 1], rtol=1e-4, atol=1e-5)
        compared += 1
    return compared


@pytest.mark.slow
def test_drafting_inside_generation_matches_the_ttt_unroll(small, trained_draft) -> None:
    """The draft calls speculative_generate makes (recorded, not replaced) give the logits
    the TTT training unroll gives for the same tokens, on the training prompts (where the
    trained draft follows the greedy path, so later chain steps are compared too)."""
    target, tok = small
    compared = sum(
        _steps_equal_to_ttt(target, trained_draft, torch.tensor([tok.encode(t)[:3]]), 4)
        for t in CODE
    )
    assert compared >= 2, "the trained draft's chain should follow greedy for a few steps"


@pytest.mark.slow
def test_whole_generation_acceptance_equals_the_training_forward(small, trained_draft) -> None:
    """Every round of a greedy chain generation (rejected rounds, cache crops, re-extends,
    the stop) accepts exactly what the TTT training forward predicts on the same tokens:
    the round rooted at entry r accepts the longest run of steps k with
    argmax(ttt[k][r]) == x[r+2+k], cut at the tokens left to emit."""
    target, tok = small
    draft, steps, n_new = trained_draft, 5, 24
    for text in HELDOUT[:3] + CODE[:3]:
        p = _prompts(tok, [text])[0]
        n = p.shape[1]
        r = speculative_generate(target, draft, p, n_new, steps=steps)
        x = torch.tensor([p[0].tolist() + r.tokens])  # [1, n + n_new]
        states = capture_states(target, x, layer_ids=draft.cfg.aux_layer_ids)
        with torch.no_grad():
            ttt = [lg for _h, lg in draft.ttt_steps(x, draft.init_hidden(states), steps)]
        pred = [draft.to_target_ids(lg[0].argmax(-1)) for lg in ttt]  # K x [n + n_new]
        want: list[int] = []
        root = n - 1  # the prefill emitted x[n]; the first chain is rooted at entry n-1
        while root + 2 < x.shape[1]:
            a = 0
            while a < steps and root + 2 + a < x.shape[1] and pred[a][root] == x[0, root + 2 + a]:
                a += 1
            want.append(min(a, x.shape[1] - (root + 2) - 1))  # the stop: emitted - 1
            root += a + 1
        assert r.accepted_per_forward == want, text
