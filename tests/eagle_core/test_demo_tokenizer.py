"""The demo tokenizer builder and the session's small target (real tokenizers, real model)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle_core.demo.corpus import read_sources
from eagle_core.demo.tokenizer import FIM_FAMILIES, build_tokenizer
from eagle_core.errors import ConfigError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does `heappush` do?"},
    {"role": "assistant", "content": "Push item onto heap, maintaining the heap invariant."},
    {"role": "user", "content": "And heappop?"},
    {"role": "assistant", "content": "Pop the smallest item off the heap."},
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    files, _ = read_sources(modules=["heapq", "bisect", "textwrap"])
    return [f.text for f in files]


def test_small_tokenizer_loads_with_chat_and_fim(small_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    assert len(tok) == 1024
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for t in ("<|im_start|>", "<|im_end|>", *FIM_FAMILIES["starcoder"].specials()):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    # no token is added silently: offsets of the rendered text map 1:1 onto tokens
    assert tok("x = 1")["input_ids"] == tok("x = 1", add_special_tokens=False)["input_ids"]


def test_assistant_mask_covers_content_and_end_of_turn(small_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    enc = tok.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == (
        "Push item onto heap, maintaining the heap invariant.<|im_end|>"
        "Pop the smallest item off the heap.<|im_end|>"
    )
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", sorted(FIM_FAMILIES))
def test_each_fim_family(tmp_path, texts: list[str], family: str) -> None:
    out = build_tokenizer(texts, 600, str(tmp_path / family), fim_family=family)
    tok = AutoTokenizer.from_pretrained(out)
    fim = FIM_FAMILIES[family]
    text = fim.psm("def f(x):\n", "    y = x\n", "    return y\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    for special in (fim.prefix, fim.suffix, fim.middle, fim.end):
        assert special in toks
    assert toks[0] == fim.prefix and toks[-1] == fim.end
    assert tok.decode(ids) == text
    other = {f.prefix for k, f in FIM_FAMILIES.items() if k != family}
    assert not other & set(tok.get_vocab())


def test_tokenizer_is_deterministic(tmp_path, texts: list[str]) -> None:
    def digest(d: str) -> str:
        with open(os.path.join(d, "tokenizer.json"), "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()

    a = build_tokenizer(texts, 700, str(tmp_path / "a"))
    b = build_tokenizer(texts, 700, str(tmp_path / "b"))
    assert digest(a) == digest(b)


def test_bad_family_and_tiny_vocab_are_config_errors(tmp_path, texts: list[str]) -> None:
    with pytest.raises(ConfigError, match="fim_family"):
        build_tokenizer(texts, 1024, str(tmp_path / "x"), fim_family="gpt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tokenizer(texts, 200, str(tmp_path / "y"))


def test_small_target_is_trained_and_loads(small_target_dir: str, small_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(small_target_dir)
    cfg = model.config
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    ) == (8, 64, 4, 2, 128)
    assert cfg.vocab_size == len(tok)
    assert os.path.exists(os.path.join(small_target_dir, "model.safetensors"))
    files, _ = read_sources(modules=["heapq"])
    ids = torch.tensor([tok(files[0].text[:2000], add_special_tokens=False)["input_ids"][:128]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # a random init sits at ln(1024) = 6.93; 60 steps on this text must have moved it
    assert loss < 6.0
