"""Source text and demo datasets drawn from the installed Python standard library.

Everything here is a pure function of the stdlib files on disk and a seed: the same Python
install and seed give byte-identical samples. Modules are split into train and held-out by a
hash of the module name, so the two splits never share a file.

Sample kinds (their on-disk formats are FORMATS.md's):

- chat: "what does function X do?" answered with its docstring, and "write the function
  with this signature" answered with its source (both found with `ast`);
- fim: a prefix/middle/suffix split of a file (middles are 1-4 whole lines or a span inside
  one line), seeded per file;
- files: whole files `{"content", "path"}`.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Split = Literal["train", "heldout"]

# Directories that hold tests, demos or third-party code rather than library source.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "turtledemo",
        "lib2to3",
    }
)
SYSTEM_PROMPT = "You are a concise assistant for the Python standard library."


@dataclass(frozen=True)
class SourceFile:
    """One stdlib module: dotted name, path relative to the stdlib root (posix), its text."""

    module: str
    path: str
    text: str


def stdlib_root() -> str:
    """The directory of the running interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str | None = None) -> list[str]:
    """Relative posix paths of the stdlib's own `.py` files (no tests, no site-packages), sorted."""
    root = root or stdlib_root()
    out: list[str] = []
    for base, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(base, name), root).replace(os.sep, "/")
                out.append(rel)
    return sorted(out)


def listing_hash(root: str | None = None, paths: list[str] | None = None) -> str:
    """sha256 over `path<TAB>size` lines: changes when the installed stdlib changes."""
    root = root or stdlib_root()
    paths = paths if paths is not None else list_stdlib_files(root)
    h = hashlib.sha256()
    for rel in paths:
        h.update(f"{rel}\t{os.path.getsize(os.path.join(root, rel))}\n".encode())
    return h.hexdigest()


def module_name(rel: str) -> str:
    """`email/mime/text.py` -> `email.mime.text`; `json/__init__.py` -> `json`."""
    mod = rel[: -len(".py")].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def split_of(module: str, heldout_permille: int) -> Split:
    """Deterministic split by module name: a stable hash, never Python's salted `hash()`."""
    bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 1000
    return "heldout" if bucket < heldout_permille else "train"


def read_sources(
    root: str | None = None,
    *,
    max_file_chars: int = 60_000,
    modules: list[str] | None = None,
) -> tuple[list[SourceFile], dict[str, int]]:
    """Read the stdlib files that are UTF-8 Python source and not too large.

    Args:
        root: stdlib directory (default: this interpreter's).
        max_file_chars: longer files are skipped (counted), not truncated, so whole-file
            samples stay whole.
        modules: only these dotted module names (tests and fixtures use a handful).

    Returns:
        (files sorted by path, reject counts by reason).
    """
    root = root or stdlib_root()
    rejects = {"not_utf8": 0, "too_large": 0, "syntax_error": 0}
    wanted = set(modules) if modules is not None else None
    out: list[SourceFile] = []
    for rel in list_stdlib_files(root):
        mod = module_name(rel)
        if wanted is not None and mod not in wanted:
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            rejects["not_utf8"] += 1
            continue
        if len(text) > max_file_chars:
            rejects["too_large"] += 1
            continue
        try:
            ast.parse(text)
        except SyntaxError:  # e.g. lib2to3-era fixtures kept for tests
            rejects["syntax_error"] += 1
            continue
        out.append(SourceFile(module=mod, path=rel, text=text))
    if wanted is not None and len(out) < len(wanted):
        missing = sorted(wanted - {f.module for f in out})
        log.warning("stdlib modules not found or rejected: %s", missing)
    return out, rejects


def _seed_for(seed: int, module: str, what: str) -> int:
    return int(hashlib.sha256(f"{seed}:{what}:{module}".encode()).hexdigest()[:16], 16)


