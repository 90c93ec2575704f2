"""Fill-in-the-middle (FIM): sentinel tokens, file splitting, and PSM / SPM sequences.

Sequences (P, S, M = prefix, suffix, middle token ids; <end> = the end-of-middle token):
- PSM: `<pre> P <suf> S <mid> M <end>` (the standard order).
- SPM: `<pre> <suf> S <mid> P M <end>`: "variant 2" of Bavarian et al. (2022), the SPM
  layout StarCoder (bigcode Megatron `permute`) and CodeLlama (`infilling_prompt_tokens`
  with `suffix_first=True`) are trained and served with; the prompt ends after P, so the
  middle continues the prefix directly.

Every piece is encoded on its own and the ids are concatenated, so no BPE merge ever joins a
middle token with a prefix or suffix token: the loss mask is exact by construction (PSM
pieces are separated by special tokens anyway, so this equals tokenizing the rendered text;
a test checks that). `loss_mask = 1` on exactly M and <end>.

Token strings come from the tokenizer (`discover_fim_tokens`), never hard-coded ids.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from eagle_core.errors import ConfigError

log = logging.getLogger(__name__)

FimOrder = Literal["psm", "spm"]
SpanMode = Literal["chars", "lines", "ast"]


@dataclass(frozen=True)
class FimTokens:
    """The four FIM token strings of a tokenizer family, and their ids."""

    prefix: str
    suffix: str
    middle: str
    end: str
    prefix_id: int = -1
    suffix_id: int = -1
    middle_id: int = -1
    end_id: int = -1
    family: str = "explicit"


# (family, prefix, suffix, middle, end candidates in order of preference). CodeLlama's
# SentencePiece vocab spells them with a leading "▁"; HF tokenizers expose both forms.
FIM_FAMILIES: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<|endoftext|>",)),
    # Qwen2.5-Coder ends a completed middle with <|endoftext|> (its eos for FIM);
    # <|fim_pad|> is padding only.
    ("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", ("<|endoftext|>",)),
    ("codellama", "<PRE>", "<SUF>", "<MID>", ("<EOT>",)),
    # DeepSeek-Coder: begin = prefix marker, hole = suffix marker, end = middle marker
    ("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", ("<｜end▁of▁sentence｜>",)),
    ("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>", "<EOT>")),
)


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` if the tokenizer encodes it as exactly one token, else None."""
    vocab = tokenizer.get_vocab()
    if text not in vocab:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] == vocab[text] else None


def discover_fim_tokens(tokenizer: Any, override: Sequence[str] | None = None) -> FimTokens:
    """Find the tokenizer's FIM sentinel tokens.

    Args:
        tokenizer: a transformers tokenizer.
        override: (prefix, suffix, middle, end) token strings, used instead of discovery.

    Raises:
        ConfigError: no known family is in the vocab, or an override string is not one token.
    """
    if override is not None:
        if len(override) != 4:
            raise ConfigError(
                f"fim_tokens={list(override)} has {len(override)} entries",
                fix="give exactly 4 token strings: prefix, suffix, middle, end",
            )
        ids = [_single_token_id(tokenizer, t) for t in override]
        bad = [t for t, i in zip(override, ids, strict=True) if i is None]
        if bad:
            raise ConfigError(
                f"fim_tokens {bad} are not single tokens of tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '?')}",
                fix="use token strings from the tokenizer's vocab (added/special tokens)",
            )
        p, s, m, e = override
        return FimTokens(p, s, m, e, *ids, family="explicit")  # type: ignore[arg-type]
    for family, p, s, m, ends in FIM_FAMILIES:
        ids = [_single_token_id(tokenizer, t) for t in (p, s, m)]
        if any(i is None for i in ids):
            continue
        candidates = [*ends, tokenizer.eos_token] if tokenizer.eos_token else list(ends)
        for e in candidates:
            eid = _single_token_id(tokenizer, e)
            if eid is not None:
                return FimTokens(p, s, m, e, *ids, eid, family=family)  # type: ignore[misc]
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has {family} FIM tokens but "
            f"no end token (tried {candidates})",
            fix="pass fim_tokens=(prefix, suffix, middle, end) with an end token of the vocab",
        )
    raise ConfigError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no FIM tokens "
        "(looked for StarCoder <fim_prefix>, Qwen <|fim_prefix|>, CodeLlama <PRE>, "
        "DeepSeek <｜fim▁begin｜>)",
        fix="use a code model's tokenizer with FIM tokens, pass fim_tokens=(prefix, suffix, "
        "middle, end) explicitly, or tokenize this data as chat",
    )


@dataclass(frozen=True)
class FimSample:
    """A FIM training sequence. input_ids, loss_mask: [T]."""

    input_ids: list[int]
    loss_mask: list[int]


def build_fim_sample(
    tokens: FimTokens,
    prefix_ids: list[int],
    middle_ids: list[int],
    suffix_ids: list[int],
    order: FimOrder,
) -> FimSample:
    """Concatenate separately encoded pieces with the sentinels; mask = middle + <end>."""
    t = tokens
    if order == "psm":
        head = [t.prefix_id, *prefix_ids, t.suffix_id, *suffix_ids, t.middle_id]
    elif order == "spm":
        head = [t.prefix_id, t.suffix_id, *suffix_ids, t.middle_id, *prefix_ids]
    else:
        raise ConfigError(f"fim_order={order!r} is unknown", fix="use 'psm' or 'spm'")
    ids = [*head, *middle_ids, t.end_id]
    mask = [0] * len(head) + [1] * (len(middle_ids) + 1)
    return FimSample(ids, mask)


