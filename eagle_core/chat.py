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

import itertools
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
) -> tuple[np.ndarray, int]:
    """loss_mask [T] int8: 1 on tokens overlapping a span, and on the end-of-turn token after
    it (numpy over the tokens, Python only over spans and the few look-ahead tokens).

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
    return mask, missing


def plain_encoder(tokenizer: Any) -> Any:
    """The Rust tokenizer of a fast transformers tokenizer, with its own truncation and
    padding off (what `tokenizer(text)` applies by default), or None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.truncation is None and backend.padding is None):
        return backend
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())  # a copy: never change the caller's
    plain.no_truncation()
    plain.no_padding()
    return plain


def encode_batch(
    tokenizer: Any, texts: list[str], offsets: bool = False
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids (and char offsets) of texts, no special tokens added, in one batched call
    of the Rust backend (the transformers wrapper's per-encoding conversion is skipped)."""
    backend = plain_encoder(tokenizer)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs] if offsets else []
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return list(out["input_ids"]), list(out["offset_mapping"]) if offsets else []


def flatten_ids(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids [N] int32, offsets [K+1] int64) of K id lists: list k is
    flat[offsets[k]:offsets[k+1]]."""
    bounds = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=bounds[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(bounds[-1]))
    return flat, bounds


def generation_token_mask(
    offsets: Sequence[tuple[int, int]], gen_spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """mask [T] int8: 1 on every token whose char range overlaps a `{% generation %}` span,
    the rule of transformers >= 5.24 `apply_chat_template(..., return_assistant_tokens_mask=True)`
    (and of its ProcessorMixin): token (s, e) is masked when s < b and e > a for a span
    [a, b). A zero-width token (whitespace the offsets trim) at p is masked when a < p < b.

    transformers <= 5.23 marked instead the tokens from the one holding a span's first char
    through the one holding its last, and STOPPED at a span whose first char has no token
    (an answer starting with a newline or space under a byte-level tokenizer with trimmed
    offsets): every later answer of the conversation lost its mask. We follow the overlap
    rule on every transformers version; the tests pin it against both.

    offsets: [T] (start, end) char offsets of the rendered text (in order); gen_spans: the
    spans in render order.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [T, 2]
    mask = np.zeros(len(off), dtype=np.int8)
    if not len(gen_spans) or not len(off):
        return mask
    spans = np.asarray(gen_spans, dtype=np.int64).reshape(-1, 2)  # [S, 2]
    # the first span ending after each token's start, as transformers' single pass finds it
    first = np.searchsorted(spans[:, 1], off[:, 0], side="right")  # [T]
    has = first < len(spans)
    mask[has] = off[has, 1] > spans[first[has], 0]
    return mask


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


@dataclass
class ChatBatch:
    """A batch of tokenized conversations, flat (no per-token Python objects).

    Conversation `index[k]` of the input is `ids[bounds[k]:bounds[k+1]]` (see `sample`).
    ids: [N] int32; mask: [N] int8; bounds: [K+1] int64; index, turns_without_eot: [K];
    rejects: (input position, Rejected) of the conversations that produced no sample.
    """

    ids: np.ndarray
    mask: np.ndarray
    bounds: np.ndarray
    index: list[int]
    turns_without_eot: list[int]
    rejects: list[tuple[int, Rejected]]

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [T], loss_mask [T]) of the k-th kept conversation (views)."""
        a, b = int(self.bounds[k]), int(self.bounds[k + 1])
        return self.ids[a:b], self.mask[a:b]

    def results(self) -> list[ChatSample | Rejected]:
        """One result per input conversation, in input order: ChatSample (input_ids [T],
        loss_mask [T] as lists) or its Rejected(ChatReason...)."""
        results: list[ChatSample | Rejected | None] = [None] * (len(self.index) + len(self.rejects))
        for n, rej in self.rejects:
            results[n] = rej
        for k, n in enumerate(self.index):
            ids, mask = self.sample(k)
            results[n] = ChatSample(ids.tolist(), mask.tolist(), self.turns_without_eot[k])
        return results  # type: ignore[return-value]


def tokenize_chat_batch(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    template: str,
    mask_mode: Literal["offsets", "generation"] = "offsets",
    last_turn_only: bool = False,
    keep_reasoning: bool = True,
) -> ChatBatch:
    """Render and tokenize a batch of conversations into flat arrays (the stage's fast path).

    Each conversation is rendered once (Jinja), all are encoded in ONE batched call of the
    Rust tokenizer (parallel over the batch), and masks are built with numpy: from the
    `{% generation %}` char spans (generation mode, exactly transformers' assistant mask)
    or from the token offsets (offsets mode, module docstring).

    Args:
        tokenizer: a fast transformers tokenizer (offsets need the Rust backend; a slow one
            takes transformers' own path, generation mode only).
        conversations: normalized turns (see eagle_core.records).
        template: the Jinja chat template (see `resolve_chat_template`).
        mask_mode: how assistant tokens are found (module docstring).
        last_turn_only: mask only the last assistant turn.
        keep_reasoning: render assistant reasoning (and train on it) or drop it.

    Returns:
        ChatBatch of the conversations that tokenized; the others in `.rejects`
        (`.results()`: one ChatSample or Rejected per conversation, in input order).
    """
    all_msgs = [template_messages(conv, keep_reasoning) for conv in conversations]
    backend = plain_encoder(tokenizer)
    if backend is None:  # a slow tokenizer: no batch encode, no offsets; transformers' path
        slow = _batch_from_samples(_slow_tokenize(tokenizer, all_msgs, template, mask_mode))
        if last_turn_only:
            for k in range(len(slow.index)):
                keep_last_run_inplace(slow.mask[slow.bounds[k] : slow.bounds[k + 1]])
        return slow
    generation = mask_mode == "generation"
    rejects: list[tuple[int, Rejected]] = []
    texts: list[str] = []
    where: list[tuple[int, list[tuple[int, int]]]] = []  # input position, char spans
    for n, rendered in enumerate(render_chats(tokenizer, all_msgs, template, generation)):
        if isinstance(rendered, Rejected):
            rejects.append((n, rendered))
            continue
        text, spans = rendered
        if not generation:
            found = find_assistant_spans(text, all_msgs[n])
            if found is None:
                rejects.append(
                    (
                        n,
                        Rejected(
                            ChatReason.ASSISTANT_NOT_RENDERED,
                            "an assistant answer is not in the render",
                        ),
                    )
                )
                continue
            spans = found[-1:] if last_turn_only else found
        texts.append(text)
        where.append((n, spans))
    encs = backend.encode_batch(texts, add_special_tokens=False) if texts else []
    flat, bounds = flatten_ids([e.ids for e in encs])
    missing = [0] * len(encs)
    if generation:
        mask = np.zeros(len(flat), dtype=np.int8)
        for k, (enc, (_, spans)) in enumerate(zip(encs, where, strict=True)):
            mask[bounds[k] : bounds[k + 1]] = generation_token_mask(enc.offsets, spans)
        if last_turn_only:
            for k in range(len(encs)):
                keep_last_run_inplace(mask[bounds[k] : bounds[k + 1]])
    else:
        specials = special_token_ids(tokenizer)
        mask = np.zeros(len(flat), dtype=np.int8)
        for k, (enc, text, (_, spans)) in enumerate(zip(encs, texts, where, strict=True)):
            ids = flat[bounds[k] : bounds[k + 1]]
            m, missing[k] = mask_from_offsets(ids.tolist(), enc.offsets, text, spans, specials)
            mask[bounds[k] : bounds[k + 1]] = m
    return ChatBatch(flat, mask, bounds, [n for n, _ in where], missing, rejects)


def render_chats(
    tokenizer: Any,
    all_msgs: Sequence[Sequence[dict[str, str]]],
    template: str,
    generation: bool,
) -> list[tuple[str, list[tuple[int, int]]] | Rejected]:
    """Each conversation rendered once, as `tokenizer.apply_chat_template(msgs,
    chat_template=template)` renders it (same Jinja environment, the tokenizer's special
    tokens as variables); with `generation`, also the char spans of its `{% generation %}`
    blocks. A conversation the template raises on is a TEMPLATE_ERROR reject."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = dict(tokenizer.special_tokens_map)
    convs = [[{k: v for k, v in m.items() if v is not None} for m in msgs] for msgs in all_msgs]

    def render(batch: list[list[dict[str, str]]]) -> list[tuple[str, list[tuple[int, int]]]]:
        texts, spans = render_jinja_template(
            conversations=batch,
            chat_template=template,
            return_assistant_tokens_mask=generation,
            **special,
        )
        return [(x, list(spans[n]) if generation else []) for n, x in enumerate(texts)]

    try:
        return list(render(convs))  # one call: the template variables are prepared once
    except Exception:  # some conversation broke the template: find it, keep the others
        out: list[tuple[str, list[tuple[int, int]]] | Rejected] = []
        for conv in convs:
            try:
                out.extend(render([conv]))
            except Exception as exc:  # jinja's TemplateError and the template's own errors
                out.append(_template_error(exc))
        return out


def keep_last_run_inplace(mask: np.ndarray) -> None:
    """Zero every 1 of mask [T] before its last contiguous run of 1s (numpy, in place)."""
    ones = np.flatnonzero(mask)
    if not ones.size:
        return
    end = int(ones[-1]) + 1
    zeros = np.flatnonzero(mask[:end] == 0)
    mask[: int(zeros[-1]) + 1 if zeros.size else 0] = 0


def _template_error(exc: Exception) -> Rejected:
    return Rejected(ChatReason.TEMPLATE_ERROR, f"{type(exc).__name__}: {exc}"[:120])


def _batch_from_samples(results: list[ChatSample | Rejected]) -> ChatBatch:
    kept = [(n, r) for n, r in enumerate(results) if isinstance(r, ChatSample)]
    flat, bounds = flatten_ids([r.input_ids for _, r in kept])
    mask = np.fromiter(
        itertools.chain.from_iterable(r.loss_mask for _, r in kept), np.int8, count=len(flat)
    )
    return ChatBatch(
        flat,
        mask,
        bounds,
        [n for n, _ in kept],
        [r.turns_without_eot for _, r in kept],
        [(n, r) for n, r in enumerate(results) if isinstance(r, Rejected)],
    )


def _slow_tokenize(
    tokenizer: Any, all_msgs: list[list[dict[str, str]]], template: str, mask_mode: str
) -> list[ChatSample | Rejected]:
    if mask_mode != "generation":
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast (Rust) "
            "tokenizer: offsets masks need one",
            fix="use a tokenizer with tokenizer.json, or a template with generation blocks",
        )
    return reference_generation_masks(tokenizer, all_msgs, template)


def reference_generation_masks(
    tokenizer: Any, all_msgs: list[list[dict[str, str]]], template: str
) -> list[ChatSample | Rejected]:
    """transformers' own assistant masks (`apply_chat_template(..., tokenize=True,
    return_assistant_tokens_mask=True)`, one batched call; per conversation only if one
    makes the template raise). The slow path (a tokenizer without offsets), and on
    transformers >= 5.24 a reference the fast one is tested against; older versions mark
    fewer tokens (see `generation_token_mask`)."""

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
