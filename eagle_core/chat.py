"""Chat rendering with the tokenizer's own template, and the assistant loss mask.

The conversation is rendered ONCE to text by the chat template and tokenized ONCE (batched,
with offsets). `loss_mask = 1` on exactly the tokens of assistant turns plus each turn's
end-of-turn token, found one of two ways:

- "generation": the template marks assistant text with `{% generation %}` blocks and
  transformers returns the mask (`return_assistant_tokens_mask=True`).
- "offsets": every turn's content is located in the rendered text in order (templates
  copy content verbatim, or trimmed); tokens whose character offsets fall in an assistant
  span are masked, plus the tokens right after it up to and including the first special
  token (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) when only whitespace lies in between.

Never tokenizing pieces separately matters: BPE merges across piece boundaries, so
separately tokenized pieces drift from what the target sees at serving time.

Offsets caveat handled here: byte-level tokenizers with `trim_offsets=True` report
whitespace-only tokens as zero-width at the token's END, so a zero-width token at point p
belongs to a span (a, b] (not [a, b)).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from eagle_core.errors import ConfigError
from eagle_core.records import Rejected

log = logging.getLogger(__name__)

MaskMode = Literal["auto", "offsets", "generation"]
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_EOT_LOOKAHEAD = 4  # tokens scanned after an answer for its end-of-turn token


class ChatReason:
    """Reject reasons of chat tokenization (keys of the tokenize manifest's counts)."""

    TEMPLATE_ERROR = "template_error"  # the template raised (e.g. roles must alternate)
    ASSISTANT_NOT_RENDERED = "assistant_not_rendered"  # content not found in rendered text


@dataclass(frozen=True)
class ChatSample:
    """A tokenized conversation. input_ids, loss_mask: [T].

    turns_without_eot: answers after which no special end-of-turn token was found (offsets
    mode): the draft then never learns to stop there; counted in the tokenize manifest.
    """

    input_ids: list[int]
    loss_mask: list[int]
    turns_without_eot: int = 0


def resolve_chat_template(tokenizer: Any, override: str | None = None) -> str:
    """The Jinja template to use: an override (a template name of the tokenizer, a file, or
    the template text itself), else the tokenizer's own.

    Raises:
        ConfigError: no template anywhere.
    """
    own = getattr(tokenizer, "chat_template", None)
    if override:
        if isinstance(own, dict) and override in own:
            return own[override]
        if "{" not in override and os.path.isfile(override):
            with open(override, encoding="utf-8") as fh:
                return fh.read()
        if "{" in override:
            return override
        raise ConfigError(
            f"chat_template={override!r} is neither a template name of the tokenizer, "
            "a file, nor Jinja text",
            fix="pass a .jinja file path, the template text, or one of "
            f"{sorted(own) if isinstance(own, dict) else ['default']}",
        )
    if isinstance(own, dict):
        own = own.get("default") or next(iter(own.values()), None)
    if not own:
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template",
            fix="pass chat_template= (a .jinja file or template text) for this tokenizer",
        )
    return own


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token (named ones and added tokens flagged special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def template_messages(
    messages: Sequence[dict[str, str]], keep_reasoning: bool
) -> list[dict[str, str]]:
    """Messages as given to the template. Reasoning, when kept, is inlined as a leading
    `<think>...</think>` block (the DeepSeek-R1 / Qwen3 convention, which Qwen3-style
    templates parse back out of the content)."""
    out = []
    for m in messages:
        content = m["content"]
        if keep_reasoning and m.get("reasoning"):
            content = f"<think>\n{m['reasoning']}\n</think>\n\n{content}"
        out.append({"role": m["role"], "content": content})
    return out


def find_assistant_spans(
    text: str, messages: Sequence[dict[str, str]]
) -> list[tuple[int, int]] | None:
    """Char spans [a, b) of assistant contents in the rendered text, or None if one is missing.

    Turns are searched in order from a moving cursor, so an answer repeated in a later user
    turn is not mistaken for the answer. Each content is tried verbatim, then trimmed, then
    (for inlined reasoning the template dropped) without its think block.
    """
    cursor, spans = 0, []
    for m in messages:
        content = m["content"]
        candidates = [content, content.strip()]
        if content.startswith("<think>") and "</think>" in content:
            rest = content.split("</think>", 1)[1]
            candidates += [rest, rest.strip()]
        found = -1
        for c in candidates:
            if c:
                found = text.find(c, cursor)
                if found >= 0:
                    span = (found, found + len(c))
                    break
        if found < 0:
            if m["role"] == "assistant":
                return None
            continue  # templates may rewrite system/user text; only answers must be found
        cursor = span[1]
        if m["role"] == "assistant":
            spans.append(span)
    return spans


def mask_from_offsets(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    text: str,
    spans: Sequence[tuple[int, int]],
    special_ids: set[int],
) -> tuple[list[int], int]:
    """loss_mask [T]: 1 on tokens overlapping a span, and on the end-of-turn token after it.

    Returns (loss_mask, number of spans with no end-of-turn special token after them).

    offsets: [T] (start, end) char offsets; a zero-width token (trimmed whitespace) at p
    belongs to a span [a, b) when a < p <= b (its offset is its end).
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [T, 2]
    start, end = off[:, 0], off[:, 1]
    zero = end <= start
    mask = np.zeros(len(input_ids), dtype=np.int8)
    missing = 0
    for a, b in spans:
        inside = np.where(zero, (a < start) & (start <= b), (start < b) & (end > a))
        idx = np.flatnonzero(inside)
        if not idx.size:
            continue
        mask[idx] = 1
        last = int(idx[-1])
        # extend to the end-of-turn special token, across whitespace only
        found = False
        for j in range(last + 1, min(last + 1 + _EOT_LOOKAHEAD, len(input_ids))):
            if input_ids[j] in special_ids:
                mask[last + 1 : j + 1] = 1
                found = True
                break
            if text[start[j] : end[j]].strip():
                break
        missing += not found
    return mask.tolist(), missing


def encode_batch(
    tokenizer: Any, texts: list[str], offsets: bool = False
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids (and char offsets) of texts, no special tokens added, in one batched call
    of the Rust backend (the transformers wrapper's per-encoding conversion is skipped)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs] if offsets else []
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return list(out["input_ids"]), list(out["offset_mapping"]) if offsets else []


def keep_last_run(mask: list[int]) -> list[int]:
    """Only the last contiguous run of 1s (the last assistant turn)."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [1 if start <= i < end else 0 for i in range(len(mask))]


def choose_mask_mode(template: str, mode: MaskMode) -> Literal["offsets", "generation"]:
    has_blocks = _GENERATION_BLOCK.search(template) is not None
    if mode == "auto":
        return "generation" if has_blocks else "offsets"
    if mode == "generation" and not has_blocks:
        raise ConfigError(
            "chat_mask='generation' but the chat template has no {% generation %} block",
            fix="use chat_mask='offsets' (or 'auto'), or a template with generation blocks",
        )
    return mode


def tokenize_chats(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    template: str,
    mask_mode: Literal["offsets", "generation"] = "offsets",
    last_turn_only: bool = False,
    keep_reasoning: bool = True,
) -> list[ChatSample | Rejected]:
    """Render and tokenize a batch of conversations; one result per conversation.

    Args:
        tokenizer: a fast transformers tokenizer (offsets need the Rust backend).
        conversations: normalized turns (see eagle_core.records).
        template: the Jinja chat template (see `resolve_chat_template`).
        mask_mode: how assistant tokens are found (module docstring).
        last_turn_only: mask only the last assistant turn.
        keep_reasoning: render assistant reasoning (and train on it) or drop it.

    Returns:
        ChatSample (input_ids [T], loss_mask [T]) or Rejected(ChatReason...).
    """
    results: list[ChatSample | Rejected | None] = [None] * len(conversations)
    all_msgs = [template_messages(conv, keep_reasoning) for conv in conversations]
    if mask_mode == "generation":
        for n, res in enumerate(_generation_masks(tokenizer, all_msgs, template)):
            if isinstance(res, ChatSample) and last_turn_only:
                res = ChatSample(res.input_ids, keep_last_run(res.loss_mask))
            results[n] = res
        return results  # type: ignore[return-value]
    texts: list[str] = []
    where: list[tuple[int, list[tuple[int, int]]]] = []
    specials = special_token_ids(tokenizer)
    for n, msgs in enumerate(all_msgs):
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False)
        except Exception as exc:  # jinja raises TemplateError and the template's own errors
            results[n] = _template_error(exc)
            continue
        spans = find_assistant_spans(text, msgs)
        if spans is None:
            results[n] = Rejected(
                ChatReason.ASSISTANT_NOT_RENDERED, "an assistant answer is not in the render"
            )
            continue
        if last_turn_only:
            spans = spans[-1:]
        texts.append(text)
        where.append((n, spans))
    if texts:
        all_ids, all_offs = encode_batch(tokenizer, texts, offsets=True)
        for (n, spans), text, ids, offs in zip(where, texts, all_ids, all_offs, strict=True):
            mask, missing = mask_from_offsets(ids, offs, text, spans, specials)
            results[n] = ChatSample(list(ids), mask, missing)
    return results  # type: ignore[return-value]


def _template_error(exc: Exception) -> Rejected:
    return Rejected(ChatReason.TEMPLATE_ERROR, f"{type(exc).__name__}: {exc}"[:120])


def _generation_masks(
    tokenizer: Any, all_msgs: list[list[dict[str, str]]], template: str
) -> list[ChatSample | Rejected]:
    """The template's own assistant masks, one batched call; per conversation only if a
    conversation makes the template raise (so one bad row is one reject)."""

    def call(convs: list[list[dict[str, str]]]) -> list[ChatSample]:
        out = tokenizer.apply_chat_template(
            convs,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return [
            ChatSample(list(ids), list(mask))
            for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)
        ]

    if not all_msgs:
        return []
    try:
        return list(call(all_msgs))
    except Exception:  # some conversation broke the template: find it, keep the others
        results: list[ChatSample | Rejected] = []
        for msgs in all_msgs:
            try:
                results.extend(call([msgs]))
            except Exception as exc:
                results.append(_template_error(exc))
        return results
