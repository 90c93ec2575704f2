"""The normalized record schema of the `download` stage, and the validation that feeds it.

Every raw input row becomes either one normalized record (a plain dict with exactly the
columns of `RECORD_SCHEMA`) or a `Rejected(reason, detail)`; the download stage counts
rejects by reason and keeps a few example ids per reason in its manifest.

Record kinds (column `kind`):
- "chat": `messages_json` = JSON list of {"role": "system"|"user"|"assistant",
  "content": str, optional "reasoning": str}. ShareGPT `conversations` ({"from", "value"})
  and OpenAI `messages` ({"role", "content"}) are both accepted; roles are mapped by
  `ROLE_ALIASES`. A system prompt may only open the conversation.
- "fim": `prefix`, `middle`, `suffix`. Whole files (`content`) are split at download time
  by `eagle_core.fim.FileSplitter` with a per-record seed, so the split is stable.
- "tokens": `input_ids` (list<int32>) + `loss_mask` (list<int8>), passed through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

RecordKind = Literal["chat", "fim", "tokens"]
KINDS: tuple[str, ...] = ("chat", "fim", "tokens")

RECORD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("messages_json", pa.string()),
        ("prefix", pa.string()),
        ("middle", pa.string()),
        ("suffix", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
        ("original_json", pa.string()),
    ]
)
RECORD_COLUMNS: tuple[str, ...] = tuple(RECORD_SCHEMA.names)

# ShareGPT / OpenAI / Gemini spellings of the three roles we keep. Tool and function turns are
# not mapped: templates render them in family-specific ways, so they are rejected (counted).
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
# Fields that carry an assistant turn's reasoning ("thinking") separately from its answer.
REASONING_FIELDS: tuple[str, ...] = ("reasoning", "reasoning_content", "thinking")
_THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


class Reason:
    """Reject reasons: the keys of `rejected_by_reason` in the download manifest."""

    MALFORMED_JSON = "malformed_json"  # a jsonl line / json file that does not parse
    NOT_UTF8 = "not_utf8"  # bytes that are not UTF-8, or lone surrogates in a JSON string
    NOT_AN_OBJECT = "not_an_object"  # a JSON value that is not an object
    UNKNOWN_FORMAT = "unknown_format"  # kind "auto" and no chat / FIM / token fields
    MISSING_MESSAGES = "missing_messages"  # kind "chat" without conversations / messages
    BAD_MESSAGE = "bad_message"  # a turn that is not an object, or content not a string
    UNKNOWN_ROLE = "unknown_role"  # a role outside ROLE_ALIASES (tool, function, ...)
    MISPLACED_SYSTEM = "misplaced_system"  # a system turn after the first turn
    EMPTY_ASSISTANT_TURN = "empty_assistant_turn"  # assistant turn with blank content
    NO_ASSISTANT_TURN = "no_assistant_turn"  # nothing for the draft to learn
    MISSING_FIM_FIELD = "missing_fim_field"  # prefix/middle/suffix absent or not strings
    EMPTY_MIDDLE = "empty_middle"  # a FIM record whose middle is blank
    EMPTY_FILE = "empty_file"  # a whole-file record whose content is blank
    BAD_TOKENS = "bad_tokens"  # input_ids/loss_mask: wrong types, lengths, or values
    DUPLICATE_ID = "duplicate_id"  # a record id seen before in the same source


ALL_REASONS: tuple[str, ...] = tuple(
    v for k, v in vars(Reason).items() if k.isupper() and isinstance(v, str)
)


@dataclass(frozen=True)
class Rejected:
    """A raw row that did not become a record: why (a `Reason`), and a short detail."""

    reason: str
    detail: str = ""


@dataclass
class RejectCounter:
    """Counts rejects by reason and keeps the first `max_examples` ids per reason."""

    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, sample_id: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{sample_id}: {detail}" if detail else sample_id)

    def merge(self, other: RejectCounter) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def empty_record(sample_id: str, kind: str, source: str) -> dict[str, Any]:
    """A record with every column present and the unused ones null."""
    rec: dict[str, Any] = dict.fromkeys(RECORD_COLUMNS)
    rec.update(sample_id=sample_id, kind=kind, source=source)
    return rec


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """A `RECORD_SCHEMA` table (typed even when a column is all null)."""
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def detect_kind(raw: Mapping[str, Any]) -> str | None:
    """The record kind implied by a raw row's fields, or None."""
    if "conversations" in raw or "messages" in raw:
        return "chat"
    if "input_ids" in raw:
        return "tokens"
    if any(k in raw for k in ("prefix", "middle", "suffix", "content")):
        return "fim"
    return None


