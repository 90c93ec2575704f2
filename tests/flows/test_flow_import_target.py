"""A .gguf target through the whole retrain flow (quick preset, a real Prefect server).

The tiny GGUF Llama written by the `gguf` package is imported first; extract_hidden, train,
export and evaluate then load the import_target artifact as their target. A second run is
cached from import_target on.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def _chats(n: int, start: int = 0) -> str:
    rows = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"Write a function that returns {i} plus one."},
                {"role": "assistant", "content": f"def f():\n    return {i} + 1\n"},
            ],
        }
        for i in range(start, start + n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_retrain_on_a_gguf_target(prefect_server, tmp_path):
    from flows.retrain import retrain
    from storage import ArtifactStore
    from tests.eagle_core.conftest import CHATML, build_bpe_tokenizer
    from tests.eagle_core.tiny_gguf import build_tiny_gguf

    tok_dir = build_bpe_tokenizer(os.fspath(tmp_path / "tok"), "starcoder", "chatml")
    gguf_path = os.fspath(tmp_path / "tiny.gguf")
    build_tiny_gguf(gguf_path, tok_dir, CHATML, num_layers=8)  # EAGLE-3's aux layers exist
    chats, heldout = tmp_path / "chats.jsonl", tmp_path / "heldout.jsonl"
    chats.write_text(_chats(12))
    heldout.write_text(_chats(2, start=1000))
    params = {
        "target": gguf_path,
        "data": {"datasets": [{"path": str(chats), "kind": "chat"}]},
        "evaluate": {"prompts": [str(heldout)]},
        "quick": True,
        "storage": {"root": str(tmp_path / "store")},
    }
    first = retrain(**params)
    imported = first["refs"]["import_target"][0]
    assert imported["stage"] == "import_target"
    assert first["tau"] is not None and first["tau"] >= 1.0
    store, stage, key = ArtifactStore.for_url(first["refs"]["train"][0]["url"])
    target_fp = store.manifest(stage, key).meta["fingerprints"]["target"]
    assert (target_fp["kind"], target_fp["stage"]) == ("artifact", "import_target")
    again = retrain(**params)
    assert all(again["cached"].values()), again["cached"]
    assert again["refs"] == first["refs"]
