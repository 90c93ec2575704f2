"""Content keys: same inputs give the same key in any process; any change gives a new key."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from storage import ArtifactStore, StageRef, content_key
from storage.keys import KEY_LENGTH


class Fmt(enum.Enum):
    CHAT = "chat"
    FIM = "fim"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cfg:
    max_length: int = 2048
    lr: float = 5e-5
    fmt: Fmt = Fmt.CHAT
    layers: tuple[int, ...] = (1, 3, 4)
    extra: dict | None = None


class Form(BaseModel):
    steps: int = 7


TOKENS = StageRef(stage="tokenize", key="a" * KEY_LENGTH, url="/r/tokenize/" + "a" * KEY_LENGTH)
BASE = dict(stage="train", params=Cfg(extra={"b": 1, "a": [1.5, None]}), inputs=[TOKENS], code="1")

# The same computation in a fresh interpreter (another process, another hash seed).
_CHILD = """
import dataclasses, enum, json, sys
sys.path.insert(0, sys.argv[1])
from test_storage_keys import BASE, Cfg, Form, Fmt, TOKENS
from storage import content_key
print(json.dumps([
    content_key(**BASE),
    content_key("x", {"z": 1, "a": {"y": [1, 2], "b": True}}),
    content_key("x", Form(steps=3)),
    content_key("x", Cfg(fmt=Fmt.FIM, extra={"s": {3, 1, 2}, 2: "int key"})),
]))
"""


def _here_keys() -> list[str]:
    return [
        content_key(**BASE),
        content_key("x", {"a": {"b": True, "y": [1, 2]}, "z": 1}),  # other dict order
        content_key("x", Form(steps=3)),
        content_key("x", Cfg(fmt=Fmt.FIM, extra={2: "int key", "s": {2, 3, 1}})),
    ]


def test_same_inputs_same_key_across_processes() -> None:
    repo = Path(__file__).parent.parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _here_keys()


def test_key_is_pinned() -> None:
    """The canonical form is a storage format: changing it re-runs every stage everywhere."""
    assert content_key("tokenize", {"max_length": 2048, "fmt": "chat"}, [], "1") == (
        PINNED_TOKENIZE_KEY
    )
    key = content_key(**BASE)
    assert len(key) == KEY_LENGTH and all(c in "0123456789abcdef" for c in key)


PINNED_TOKENIZE_KEY = "cef106a2e5a6eac6e51b"


@pytest.mark.parametrize(
    "change",
    [
        dict(params=Cfg(max_length=2049, extra={"b": 1, "a": [1.5, None]})),
        dict(params=Cfg(lr=5.000001e-5, extra={"b": 1, "a": [1.5, None]})),
        dict(params=Cfg(fmt=Fmt.FIM, extra={"b": 1, "a": [1.5, None]})),
        dict(params=Cfg(layers=(1, 3, 5), extra={"b": 1, "a": [1.5, None]})),
        dict(params=Cfg(extra={"b": 1, "a": [1.5, 0]})),  # None -> 0
        dict(params=Cfg(extra={"b": True, "a": [1.5, None]})),  # 1 -> True
        dict(params=Cfg(extra={"b": 1.0, "a": [1.5, None]})),  # 1 -> 1.0
        dict(params=Cfg(extra={"b": "1", "a": [1.5, None]})),  # 1 -> "1"
        dict(params=Cfg(extra={"b": 1, "a": [1.5, None], "c": None})),  # a new entry
        dict(inputs=[dataclasses.replace(TOKENS, key="b" * KEY_LENGTH)]),
        dict(inputs=[dataclasses.replace(TOKENS, stage="download")]),
        dict(inputs=[TOKENS, TOKENS]),
        dict(inputs=[]),
        dict(inputs=[TOKENS, "meta-llama/Llama-3.1-8B"]),
        dict(code="2"),
        dict(stage="train2"),
    ],
)
def test_any_change_gives_a_new_key(change: dict) -> None:
    assert content_key(**{**BASE, **change}) != content_key(**BASE)


def test_input_location_and_counts_do_not_change_the_key(tmp_path: Path) -> None:
    """A ref counts by stage and key only: moving the store (local -> s3) keeps every key."""
    moved = StageRef(stage=TOKENS.stage, key=TOKENS.key, url="s3://b/p/x", counts={"rows": 9})
    assert content_key(**{**BASE, "inputs": [moved]}) == content_key(**BASE)
    # the same holds when a ref sits inside the parameters
    assert content_key("x", {"src": moved}) == content_key("x", {"src": TOKENS})
    store = ArtifactStore(str(tmp_path))
    assert store.key("train", BASE["params"], [TOKENS], "1") == content_key(**BASE)


def test_unkeyable_value_is_refused() -> None:
    with pytest.raises(TypeError, match="object"):
        content_key("x", {"fn": object()})