def fim_ids(
    tokens: FimTokens,
    prefix_ids: np.ndarray,
    middle_ids: np.ndarray,
    suffix_ids: np.ndarray,
    order: FimOrder,
) -> tuple[np.ndarray, int]:
    """`build_fim_sample` on int32 arrays: (input_ids [T] int32, n_head); the loss mask is
    1 on input_ids[n_head:] (middle + <end>)."""
    t = tokens

    def one(i: int) -> np.ndarray:
        return np.array([i], dtype=np.int32)

    if order == "psm":
        head = [one(t.prefix_id), prefix_ids, one(t.suffix_id), suffix_ids, one(t.middle_id)]
    elif order == "spm":
        head = [one(t.prefix_id), one(t.suffix_id), suffix_ids, one(t.middle_id), prefix_ids]
    else:
        raise ConfigError(f"fim_order={order!r} is unknown", fix="use 'psm' or 'spm'")
    n_head = 3 + len(prefix_ids) + len(suffix_ids)
    return np.concatenate([*head, middle_ids, one(t.end_id)]).astype(np.int32), n_head


def build_plain_sample(code_ids: list[int], end_id: int) -> FimSample:
    """A left-to-right code sample (the non-FIM share of a mix): every token is learned."""
    ids = [*code_ids, end_id]
    return FimSample(ids, [1] * len(ids))


def record_rng(seed: int, sample_id: str, purpose: str) -> random.Random:
    """A generator seeded by (seed, sample id, purpose): the same draw in any order/process."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{sample_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ---- splitting whole files into prefix / middle / suffix ----------------------------------


def split_chars(content: str, rng: random.Random) -> tuple[str, str, str]:
    """A middle of random characters: two distinct cut points, middle non-empty."""
    n = len(content)
    a, b = sorted(rng.sample(range(n + 1), 2))
    return content[:a], content[a:b], content[b:]


def split_lines(content: str, rng: random.Random) -> tuple[str, str, str]:
    """A middle of whole lines (a random run of 1+ lines, line endings kept)."""
    lines = content.splitlines(keepends=True)
    nonblank = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(lines) < 2 or not nonblank:
        return split_chars(content, rng)
    start = rng.choice(nonblank)
    stop = rng.randint(start + 1, len(lines))
    return "".join(lines[:start]), "".join(lines[start:stop]), "".join(lines[stop:])


_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what Python's tokenizer counts (not \f, \u2028)
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _statements(tree: ast.AST) -> list[ast.stmt]:
    """Every statement at any depth (blocks included), without visiting expressions."""
    out: list[ast.stmt] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for name in _BLOCK_FIELDS:
            children = getattr(node, name, None)
            if isinstance(children, list):
                for child in children:
                    if isinstance(child, ast.stmt):
                        out.append(child)
                    if isinstance(child, ast.AST):
                        stack.append(child)  # also except handlers / match cases
    out.sort(key=lambda n: (n.lineno, n.col_offset))
    return out


def _node_span(content: str, line_starts: list[int], node: ast.AST) -> tuple[int, int]:
    """Char span [a, b) of a node (ast columns are UTF-8 byte offsets within the line)."""

    def offset(lineno: int, col: int) -> int:
        start = line_starts[lineno - 1]
        end = line_starts[lineno] if lineno < len(line_starts) else len(content)
        return start + len(content[start:end].encode("utf-8")[:col].decode("utf-8", "ignore"))

    a = offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
    return a, offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]


def split_ast(content: str, rng: random.Random) -> tuple[tuple[str, str, str], bool]:
    """A middle that is one Python AST node: a statement (a whole block for compound ones)
    or, half of the time for simple statements, an expression inside it.

    Returns ((prefix, middle, suffix), used_ast); used_ast is False when the file does not
    parse as Python (or has no statement), in which case whole lines are used instead.
    """
    try:
        stmts = _statements(ast.parse(content))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        stmts = []
    if stmts:
        line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(content)]
        node: ast.AST = stmts[rng.randrange(len(stmts))]
        if rng.random() < 0.5 and not hasattr(node, "body"):
            exprs = [n for n in ast.walk(node) if isinstance(n, ast.expr)]
            node = exprs[rng.randrange(len(exprs))] if exprs else node
        a, b = _node_span(content, line_starts, node)
        if b > a and content[a:b].strip():
            return (content[:a], content[a:b], content[b:]), True
    return split_lines(content, rng), False


@dataclass
class FileSplitter:
    """Splits whole files with a per-record seed; counts AST fallbacks."""

    mode: SpanMode = "lines"
    seed: int = 0
    ast_fallbacks: int = 0

    def __call__(
        self, content: str, sample_id: str, is_python: bool | None = None
    ) -> tuple[str, str, str]:
        """Split one file. is_python=False skips the AST attempt (known non-Python file)."""
        rng = record_rng(self.seed, sample_id, "fim_split")
        if self.mode == "chars":
            return split_chars(content, rng)
        if self.mode == "lines":
            return split_lines(content, rng)
        if self.mode == "ast":
            if is_python is False:
                self.ast_fallbacks += 1
                return split_lines(content, rng)
            parts, used = split_ast(content, rng)
            self.ast_fallbacks += not used
            return parts
        raise ConfigError(f"fim_split={self.mode!r} is unknown", fix="use chars, lines or ast")


__all__ = [
    "FIM_FAMILIES",
    "FileSplitter",
    "FimOrder",
    "FimSample",
    "FimTokens",
    "SpanMode",
    "build_fim_sample",
    "build_plain_sample",
    "discover_fim_tokens",
    "fim_ids",
    "record_rng",
    "split_ast",
    "split_chars",
    "split_lines",
]
