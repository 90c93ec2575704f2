"""eagle_core.models: target references, loading, config hashes (real files, real store)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig

from eagle_core.errors import ConfigError, ModelMismatchError
from eagle_core.models import (
    check_same_target,
    config_hash,
    load_target,
    load_tokenizer,
    resolve_model_dir,
)
from storage import ArtifactStore
from storage.errors import ArtifactError


def _publish_target(store: ArtifactStore, tok_dir: str, model_dir: str, key: str) -> str:
    with store.publish("build_demo_target", key, params={"test": key}) as w:
        w.add_dir(tok_dir, prefix="tokenizer")
        w.add_dir(model_dir, prefix="model")
    return store.url("build_demo_target", key)


def test_load_local_target_frozen_eval(small_target_dir: str) -> None:
    model = load_target(small_target_dir, dtype="bfloat16")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_target(small_target_dir).dtype == torch.float32


def test_bad_dtype_and_missing_path(small_target_dir: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_target(small_target_dir, dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="empty"):
        resolve_model_dir("  ")
    with pytest.raises(ConfigError, match="not a demo-target artifact"):
        resolve_model_dir("s3://bucket/some/where")


def test_hub_name_is_passed_through_and_fails_clearly_offline(monkeypatch) -> None:
    assert resolve_model_dir("someorg/some-model") == "someorg/some-model"
    assert resolve_model_dir("gpt2") == "gpt2"
    # the env var is read at import; the constant is what the hub client checks per call
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="someorg/no-such-model-eagle"):
        load_target("someorg/no-such-model-eagle")


def test_artifact_url_local_root(tmp_path, small_tokenizer_dir: str, small_target_dir: str):
    store = ArtifactStore(str(tmp_path / "store"))
    url = _publish_target(store, small_tokenizer_dir, small_target_dir, "k1")
    model_dir = resolve_model_dir(url)
    assert model_dir == os.path.join(url, "model")
    assert resolve_model_dir(url + "/", sub="tokenizer") == os.path.join(url, "tokenizer")
    # the artifact directory given as a plain path works the same way
    assert resolve_model_dir(url) == resolve_model_dir(os.path.relpath(url))
    tok = load_tokenizer(url)
    model = load_target(url)
    assert model.config.vocab_size == len(tok)
    assert config_hash(model) == config_hash(small_target_dir)


def test_artifact_url_without_manifest(tmp_path) -> None:
    url = str(tmp_path / "store" / "build_demo_target" / "missing")
    with pytest.raises(ArtifactError, match="no manifest"):
        resolve_model_dir(url)


def test_artifact_url_on_s3(s3_root: str, small_tokenizer_dir: str, small_target_dir: str):
    store = ArtifactStore(s3_root)
    url = _publish_target(store, small_tokenizer_dir, small_target_dir, "k2")
    assert url.startswith("s3://")
    local = resolve_model_dir(url)
    assert os.path.isfile(os.path.join(local, "model.safetensors"))
    model = load_target(url)
    ref = load_target(small_target_dir)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert len(load_tokenizer(url)) == model.config.vocab_size


def test_config_hash_stable_and_sensitive(small_target_dir: str, tmp_path) -> None:
    h = config_hash(load_target(small_target_dir))
    assert h == config_hash(load_target(small_target_dir, dtype="bfloat16"))
    assert h == config_hash(AutoConfig.from_pretrained(small_target_dir))
    with open(os.path.join(small_target_dir, "config.json")) as fh:
        raw = json.load(fh)
    assert h == config_hash(raw)
    assert h != config_hash({**raw, "num_hidden_layers": 7})
    rope = {**raw["rope_parameters"], "rope_theta": 500000.0}  # transformers 5 layout
    assert h != config_hash({**raw, "rope_parameters": rope})
    check_same_target(h, small_target_dir, "hidden shards")
    with pytest.raises(ModelMismatchError, match="hidden shards"):
        check_same_target(h, {**raw, "hidden_size": 128}, "hidden shards")


@pytest.mark.parametrize("model_type", ["llama", "eagle-test-custom"])
def test_remote_code_is_not_run_by_default(tmp_path, small_target_dir: str, model_type: str):
    """A repo with its own modeling code: never imported unless trust_remote_code=True.

    A known model_type falls back to the library's class; an unknown one is refused.
    """
    repo = tmp_path / "custom"
    shutil.copytree(small_target_dir, repo)
    marker = tmp_path / "code_ran"
    (repo / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaForCausalLM\n"
        "from .configuration_custom import CustomConfig\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    (repo / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n"
        f"    model_type = {model_type!r}\n"
    )
    cfg = json.loads((repo / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (repo / "config.json").write_text(json.dumps(cfg))
    if model_type == "llama":
        assert type(load_target(str(repo))).__name__ == "LlamaForCausalLM"
    else:
        with pytest.raises(ConfigError, match="trust_remote_code"):
            load_target(str(repo))
    assert not marker.exists()
    model = load_target(str(repo), trust_remote_code=True)
    assert marker.exists() and type(model).__name__ == "CustomForCausalLM"