def chat_samples(
    src: SourceFile, *, seed: int, max_answer_chars: int = 1200
) -> Iterator[dict[str, object]]:
    """Chat samples from one module: docstring questions and write-this-function tasks.

    Yields dicts `{"id": str, "messages": [{"role", "content"}, ...]}` (OpenAI layout).
    """
    rng = random.Random(_seed_for(seed, src.module, "chat"))
    tree = ast.parse(src.text)
    lines = src.text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        name = node.name
        if name.startswith("__") or not node.body:
            continue
        doc = ast.get_docstring(node)
        sysmsg = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        if doc and 20 <= len(doc) <= max_answer_chars:
            q = f"What does the function `{name}` in the `{src.module}` module do?"
            yield {
                "id": f"{src.module}:{name}:{node.lineno}:doc",
                "messages": [
                    *sysmsg,
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": doc},
                ],
            }
        first_body = node.body[0].lineno - 1
        sig_start = node.lineno - 1
        code_lines = lines[sig_start : node.end_lineno]
        code = _dedent("\n".join(code_lines))
        sig = _dedent("\n".join(lines[sig_start:first_body])) if first_body > sig_start else ""
        if sig and 40 <= len(code) <= max_answer_chars and code.startswith(sig):
            q = (
                f"Write the Python function with this signature, as in the `{src.module}` "
                f"module:\n```python\n{sig}\n```"
            )
            yield {
                "id": f"{src.module}:{name}:{node.lineno}:body",
                "messages": [
                    *sysmsg,
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"```python\n{code}\n```"},
                ],
            }


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text).strip("\n")


def fim_samples(
    src: SourceFile,
    *,
    seed: int,
    per_file: int,
    max_prefix_chars: int = 1200,
    max_suffix_chars: int = 400,
    span_share: float = 0.3,
    max_lines: int = 4,
) -> Iterator[dict[str, str]]:
    """FIM samples `{"id", "prefix", "middle", "suffix"}` from one module, seeded per file.

    Middles are a span inside one line (`span_share` of them) or 1..`max_lines` whole
    lines; never empty or blank. Prefix and suffix are cut to a window around the middle
    (the start of a line when possible) so samples stay short for a small model.
    """
    rng = random.Random(_seed_for(seed, src.module, "fim"))
    text = src.text
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    n_lines = len(starts)
    if n_lines < 8:
        return
    made = 0
    seen: set[tuple[int, int]] = set()  # the same span twice would repeat a sample id
    for _attempt in range(per_file * 4):
        if made >= per_file:
            break
        li = rng.randrange(2, n_lines - 2)
        if rng.random() >= span_share:
            k = rng.randint(1, max_lines)
            a = starts[li]
            b = starts[min(li + k, n_lines - 1)]
        else:
            line_end = starts[li + 1] - 1
            line = text[starts[li] : line_end]
            stripped = len(line) - len(line.lstrip())
            if len(line) - stripped < 6:
                continue
            a = starts[li] + rng.randrange(stripped, len(line) - 2)
            b = rng.randrange(a + 1, line_end + 1)
        middle = text[a:b]
        if not middle.strip() or len(middle) > 400 or (a, b) in seen:
            continue
        seen.add((a, b))
        p0 = max(0, a - max_prefix_chars)
        if p0 > 0:
            nl = text.find("\n", p0, a)
            p0 = nl + 1 if nl != -1 else p0
        s1 = min(len(text), b + max_suffix_chars)
        if s1 < len(text):
            nl = text.rfind("\n", b, s1)
            s1 = nl + 1 if nl != -1 else s1
        yield {
            "id": f"{src.module}:{a}:{b}",
            "prefix": text[p0:a],
            "middle": middle,
            "suffix": text[b:s1],
        }
        made += 1


def to_sharegpt(sample: dict[str, object]) -> dict[str, object]:
    """OpenAI-messages sample -> ShareGPT `{"id", "conversations": [{"from", "value"}]}`."""
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    msgs = sample["messages"]
    assert isinstance(msgs, list)
    return {
        "id": sample["id"],
        "conversations": [{"from": who[m["role"]], "value": m["content"]} for m in msgs],
    }
