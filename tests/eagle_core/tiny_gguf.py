"""A GGUF file of a seeded random Llama, written with the `gguf` package as llama.cpp does.

llama.cpp's converter (convert_hf_to_gguf.py) renames tensors to ggml names, permutes the q/k
rows per head for its rotary layout and stores the tokenizer as `tokenizer.ggml.*` metadata;
this writer does the same for a `LlamaForCausalLM` and a saved byte-level BPE tokenizer, with
one tensor stored as Q8_0, so an importer is tested on what real files hold.
"""

from __future__ import annotations

import json
import os

import gguf  # in the test extra: a missing package fails the tests, never skips them
import numpy as np
import torch

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


def build_tiny_gguf(
    path: str,
    tok_dir: str,
    chat_template: str,
    *,
    num_layers: int = 2,
    seed: int = 0,
):
    """Write a seeded H=64 Llama (4 heads, 2 kv heads) as `path`; returns the reference
    `LlamaForCausalLM` holding exactly the weights the file holds (Q8_0 round trip included).

    initializer_range=0.3: large weights, so attention is far from uniform and a wrong q/k
    layout changes the logits.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    held = write_llama_gguf(path, model, tok_dir, chat_template)
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()})
    return reference
