"""The random Llama most eagle_core tests draft against: small, 8 layers, built in milliseconds.

8 decoder layers (so the default aux layer ids (1, 3, 4) exist), H=32, 4 query and 2 kv heads
(grouped-query attention is exercised), intermediate 64. Tests override what they vary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """LlamaConfig(V=vocab_size, H=32, 8 layers, 4 heads, 2 kv heads, FF=64) + `overrides`."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