def raw_id(raw: Mapping[str, Any]) -> str | None:
    """The record's own id (`id`, `sample_id`, `uuid`), if it has a usable one."""
    for k in ("sample_id", "id", "uuid"):
        v = raw.get(k)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
            return str(v)
    return None


def _utf8_ok(*texts: str) -> bool:
    """False if a string holds lone surrogates (valid JSON escapes, not encodable as UTF-8)."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def normalize_chat(raw: Mapping[str, Any]) -> list[dict[str, str]] | Rejected:
    """Map ShareGPT / OpenAI turns to [{"role", "content", optional "reasoning"}].

    Reasoning is taken from a separate field (`REASONING_FIELDS`) or from a leading
    `<think>...</think>` block of an assistant answer, and kept as its own field so the
    tokenize stage can keep or drop it.
    """
    turns = raw.get("messages", raw.get("conversations"))
    if turns is None:
        return Rejected(Reason.MISSING_MESSAGES, "no 'conversations' or 'messages' field")
    if not isinstance(turns, list) or not turns:
        return Rejected(Reason.MISSING_MESSAGES, "conversations/messages is not a non-empty list")
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            return Rejected(Reason.BAD_MESSAGE, f"turn {i} is not an object")
        role_raw = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = ROLE_ALIASES.get(str(role_raw).lower()) if isinstance(role_raw, str) else None
        if role is None:
            return Rejected(Reason.UNKNOWN_ROLE, f"turn {i} has role {role_raw!r}")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, Mapping)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                return Rejected(Reason.BAD_MESSAGE, f"turn {i} has non-text content parts")
            content = "".join(texts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            return Rejected(Reason.BAD_MESSAGE, f"turn {i} content is {type(content).__name__}")
        if role == "system" and i != 0:
            return Rejected(Reason.MISPLACED_SYSTEM, f"system turn at position {i}")
        msg = {"role": role, "content": content}
        if role == "assistant":
            reasoning = next(
                (turn[k] for k in REASONING_FIELDS if isinstance(turn.get(k), str)), None
            )
            m = _THINK_BLOCK.match(content)
            if reasoning is None and m:
                reasoning, msg["content"] = m.group(1).strip("\n"), content[m.end() :]
            if not msg["content"].strip():
                return Rejected(Reason.EMPTY_ASSISTANT_TURN, f"turn {i} is blank")
            if reasoning:
                msg["reasoning"] = reasoning
        if not _utf8_ok(*msg.values()):
            return Rejected(Reason.NOT_UTF8, f"turn {i} holds lone surrogates")
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        return Rejected(Reason.NO_ASSISTANT_TURN, f"{len(out)} turns, none from the assistant")
    return out


FileSplitter = Callable[[str, str, "bool | None"], tuple[str, str, str]]
"""(content, sample_id, is_python) -> (prefix, middle, suffix); seeded by the caller."""


def is_python_file(raw: Mapping[str, Any]) -> bool | None:
    """True/False when a whole-file row says its language (`language`, or `path`/`lang`
    extension), None when it does not (AST spans then try to parse it)."""
    lang = raw.get("language", raw.get("lang"))
    if isinstance(lang, str) and lang.strip():
        return lang.strip().lower() in ("python", "py", "python3")
    path = raw.get("path", raw.get("max_stars_repo_path"))
    if isinstance(path, str) and "." in path.rsplit("/", 1)[-1]:
        return path.lower().endswith((".py", ".pyi", ".pyw"))
    return None


def normalize_fim(
    raw: Mapping[str, Any], sample_id: str, split_file: FileSplitter | None
) -> tuple[str, str, str] | Rejected:
    """prefix/middle/suffix from explicit fields, or from a whole file split by `split_file`."""
    has_parts = any(k in raw for k in ("prefix", "middle", "suffix"))
    if not has_parts and "content" in raw:
        content = raw["content"]
        if not isinstance(content, str):
            return Rejected(Reason.MISSING_FIM_FIELD, "content is not a string")
        if not content.strip():
            return Rejected(Reason.EMPTY_FILE, "content is blank")
        if not _utf8_ok(content):
            return Rejected(Reason.NOT_UTF8, "content holds lone surrogates")
        if split_file is None:
            return Rejected(Reason.MISSING_FIM_FIELD, "whole file but no splitter configured")
        parts = split_file(content, sample_id, is_python_file(raw))
    else:
        missing = [k for k in ("prefix", "middle", "suffix") if not isinstance(raw.get(k), str)]
        if missing:
            return Rejected(Reason.MISSING_FIM_FIELD, f"missing or not a string: {missing}")
        parts = (raw["prefix"], raw["middle"], raw["suffix"])
    if not parts[1].strip():
        return Rejected(Reason.EMPTY_MIDDLE, "middle is blank")
    if not _utf8_ok(*parts):
        return Rejected(Reason.NOT_UTF8, "prefix/middle/suffix hold lone surrogates")
    return parts


def normalize_tokens(raw: Mapping[str, Any]) -> tuple[list[int], list[int]] | Rejected:
    """Pre-tokenized `input_ids` + `loss_mask` (0/1, same length; mask defaults to all 1)."""
    ids, mask = raw.get("input_ids"), raw.get("loss_mask")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if hasattr(mask, "tolist"):
        mask = mask.tolist()
    if not isinstance(ids, list) or not ids:
        return Rejected(Reason.BAD_TOKENS, "input_ids is not a non-empty list")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in ids):
        return Rejected(Reason.BAD_TOKENS, "input_ids holds non-integers or out-of-range ids")
    if mask is None:
        mask = [1] * len(ids)
    if not isinstance(mask, list) or len(mask) != len(ids):
        n = len(mask) if isinstance(mask, list) else type(mask).__name__
        return Rejected(Reason.BAD_TOKENS, f"loss_mask length {n} != input_ids length {len(ids)}")
    if not all(m in (0, 1) and not isinstance(m, float) for m in mask):
        return Rejected(Reason.BAD_TOKENS, "loss_mask holds values other than 0/1")
    return ids, [int(m) for m in mask]


def normalize_record(
    raw: Any,
    *,
    sample_id: str,
    source: str,
    kind: str = "auto",
    split_file: FileSplitter | None = None,
) -> dict[str, Any] | Rejected:
    """One raw row -> a `RECORD_SCHEMA` dict, or `Rejected` with the reason.

    Args:
        raw: the parsed row (a dict for valid input).
        sample_id: the stable id to give the record.
        source: the source label written into the `source` column.
        kind: "chat" | "fim" | "tokens", or "auto" to decide from the row's fields.
        split_file: splits whole-file FIM rows (`content`) into prefix/middle/suffix.
    """
    if not isinstance(raw, Mapping):
        return Rejected(Reason.NOT_AN_OBJECT, f"row is a {type(raw).__name__}")
    if kind == "auto":
        detected = detect_kind(raw)
        if detected is None:
            return Rejected(Reason.UNKNOWN_FORMAT, f"fields {sorted(raw)[:8]}")
        kind = detected
    rec = empty_record(sample_id, kind, source)
    if kind == "chat":
        msgs = normalize_chat(raw)
        if isinstance(msgs, Rejected):
            return msgs
        rec["messages_json"] = json.dumps(msgs, ensure_ascii=False)
    elif kind == "fim":
        parts = normalize_fim(raw, sample_id, split_file)
        if isinstance(parts, Rejected):
            return parts
        rec["prefix"], rec["middle"], rec["suffix"] = parts
    elif kind == "tokens":
        tok = normalize_tokens(raw)
        if isinstance(tok, Rejected):
            return tok
        rec["input_ids"], rec["loss_mask"] = tok
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    original = raw.get("original_json")
    if isinstance(original, str):
        rec["original_json"] = original
    return rec


def parse_messages(messages_json: str) -> list[dict[str, str]]:
    """The chat turns of a record (the inverse of what `normalize_record` stores)."""
    return json.loads(messages_json)
