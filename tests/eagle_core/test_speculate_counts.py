"""Counted events stop at the stop: a round cut by max_new_tokens (or EOS) counts only the
proposals it emitted, so τ = tokens emitted / verify forwards exactly (speculate and the
evaluator's report)."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

from eagle_core.draft import DraftConfig, build_draft
from eagle_core.evaluate import EvalConfig, EvalPrompt, measure
from eagle_core.speculate import greedy_generate, speculative_generate

V, STEPS = 64, 5


def _always_zero_pair() -> tuple[LlamaForCausalLM, torch.nn.Module]:
    """A target whose greedy token is always 0 and a draft that always proposes 0.

    Zeroed final norms make every logit 0; argmax takes the first index (target id 0, draft
    id 0 -> target id 0 with the default vocab map). Every chain is accepted in full.
    """
    torch.manual_seed(0)
    cfg = tiny_llama_config(V)  # any shape: zeroed final norms fix every logit
    target = LlamaForCausalLM(cfg).eval()
    draft = build_draft(
        DraftConfig.from_target_config(cfg, draft_vocab_size=32), target_model=target
    ).eval()
    with torch.no_grad():
        target.model.norm.weight.zero_()
        draft.norm.weight.zero_()
    return target, draft


@pytest.mark.parametrize(
    ("max_new", "want_accepted"),
    [
        (7, [5]),  # 1 (prefill) + 6: the round fits exactly
        (8, [5, 0]),  # the 2nd round verifies 5 proposals but emits 1 token: 0 accepted
        (10, [5, 2]),  # ... emits 3 tokens: 2 accepted, the 3rd is its "+1"
    ],
)
def test_round_cut_by_max_new_tokens_counts_only_emitted(
    max_new: int, want_accepted: list[int]
) -> None:
    target, draft = _always_zero_pair()
    p = torch.tensor([[5, 9, 3]])
    assert greedy_generate(target, p, max_new) == [0] * max_new
    r = speculative_generate(target, draft, p, max_new, steps=STEPS)
    assert r.tokens == [0] * max_new
    assert r.accepted_per_forward == want_accepted
    assert len(r.tokens) == 1 + sum(a + 1 for a in r.accepted_per_forward)
    assert r.tau == pytest.approx((max_new - 1) / len(want_accepted))
    # every round proposed 5; the cut round's unemitted positions are not "accepted"
    assert r.per_position_proposed == [len(want_accepted)] * STEPS
    assert r.per_position_accept_counts == [sum(a > k for a in want_accepted) for k in range(STEPS)]


def test_round_cut_by_eos_counts_only_up_to_eos() -> None:
    target, draft = _always_zero_pair()
    p = torch.tensor([[5, 9, 3]])
    # EOS = 0 is the very first token: no round at all
    r = speculative_generate(target, draft, p, 20, steps=STEPS, eos_token_id=0)
    assert r.tokens == [0] and r.accepted_per_forward == []
    assert r.per_position_accept_counts == [0] * STEPS


def test_evaluator_tau_equals_emitted_per_verify_forward() -> None:
    """The report's τ and per-position counts agree with the tokens actually emitted."""
    target, draft = _always_zero_pair()
    prompts = [
        EvalPrompt("a", "chat", (5, 9, 3)),
        EvalPrompt("b", "fim", (1, 2, 3, 4)),
    ]
    cfg = EvalConfig(max_new_tokens=10, steps=STEPS, max_prompts=2)
    report = measure(target, draft, prompts, cfg)
    for kind in ("chat", "fim"):
        s = report["kinds"][kind]
        assert s["emitted_tokens"] == 10 and s["lossless"] == 1
        # 1 prefill token + (accepted + 1) per verify forward = every emitted token
        assert s["emitted_tokens"] == s["prompts"] + s["verify_forwards"] + s["accepted_tokens"]
        assert s["verify_forwards"] == 2 and s["accepted_tokens"] == 7  # [5, 2]
        assert s["tau"] == pytest.approx(4.5)  # 9 tokens after the prefill / 2 forwards
        assert s["accept_counts_per_position"] == [2, 2, 1, 1, 1]
