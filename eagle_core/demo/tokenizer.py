"""A byte-level BPE tokenizer trained offline, with chat and FIM special tokens.

The tokenizer is a standard Hugging Face tokenizer directory (`tokenizer.json` +
`tokenizer_config.json` with a Jinja `chat_template`), so `AutoTokenizer.from_pretrained(dir)`
loads it and nothing in the pipeline knows it was built here.

Conventions (documented once, used by the demo target and the test fixtures):

- eos `<|endoftext|>`, pad `<|pad|>`, bos `<|bos|>`. The bos token exists for tools that
  want one but is never added automatically (no post-processor, not in the template), the
  way Qwen tokenizers behave: token offsets of a rendered text map 1:1 onto its tokens.
- Chat: ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n`). The assistant's content and
  its `<|im_end|>` sit inside `{% generation %}...{% endgeneration %}`, so
  `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens a
  draft must learn (FORMATS.md: assistant turns including their end-of-turn token).
- FIM: one of the real families (FORMATS.md), chosen by `fim_family`:
  starcoder `<fim_prefix> <fim_suffix> <fim_middle> <fim_pad>`, a middle ends with
  `<|endoftext|>` (StarCoder's convention); qwen `<|fim_prefix|> <|fim_suffix|>
  <|fim_middle|> <|fim_pad|>`, a middle ends with `<|endoftext|>`; codellama `<PRE> <SUF>
  <MID>`, a middle ends with `<EOT>`. PSM order: `prefix_tok prefix suffix_tok suffix
  middle_tok middle end_tok`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from eagle_core.errors import ConfigError

log = logging.getLogger(__name__)

FimFamily = Literal["starcoder", "qwen", "codellama"]

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class FimTokens:
    """The FIM token strings of one model family (PSM: prefix, suffix, middle)."""

    prefix: str
    suffix: str
    middle: str
    end: str  # what ends a middle (the model stops there)
    pad: str | None = None

    def specials(self) -> list[str]:
        """The tokens this family adds to the vocabulary (the end token may be the eos)."""
        toks = [self.prefix, self.suffix, self.middle]
        if self.pad:
            toks.append(self.pad)
        if self.end != EOS:
            toks.append(self.end)
        return toks

    def psm(self, prefix: str, middle: str, suffix: str, *, with_end: bool = True) -> str:
        """Render one FIM sample as text in PSM order (middle last, then the end token)."""
        text = f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}{middle}"
        return text + self.end if with_end else text


FIM_FAMILIES: dict[str, FimTokens] = {
    "starcoder": FimTokens("<fim_prefix>", "<fim_suffix>", "<fim_middle>", EOS, "<fim_pad>"),
    "qwen": FimTokens("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", EOS, "<|fim_pad|>"),
    "codellama": FimTokens("<PRE>", "<SUF>", "<MID>", "<EOT>", None),
}

# ChatML with the assistant span (content + end-of-turn) inside generation markers. The
# newline after <|im_end|> is outside: it is template glue, not something the model says.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def special_tokens(fim_family: FimFamily) -> list[str]:
    """All special tokens in id order (they take ids 0..n-1)."""
    if fim_family not in FIM_FAMILIES:
        raise ConfigError(
            f"fim_family={fim_family!r} is not one of {sorted(FIM_FAMILIES)}",
            fix="use 'starcoder' (default), 'qwen' or 'codellama'",
        )
    return [EOS, PAD, BOS, IM_START, IM_END, *FIM_FAMILIES[fim_family].specials()]


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str,
    *,
    fim_family: FimFamily = "starcoder",
    model_max_length: int = 4096,
) -> str:
    """Train a byte-level BPE tokenizer on `texts` and save it as an HF tokenizer dir.

    Args:
        texts: training text, in a fixed order (the trainer is deterministic given the
            same texts in the same order).
        vocab_size: total vocabulary including the special tokens and the 256 byte symbols.
        out_dir: directory to write (created).
        fim_family: which FIM token family to add (module docstring).
        model_max_length: recorded in tokenizer_config.json.

    Returns:
        out_dir.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(fim_family)
    if vocab_size < 256 + len(specials) + 1:
        raise ConfigError(
            f"vocab_size={vocab_size} leaves no room for merges after 256 byte symbols and "
            f"{len(specials)} special tokens",
            fix="use vocab_size >= 512",
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fim = FIM_FAMILIES[fim_family]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END, *fim.specials()],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # transformers 5 writes its internal class name ("TokenizersBackend"); the public name
    # loads in transformers 4.x too (vLLM, SGLang pins), and 5.x maps it to the same class.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as fh:
        tok_cfg = json.load(fh)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 5 keeps the template in chat_template.jinja and the specials under
    # extra_special_tokens; older readers look for both in tokenizer_config.json under these
    # names (5.x loads either and gets the same template and specials)
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg.setdefault("additional_special_tokens", [IM_START, IM_END, *fim.specials()])
    with open(cfg_path, "w") as fh:
        json.dump(tok_cfg, fh, indent=2, sort_keys=True)
    # Record the FIM family next to the tokenizer so tools need not guess from the vocab.
    with open(os.path.join(out_dir, "fim_tokens.json"), "w") as fh:
        json.dump({"family": fim_family, **fim.__dict__}, fh, indent=1, sort_keys=True)
    log.info("tokenizer: %d tokens (%s FIM) -> %s", len(fast), fim_family, out_dir)
    return out_dir
