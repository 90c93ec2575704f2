"""Small real tokenizers for the data-stage tests (byte-level BPE trained in the test).

`bpe_tokenizer_factory(family, template=...)` returns the path of a saved tokenizer dir:
family "starcoder" | "qwen" | "codellama" | "deepseek" | "none" picks the FIM sentinels; the chat
template is ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), with or without a
`{% generation %}` block, or a Llama-3 style template ending turns with `<|eot_id|>`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Hello there! How can I help you today?\n",
    "The quick brown fox jumps over the lazy dog. 1234567890\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "Bonjour, ça va? Très bien, merci. 你好世界 — ünïcödé\n",
]

FAMILY_SPECIALS = {
    "starcoder": ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"],
    "qwen": ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"],
    "codellama": ["</s>", "<PRE>", "<SUF>", "<MID>", "<EOT>"],
    "deepseek": ["<｜end▁of▁sentence｜>", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
    "none": ["<|endoftext|>"],
}
CHAT_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATES = {
    "chatml": CHATML,
    "chatml_generation": CHATML_GENERATION,
    "llama3": LLAMA3,
    "none": None,  # a base model's tokenizer: no chat template at all
}


def build_bpe_tokenizer(
    out_dir: str, family: str = "starcoder", template: str = "chatml", vocab_size: int = 400
) -> str:
    """Train a byte-level BPE on CORPUS and save it as a transformers tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = FAMILY_SPECIALS[family] + CHAT_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=True (GPT-2's setting) makes whitespace tokens zero-width: the chat mask
    # must still cover them
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[0], additional_special_tokens=specials[1:]
    )
    fast.chat_template = TEMPLATES[template]
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def bpe_tokenizer_factory(tmp_path_factory) -> Callable[..., str]:
    cache: dict[tuple, str] = {}

    def make(family: str = "starcoder", template: str = "chatml") -> str:
        k = (family, template)
        if k not in cache:
            d = tmp_path_factory.mktemp(f"tok-{family}-{template}")
            cache[k] = build_bpe_tokenizer(os.fspath(d), family, template)
        return cache[k]

    return make
