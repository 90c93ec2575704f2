"""Export layouts (FORMATS.md), determinism, the loader, and refusals."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from eagle_core.capture import TargetStates
from eagle_core.draft import DraftConfig, DraftKVCache, build_draft
from eagle_core.errors import ArtifactError, ConfigError, ModelMismatchError
from eagle_core.export import (
    ExportConfig,
    export,
    export_state_dict,
    load_exported_draft,
)
from storage import ArtifactStore, StageRef

H, N_LAYERS, V, VD = 64, 8, 320, 200


def _target(seed: int = 0, hidden: int = H, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg).eval()


def _draft(target: LlamaForCausalLM, kind: str = "eagle3", seed: int = 1):
    torch.manual_seed(seed)
    vd = VD if kind == "eagle3" else None
    cfg = DraftConfig.from_target_config(target.config, kind=kind, draft_vocab_size=vd)
    draft = build_draft(cfg, target_model=target)
    if kind == "eagle3":  # a non-trivial vocab map: every other target id, then the rest
        ids = torch.cat([torch.arange(0, V, 2), torch.arange(1, V, 2)])[:VD].sort().values
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[ids] = True
        draft.set_vocab_map(ids - torch.arange(VD), t2d)
        with torch.no_grad():  # norms are 1 at init: make them distinguishable
            for p in draft.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    return draft.eval()


EAGLE3_KEYS = {
    "fc.weight": ([H, 3 * H], torch.bfloat16),
    "midlayer.input_layernorm.weight": ([H], torch.bfloat16),
    "midlayer.hidden_norm.weight": ([H], torch.bfloat16),
    "midlayer.post_attention_layernorm.weight": ([H], torch.bfloat16),
    "midlayer.self_attn.q_proj.weight": ([4 * 16, 2 * H], torch.bfloat16),
    "midlayer.self_attn.k_proj.weight": ([2 * 16, 2 * H], torch.bfloat16),
    "midlayer.self_attn.v_proj.weight": ([2 * 16, 2 * H], torch.bfloat16),
    "midlayer.self_attn.o_proj.weight": ([H, 4 * 16], torch.bfloat16),
    "midlayer.mlp.gate_proj.weight": ([128, H], torch.bfloat16),
    "midlayer.mlp.up_proj.weight": ([128, H], torch.bfloat16),
    "midlayer.mlp.down_proj.weight": ([H, 128], torch.bfloat16),
    "norm.weight": ([H], torch.bfloat16),
    "lm_head.weight": ([VD, H], torch.bfloat16),
    "d2t": ([VD], torch.int64),
    "t2d": ([V], torch.bool),
}


def _read(out_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(out_dir, "config.json")) as fh:
        config = json.load(fh)
    with safe_open(os.path.join(out_dir, "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    return config, tensors


def test_eagle3_layout_keys_shapes_dtypes_and_config(tmp_path) -> None:
    target = _target()
    draft = _draft(target)
    out = str(tmp_path / "e3")
    export_state_dict(draft.state_dict(), draft.cfg, target.config, ExportConfig(target="t"), out)
    config, tensors = _read(out)
    assert {k: (list(t.shape), t.dtype) for k, t in tensors.items()} == EAGLE3_KEYS
    assert torch.equal(tensors["d2t"], draft.d2t) and torch.equal(tensors["t2d"], draft.t2d)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    expected = {
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_hidden_layers": 1,
        "max_position_embeddings": 512,
        "vocab_size": V,
        "draft_vocab_size": VD,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "target_hidden_size": H,
        "rope_theta": 10000.0,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(target.config.rms_norm_eps)
    assert "rope_scaling" not in config  # the target has none
    # SGLang convention (decoder-layer output ids) in eagle_config; vLLM's (+1) at top level
    assert config["eagle_config"] == {
        "eagle_aux_hidden_state_layer_ids": [1, 3, 4],
        "use_aux_hidden_state": True,
    }
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    from transformers import AutoConfig  # what SGLang and vLLM parse config.json with

    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "LlamaConfig" and hf.num_hidden_layers == 1
    assert hf.draft_vocab_size == VD and hf.eagle_config["use_aux_hidden_state"] is True
    readme = (tmp_path / "e3" / "README.md").read_text()
    assert "[1, 3, 4]" in readme and "not measured" in readme


def test_embeddings_only_on_request_and_dtype_choice(tmp_path) -> None:
    target = _target()
    draft = _draft(target)
    cfg = ExportConfig(include_embeddings=True, dtype="float16")
    export_state_dict(draft.state_dict(), draft.cfg, None, cfg, str(tmp_path))
    config, tensors = _read(str(tmp_path))
    assert list(tensors["embed_tokens.weight"].shape) == [V, H]
    assert tensors["fc.weight"].dtype == torch.float16
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert config["torch_dtype"] == "float16"


def test_speculators_layout(tmp_path) -> None:
    target = _target()
    draft = _draft(target)
    cfg = ExportConfig(format="speculators", target="org/target", speculative_tokens=3)
    export_state_dict(draft.state_dict(), draft.cfg, target.config, cfg, str(tmp_path))
    config, tensors = _read(str(tmp_path))
    want = {k.replace("midlayer.", "layers.0."): v for k, v in EAGLE3_KEYS.items()}
    # embeddings by default in this layout: speculators' own loader has no other source
    want["embed_tokens.weight"] = ([V, H], torch.bfloat16)
    assert {k: (list(t.shape), t.dtype) for k, t in tensors.items()} == want
    assert torch.equal(tensors["embed_tokens.weight"], draft.embed_tokens.weight.bfloat16())
    assert config["architectures"] == ["Eagle3Speculator"]
    assert config["speculators_model_type"] == "eagle3"
    sc = config["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"][0]["proposal_type"] == "greedy"
    assert sc["proposal_methods"][0]["speculative_tokens"] == 3
    assert sc["verifier"] == {"name_or_path": "org/target", "architectures": ["LlamaForCausalLM"]}
    layer = config["transformer_layer_config"]
    assert layer["num_hidden_layers"] == 1 and layer["vocab_size"] == V
    assert config["draft_vocab_size"] == VD and config["target_hidden_size"] == H
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    flags = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
    assert {f: config[f] for f in flags} == dict.fromkeys(flags, False)


def test_include_embeddings_defaults_per_layout() -> None:
    assert ExportConfig(format="speculators").include_embeddings is True
    assert ExportConfig(format="eagle3").include_embeddings is False
    assert ExportConfig(format="eagle1").include_embeddings is False
    assert ExportConfig(format="speculators", include_embeddings=False).include_embeddings is False
    assert ExportConfig(format="eagle3", include_embeddings=True).include_embeddings is True
    # the resolved bool is the key's: the eagle3 default keys as it did before (False)
    assert ExportConfig() == ExportConfig(include_embeddings=False)


def test_speculators_verifier_is_the_target_model_dir(
    tmp_path, small_target_dir, monkeypatch
) -> None:
    """The verifier is written as the directory holding the target's config.json: an artifact
    URL or artifact dir becomes its model/ (an artifact root has no config.json, and vLLM /
    speculators load the verifier from this path); Hub names stay as given."""
    import shutil

    from eagle_core.export import verifier_path

    store = ArtifactStore(str(tmp_path / "store"))
    with store.publish("build_demo_target", "t") as w:
        w.add_dir(small_target_dir, prefix="model")
    url = store.url("build_demo_target", "t")
    model_dir = os.path.join(store.path("build_demo_target", "t"), "model")
    assert verifier_path(url) == model_dir
    assert verifier_path(store.path("build_demo_target", "t")) == model_dir
    assert os.path.isfile(os.path.join(verifier_path(url), "config.json"))
    local = tmp_path / "target"
    shutil.copytree(small_target_dir, local)
    monkeypatch.chdir(tmp_path)
    assert verifier_path("target") == str(local)  # relative: made absolute
    assert verifier_path("org/target") == "org/target"
    target = _target()
    draft = _draft(target)
    cfg = ExportConfig(format="speculators", target=url)
    export_state_dict(draft.state_dict(), draft.cfg, target.config, cfg, str(tmp_path / "e"))
    config, _ = _read(str(tmp_path / "e"))
    assert config["speculators_config"]["verifier"]["name_or_path"] == model_dir
    assert config["eagle_pipeline"]["target"] == url  # our own block keeps the reference


def test_eagle1_layout(tmp_path) -> None:
    target = _target()
    draft = _draft(target, kind="eagle1")
    cfg = ExportConfig(format="eagle1", dtype="float32")
    export_state_dict(draft.state_dict(), draft.cfg, target.config, cfg, str(tmp_path))
    config, tensors = _read(str(tmp_path))
    layer = {  # no input_layernorm: the reference EAGLE-1 layer 0 has none
        "post_attention_layernorm.weight": [H],
        "self_attn.q_proj.weight": [64, H],
        "self_attn.k_proj.weight": [32, H],
        "self_attn.v_proj.weight": [32, H],
        "self_attn.o_proj.weight": [H, 64],
        "mlp.gate_proj.weight": [128, H],
        "mlp.up_proj.weight": [128, H],
        "mlp.down_proj.weight": [H, 128],
    }
    want = {"fc.weight": [H, 2 * H], "fc.bias": [H]}
    want.update({f"layers.0.{k}": v for k, v in layer.items()})
    assert {k: list(t.shape) for k, t in tensors.items()} == want
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == V
    assert config["hidden_size"] == H
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(tmp_path))  # the reference EAGLE code reads it so
    assert hf.num_hidden_layers == 1 and hf.vocab_size == V and hf.bias is True


def test_export_is_deterministic(tmp_path) -> None:
    target = _target()
    draft = _draft(target)
    digests = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        export_state_dict(draft.state_dict(), draft.cfg, None, ExportConfig(target="t"), out)
        digests.append(
            {
                f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
                for f in sorted(os.listdir(out))
            }
        )
    assert digests[0] == digests[1]


def _draft_outputs(draft, target: LlamaForCausalLM, ids: torch.Tensor):
    from eagle_core.capture import capture_states

    layer_ids = draft.cfg.aux_layer_ids or None
    states = capture_states(target, ids, layer_ids=layer_ids or (1, 3, 4))
    if not draft.cfg.aux_layer_ids:
        states = TargetStates(aux=states.aux, last=states.last)
    hidden = draft.init_hidden(states)
    pos = torch.arange(ids.shape[1])[None]
    cache = DraftKVCache()
    return draft.step(ids[:, 1:], hidden[:, :-1], pos[:, :-1], cache)


@pytest.mark.parametrize("fmt", ["eagle3", "speculators", "eagle1"])
def test_export_load_roundtrip_identical_logits(tmp_path, fmt: str) -> None:
    target = _target()
    draft = _draft(target, kind="eagle1" if fmt == "eagle1" else "eagle3")
    cfg = ExportConfig(format=fmt, dtype="float32", target="t")
    export_state_dict(draft.state_dict(), draft.cfg, target.config, cfg, str(tmp_path))
    loaded = load_exported_draft(str(tmp_path), target)
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h0, l0 = _draft_outputs(draft, target, ids)
        h1, l1 = _draft_outputs(loaded, target, ids)
    assert torch.equal(l0, l1) and torch.equal(h0, h1)
    if fmt != "eagle1":
        assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)


def test_loader_refuses_a_mismatched_target(tmp_path) -> None:
    target = _target()
    draft = _draft(target)
    export_state_dict(draft.state_dict(), draft.cfg, None, ExportConfig(), str(tmp_path))
    with pytest.raises(ModelMismatchError, match="hidden size 64 vs target 96"):
        load_exported_draft(str(tmp_path), _target(hidden=96))
    with pytest.raises(ModelMismatchError, match="vocab size 320 vs target 400"):
        load_exported_draft(str(tmp_path), _target(vocab=400))


def test_export_refuses_wrong_kind_and_bad_shapes(tmp_path) -> None:
    target = _target()
    draft = _draft(target)
    with pytest.raises(ConfigError, match="needs an eagle1 draft"):
        export_state_dict(
            draft.state_dict(),
            draft.cfg,
            target.config,
            ExportConfig(format="eagle1"),
            str(tmp_path),
        )
    state = dict(draft.state_dict())
    state["fc.weight"] = state["fc.weight"][:, :H]
    with pytest.raises(ModelMismatchError, match="fc.weight"):
        export_state_dict(state, draft.cfg, None, ExportConfig(), str(tmp_path))
    with pytest.raises(ConfigError, match="export.dtype"):
        ExportConfig(dtype="int8")  # type: ignore[arg-type]


def _publish_run(store: ArtifactStore, draft, complete: bool = True) -> StageRef:
    from safetensors.torch import save_file

    key = "run" + ("ok" if complete else "partial")
    with store.publish("train", key) as w:
        if complete:
            w.write_file(
                "final/draft.safetensors", lambda p: save_file(dict(draft.state_dict()), p)
            )
        w.write_json("final/draft_config.json", draft.cfg.to_dict())
        w.meta.update(target="demo")
    return store.ref("train", key)


def test_export_stage_publishes_and_caches(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    target = _target()
    draft = _draft(target)
    run = _publish_run(store, draft)
    ref = export(store, run, ExportConfig(target="demo-target"))
    files = store.list_files(ref)
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert store.manifest(ref.stage, ref.key).meta["aux_layer_ids"] == [1, 3, 4]
    again = export(store, run, ExportConfig(target="demo-target"))
    assert again.key == ref.key
    loaded = load_exported_draft(store.local_dir(ref, str(tmp_path / "x")), target)
    # bf16 export: weights equal the bf16 rounding of the trained ones
    assert torch.equal(loaded.fc.weight, draft.fc.weight.to(torch.bfloat16).float())


def test_export_refuses_incomplete_runs(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    target = _target()
    draft = _draft(target)
    partial = _publish_run(store, draft, complete=False)
    with pytest.raises(ArtifactError, match="final/draft.safetensors"):
        export(store, partial, ExportConfig(target="t"))
    unfinished = StageRef(stage="train", key="nomanifest", url=store.url("train", "nomanifest"))
    with pytest.raises(ArtifactError, match="not finished"):
        export(store, unfinished, ExportConfig(target="t"))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_trained_run_exports_from_final_and_deepspeed_checkpoint(tmp_path, zero_stage: int):
    """A real (inline DeepSpeed) training run -> export from final/ and from the step
    checkpoint -> identical weights -> lossless speculative decoding with the loaded draft."""
    from train_helpers import make_samples, make_tiny_target, publish_hidden, publish_tokens

    from eagle_core.models import load_target
    from eagle_core.speculate import greedy_generate, speculative_generate
    from eagle_core.train import TrainConfig, run_training

    target_dir = make_tiny_target(str(tmp_path / "target"))
    store = ArtifactStore(str(tmp_path / "store"))
    tokens = publish_tokens(store, make_samples(24, seed=5))
    hidden = publish_hidden(store, tokens, target_dir)
    cfg = TrainConfig(
        store=store.root,
        target=target_dir,
        data=(hidden.url,),
        steps=8,
        batch_size=4,
        lr=1e-2,
        ttt_steps=3,
        heldout_fraction=0.2,
        seed=3,
        zero_stage=zero_stage,
    )
    run = run_training(store, cfg)
    final = export(store, run, ExportConfig(dtype="float32", target=target_dir))
    step = export(
        store, run, ExportConfig(dtype="float32", target=target_dir, checkpoint="step-00000008")
    )
    _, a = _read(store.local_dir(final, str(tmp_path / "a")))
    _, b = _read(store.local_dir(step, str(tmp_path / "b")))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    readme = store.read_bytes(final, "README.md").decode()
    assert hidden.url in readme and "training steps: 8" in readme
    target = load_target(target_dir)
    draft = load_exported_draft(store.local_dir(final, str(tmp_path / "c")), target)
    for start in (3, 40):
        p = torch.tensor([[(start + 2 * j) % 96 for j in range(6)]])
        r = speculative_generate(target, draft, p, 10, steps=3)
        assert r.tokens == greedy_generate(target, p, 10)
