"""Draft models: exported key names and shapes, config derivation, RoPE types, vocab map."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eagle_core.capture import TargetStates
from eagle_core.draft import DraftConfig, DraftKVCache, Eagle1Draft, Eagle3Draft, build_draft
from eagle_core.errors import ConfigError, ModelMismatchError

V, H, FF, HQ, HKV, D = 100, 32, 80, 4, 2, 16  # head_dim 16 != H / heads (= 8): taken from config


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=8,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def test_eagle3_keys_and_shapes_are_the_export_layout(target: LlamaForCausalLM) -> None:
    vd = 40
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=vd)
    sd = build_draft(cfg, target).state_dict()
    want = {
        "embed_tokens.weight": (V, H),
        "fc.weight": (H, 3 * H),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (HQ * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": (HKV * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (HKV * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, HQ * D),
        "midlayer.mlp.gate_proj.weight": (FF, H),
        "midlayer.mlp.up_proj.weight": (FF, H),
        "midlayer.mlp.down_proj.weight": (H, FF),
        "norm.weight": (H,),
        "lm_head.weight": (vd, H),
        "d2t": (vd,),
        "t2d": (V,),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool


def test_eagle1_keys_and_frozen_target_parts(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, kind="eagle1")
    draft = build_draft(cfg, target)
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert shapes == {
        "embed_tokens.weight": (V, H),
        "fc.weight": (H, 2 * H),
        "fc.bias": (H,),
        "layers.0.input_layernorm.weight": (H,),
        "layers.0.self_attn.q_proj.weight": (HQ * D, H),
        "layers.0.self_attn.k_proj.weight": (HKV * D, H),
        "layers.0.self_attn.v_proj.weight": (HKV * D, H),
        "layers.0.self_attn.o_proj.weight": (H, HQ * D),
        "layers.0.post_attention_layernorm.weight": (H,),
        "layers.0.mlp.gate_proj.weight": (FF, H),
        "layers.0.mlp.up_proj.weight": (FF, H),
        "layers.0.mlp.down_proj.weight": (H, FF),
        "lm_head.weight": (V, H),
    }
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    assert torch.equal(draft.embed_tokens.weight, target.model.embed_tokens.weight)
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trainable and "embed_tokens.weight" not in trainable
    assert "fc.weight" in trainable and "layers.0.input_layernorm.weight" not in trainable


def test_embeddings_copied_and_frozen(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    draft = build_draft(cfg, target)
    assert torch.equal(draft.embed_tokens.weight, target.model.embed_tokens.weight)
    assert not draft.embed_tokens.weight.requires_grad
    assert draft.lm_head.weight.requires_grad


def test_config_from_target(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads) == (H, D, HKV)
    assert cfg.aux_layer_ids == (1, 3, 4) and cfg.target_num_layers == 8
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_scaling is None
    assert DraftConfig.from_dict(cfg.to_dict()) == cfg
    small = DraftConfig.from_target_config(target.config, draft_vocab_size=40, intermediate_size=48)
    assert small.intermediate_size == 48
    with pytest.raises(ConfigError, match="unknown"):
        DraftConfig.from_target_config(target.config, draft_vocab_size=40, bogus=1)
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        DraftConfig.from_target_config(target.config, kind="eagle1", draft_vocab_size=40)
    with pytest.raises(ConfigError, match="out of range"):
        DraftConfig.from_target_config(target.config, aux_layer_ids=(1, 2, 9))


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_types(rope: dict) -> None:
    tcfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=8,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        max_position_embeddings=256,
        rope_parameters={**rope, "rope_theta": 50000.0},
    )
    cfg = DraftConfig.from_target_config(tcfg, draft_vocab_size=V)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling["rope_type"] == rope["rope_type"]
    draft = build_draft(cfg).eval()
    target_rope = LlamaForCausalLM(tcfg).model.rotary_emb
    x = torch.zeros(1, 3, H)
    pos = torch.tensor([[0, 100, 200]])
    for a, b in zip(draft.rotary_emb(x, pos), target_rope(x, pos), strict=True):
        torch.testing.assert_close(a, b)  # the target's own RoPE, scaling included
    # a legacy config (transformers 4.x attributes) maps to the same fields
    legacy = SimpleNamespace(
        **{
            k: getattr(tcfg, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "max_position_embeddings",
                "rms_norm_eps",
            )
        },
        rope_theta=50000.0,
        rope_scaling={**rope},
        hidden_act="silu",
        head_dim=None,
    )
    assert DraftConfig.from_target_config(legacy, draft_vocab_size=V) == cfg


def test_vocab_map_and_target_ids(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=4)
    target_ids = torch.tensor([3, 10, 11, 50])
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[target_ids] = True
    vmap = SimpleNamespace(d2t=target_ids - torch.arange(4), t2d=t2d)
    draft = build_draft(cfg, target, vocab_map=vmap)
    assert torch.equal(draft.to_target_ids(torch.tensor([0, 3, 1])), torch.tensor([3, 50, 10]))
    assert torch.equal(draft.draft_target_ids, target_ids)
    bad = SimpleNamespace(d2t=torch.zeros(4, dtype=torch.long), t2d=t2d)
    with pytest.raises(ModelMismatchError, match="disagree"):
        build_draft(cfg, target, vocab_map=bad)
    short = SimpleNamespace(d2t=torch.zeros(3, dtype=torch.long), t2d=t2d)
    with pytest.raises(ModelMismatchError, match="Vd=4"):
        build_draft(cfg, target, vocab_map=short)
    e1 = build_draft(DraftConfig.from_target_config(target.config, kind="eagle1"))
    assert torch.equal(e1.to_target_ids(torch.tensor([5, 7])), torch.tensor([5, 7]))


def test_eagle3_attention_input_is_embeddings_first(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    draft = build_draft(cfg, target).eval()
    assert isinstance(draft, Eagle3Draft)
    seen = {}
    handle = draft.midlayer.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, inp: seen.__setitem__("x", inp[0])
    )
    ids = torch.tensor([[5, 6, 7]])
    h = torch.randn(1, 3, H)
    with torch.no_grad():
        draft.step(ids, h, torch.arange(3)[None], DraftKVCache())
        emb = draft.midlayer.input_layernorm(draft.embed_tokens(ids))
        hid = draft.midlayer.hidden_norm(h)
    handle.remove()
    torch.testing.assert_close(seen["x"], torch.cat([emb, hid], dim=-1))


def test_eagle1_fc_input_is_embeddings_first(target: LlamaForCausalLM) -> None:
    draft = build_draft(DraftConfig.from_target_config(target.config, kind="eagle1"), target)
    assert isinstance(draft, Eagle1Draft)
    seen = {}
    handle = draft.fc.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("x", inp[0]))
    ids, h = torch.tensor([[1, 2]]), torch.randn(1, 2, H)
    with torch.no_grad():
        draft.step(ids, h, torch.arange(2)[None], DraftKVCache())
    handle.remove()
    torch.testing.assert_close(seen["x"], torch.cat([draft.embed_tokens(ids), h], dim=-1))


def test_wrong_hidden_width_is_refused(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    draft = build_draft(cfg, target)
    states = TargetStates(aux=torch.randn(1, 3, 2 * H), last=torch.randn(1, 3, H))
    with pytest.raises(ModelMismatchError, match="aux states"):
        draft.init_hidden(states)
    with pytest.raises(ModelMismatchError, match="hidden"):
        draft.step(
            torch.tensor([[1, 2]]), torch.randn(1, 3, H), torch.arange(2)[None], DraftKVCache()
        )
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V + 1,
            hidden_size=H,
            num_hidden_layers=8,
            num_attention_heads=HQ,
            intermediate_size=FF,
        )
    )
    with pytest.raises(ModelMismatchError, match="embeddings"):
        build_draft(cfg, other)


def test_bf16_cast_keeps_rope_in_fp32(target: LlamaForCausalLM) -> None:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=40)
    draft = build_draft(cfg, target).to(torch.bfloat16)
    assert draft.fc.weight.dtype == torch.bfloat16
    assert draft.rotary_emb.inv_freq.dtype == torch.float32  # not rounded by the cast
    assert not any("rotary" in k or "inv_freq" in k for k in draft.state_dict())
    x = torch.tensor([[1, 2, 3]])
    h, logits = draft.step(x, torch.randn(1, 3, H), torch.tensor([[0, 1000, 2000]]), DraftKVCache())
    assert h.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_eagle1_layer0_has_no_input_norm(target: LlamaForCausalLM) -> None:
    """Reference EAGLE-1: layer 0 feeds fc's output to attention un-normed."""
    draft = build_draft(DraftConfig.from_target_config(target.config, kind="eagle1"), target)
    layer = draft.layers[0]
    assert not layer.input_layernorm.weight.requires_grad
    seen = {}
    handle = layer.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, inp: seen.__setitem__("x", inp[0])
    )
    ids, h = torch.tensor([[1, 2]]), torch.randn(1, 2, H)
    with torch.no_grad():
        draft.step(ids, h, torch.arange(2)[None], DraftKVCache())
        fc_out = draft.fc(torch.cat([draft.embed_tokens(ids), h], dim=-1))
    handle.remove()
    torch.testing.assert_close(seen["x"], fc_out)
