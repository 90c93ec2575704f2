"""Hidden-state capture: layer-id convention, hooks vs output_hidden_states, KV cache."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from eagle_core.capture import (
    HiddenCapture,
    capture_states,
    default_aux_layer_ids,
    find_decoder_layers,
    target_head_weight,
    validate_layer_ids,
)
from eagle_core.errors import ConfigError, ModelMismatchError

N = 8


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(80, num_hidden_layers=N)).eval()


def test_default_ids() -> None:
    assert default_aux_layer_ids(8) == (1, 3, 4)
    assert default_aux_layer_ids(32) == (1, 15, 28)  # Llama-3.1-8B: the EAGLE-3 ids
    with pytest.raises(ConfigError, match="aux_layer_ids"):
        default_aux_layer_ids(4)


def test_ids_are_validated() -> None:
    assert validate_layer_ids([0, 7], 8) == (0, 7)
    with pytest.raises(ConfigError, match="out of range"):
        validate_layer_ids([1, 8], 8)
    with pytest.raises(ConfigError, match="repeat"):
        validate_layer_ids([1, 1], 8)
    with pytest.raises(ConfigError):
        validate_layer_ids([], 8)


def test_capture_equals_output_hidden_states(target: LlamaForCausalLM) -> None:
    """Decoder-layer outputs (1, N//2-1, N-4) == output_hidden_states[2, N//2, N-3]."""
    x = torch.randint(0, 80, (2, 9))
    states = capture_states(target, x)
    with torch.no_grad():
        out = target(x, output_hidden_states=True)
    hs = out.hidden_states
    want = torch.cat([hs[2], hs[N // 2], hs[N - 3]], dim=-1)
    assert states.aux.shape == (2, 9, 3 * 32)
    torch.testing.assert_close(states.aux, want, rtol=0, atol=0)
    torch.testing.assert_close(states.last, hs[-1], rtol=0, atol=0)  # post final norm
    # the last state is exactly what the lm_head sees
    logits = states.last @ target_head_weight(target).T
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


def test_hooks_equal_a_manual_forward(target: LlamaForCausalLM) -> None:
    x = torch.randint(0, 80, (1, 7))
    ids = (0, 2, 5)
    states = capture_states(target, x, layer_ids=ids)
    with torch.no_grad():
        base = target.model
        h = base.embed_tokens(x)
        pos = torch.arange(7)[None]
        pe = base.rotary_emb(h, pos)
        outs = []
        for layer in base.layers:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
        last = base.norm(h)
    torch.testing.assert_close(states.aux, torch.cat([outs[i] for i in ids], -1))
    torch.testing.assert_close(states.last, last)


def test_capture_with_kv_cache(target: LlamaForCausalLM) -> None:
    """Incremental forwards (past_key_values) give the states of the new tokens only."""
    x = torch.randint(0, 80, (1, 10))
    full = capture_states(target, x)
    before = len(target.model.layers[1]._forward_hooks)
    with torch.no_grad(), HiddenCapture(target) as cap:
        out = target(x[:, :6], use_cache=True)
        first = cap.states()
        target(x[:, 6:], past_key_values=out.past_key_values, use_cache=True)
        second = cap.states()
    assert first.aux.shape[1] == 6 and second.aux.shape[1] == 4
    torch.testing.assert_close(first.aux, full.aux[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.aux, full.aux[:, 6:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.last, full.last[:, 6:], rtol=1e-5, atol=1e-5)
    assert len(target.model.layers[1]._forward_hooks) == before  # ours removed on exit


def test_padding_keeps_rows_exact(target: LlamaForCausalLM) -> None:
    """Right padding: a sample's states equal those of its unpadded forward."""
    a, b = torch.randint(0, 80, (1, 9)), torch.randint(0, 80, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :5] = a[0], b[0]
    att = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    both = capture_states(target, batch, att)
    alone = capture_states(target, b)
    torch.testing.assert_close(both.aux[1:, :5], alone.aux, rtol=1e-5, atol=1e-5)


def test_other_architecture_qwen2() -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    x = torch.randint(0, 50, (1, 5))
    states = capture_states(model, x)
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states.aux[..., :32], hs[2], rtol=0, atol=0)
    torch.testing.assert_close(states.last, hs[-1], rtol=0, atol=0)


def test_no_decoder_layers_is_a_clear_error() -> None:
    with pytest.raises(ModelMismatchError, match="decoder layers"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_states_before_a_forward_is_a_clear_error(target: LlamaForCausalLM) -> None:
    with HiddenCapture(target) as cap, pytest.raises(ModelMismatchError, match="did not fire"):
        cap.states()
