"""Train-time test == test time: the TTT forward equals serving-style chain drafting.

For a random small target and a random draft, for every index t and step k, the training
forward's step-k logits at t equal the k-th step of a chain rooted at t that is fed the
ground-truth tokens through `draft.step()` and a `DraftKVCache` (what the evaluator does).
"""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

from eagle_core.capture import capture_states
from eagle_core.draft import DraftConfig, DraftKVCache, build_draft

V, T, K = 96, 12, 5


def _target(rope: dict | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_llama_config(V, max_position_embeddings=64, rope_parameters=rope)
    return LlamaForCausalLM(cfg).eval()


def _chain_logits(draft, x: torch.Tensor, hidden0: torch.Tensor, t: int, k_max: int):
    """Logits [k_max+1][B, Vd] of a chain rooted at t, fed the ground-truth tokens."""
    n = x.shape[1]
    cache = DraftKVCache()
    # verified prefix 0..t: input token x[j+1] with the target state at j, position j
    nxt = torch.zeros(x.shape[0], t + 1, dtype=torch.long)
    nxt[:, : min(t + 1, n - 1)] = x[:, 1 : t + 2]
    h, logits = draft.step(nxt, hidden0[:, : t + 1], torch.arange(t + 1)[None], cache)
    out = [logits[:, -1]]
    h = h[:, -1:]
    for k in range(1, k_max + 1):
        if t + 1 + k >= n:
            break
        pos = torch.full((x.shape[0], 1), t + k)
        h, logits = draft.step(x[:, t + 1 + k : t + 2 + k], h, pos, cache)
        out.append(logits[:, -1])
    assert cache.length == t + len(out)  # one cache entry per chain step beyond step 0
    return out


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
@pytest.mark.parametrize(
    "rope",
    [
        None,
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
    ids=["default-rope", "llama3-rope"],
)
def test_training_forward_equals_chain_drafting(kind: str, rope: dict | None) -> None:
    target = _target(rope)
    vd = V if kind == "eagle1" else 64
    cfg = DraftConfig.from_target_config(target.config, kind=kind, draft_vocab_size=vd)
    torch.manual_seed(1)
    draft = build_draft(cfg, target).eval()
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        hidden0 = draft.init_hidden(capture_states(target, x, layer_ids=cfg.aux_layer_ids or None))
        train = [lg for _, lg in draft.ttt_steps(x, hidden0, K)]
        checked = 0
        for t in range(T - 1):
            chain = _chain_logits(draft, x, hidden0, t, K - 1)
            for k, logits in enumerate(chain):
                torch.testing.assert_close(
                    train[k][:, t],
                    logits,
                    rtol=1e-4,
                    atol=1e-5,
                    msg=lambda m, t=t, k=k: f"step {k} at index {t}: {m}",
                )
                checked += 1
    assert checked == sum(min(K, T - 1 - t) for t in range(T - 1))


def test_shifted_hidden_breaks_the_equality() -> None:
    """The equality is sensitive: feeding the state of t-1 (off by one) is caught."""
    target = _target()
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=64)
    torch.manual_seed(1)
    draft = build_draft(cfg, target).eval()
    x = torch.randint(0, V, (1, T))
    with torch.no_grad():
        hidden0 = draft.init_hidden(capture_states(target, x, layer_ids=cfg.aux_layer_ids))
        shifted = torch.cat([hidden0[:, :1], hidden0[:, :-1]], dim=1)  # state of t-1 at t
        train = [lg for _, lg in draft.ttt_steps(x, shifted, 2)]
        chain = _chain_logits(draft, x, hidden0, 5, 1)
    assert not torch.allclose(train[0][:, 5], chain[0], atol=1e-3)
    assert not torch.allclose(train[1][:, 5], chain[1], atol=1e-3)


def test_cache_crop_rolls_back_a_chain() -> None:
    target = _target()
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=64)
    torch.manual_seed(1)
    draft = build_draft(cfg, target).eval()
    x = torch.randint(0, V, (1, T))
    with torch.no_grad():
        hidden0 = draft.init_hidden(capture_states(target, x, layer_ids=cfg.aux_layer_ids))
        cache = DraftKVCache()
        h, _ = draft.step(x[:, 1:6], hidden0[:, :5], torch.arange(5)[None], cache)
        first, _ = draft.step(torch.tensor([[7]]), h[:, -1:], torch.tensor([[5]]), cache)
        draft.step(torch.tensor([[8]]), first, torch.tensor([[6]]), cache)  # rejected later
        assert cache.length == 7
        cache.crop(5)
        again, _ = draft.step(torch.tensor([[7]]), h[:, -1:], torch.tensor([[5]]), cache)
        torch.testing.assert_close(again, first)
        with pytest.raises(ValueError, match="crop"):
            cache.crop(99)
