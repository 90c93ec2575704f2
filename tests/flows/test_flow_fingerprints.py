"""Scheduled retraining follows its inputs (the retrain flow on a real Prefect server).

A quick run on a local target directory and a local chat file, then: the same run again
(every stage cached), the chat file grown (download and everything after it recompute, the
new rows are trained), and the target's weights rewritten in place with the same size and
config (extract_hidden, train, export and evaluate recompute; download, tokenize and
scan_vocab stay cached: the tokenizer did not change). Each recompute says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

import pytest

pytestmark = pytest.mark.slow

TARGET_STAGES = ("extract_hidden", "train", "export", "evaluate")


def _chats(n: int, start: int = 0) -> str:
    rows = []
    for i in range(start, start + n):
        rows.append(
            {
                "id": f"c{i}",
                "messages": [
                    {"role": "user", "content": f"Write a function that returns {i} plus one."},
                    {"role": "assistant", "content": f"def f():\n    return {i} + 1\n"},
                ],
            }
        )
    return "".join(json.dumps(r) + "\n" for r in rows)


def _artifact_keys(flow_run_id: Any) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    return {a.key for a in asyncio.run(read()) if a.key}


def _run(params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from flows.retrain import retrain

    state = retrain(**params, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def _meta(result: dict[str, Any], stage: str) -> dict[str, Any]:
    from storage import ArtifactStore

    store, st, key = ArtifactStore.for_url(result["refs"][stage][0]["url"])
    return store.manifest(st, key).meta


def test_retrain_follows_source_and_target_content(
    prefect_server, tmp_path, small_target_dir, small_tokenizer_dir
):
    from safetensors.torch import load_file, save_file

    target = str(tmp_path / "target")  # a copy: the session's small target stays as it is
    shutil.copytree(small_target_dir, target)
    chats, heldout = tmp_path / "chats.jsonl", tmp_path / "heldout.jsonl"
    chats.write_text(_chats(12))
    heldout.write_text(_chats(2, start=1000))
    params = {
        "target": target,
        "tokenizer": small_tokenizer_dir,
        "data": {"datasets": [{"path": str(chats), "kind": "chat"}], "max_samples": 1000},
        "evaluate": {"prompts": [str(heldout)]},
        "quick": True,
        "storage": {"root": str(tmp_path / "store")},
    }
    first, _ = _run(params)
    assert not any(first["cached"].values()), first["cached"]
    assert _meta(first, "train")["fingerprints"]["target"]["kind"] == "model_dir"

    # nothing changed: every stage cached, the same keys
    again, _ = _run(params)
    assert all(again["cached"].values()), again["cached"]
    assert again["refs"] == first["refs"]

    # the source grew: download and everything downstream recompute; the held-out download
    # (another file) stays cached
    chats.write_text(_chats(24))
    grown, run_id = _run(params)
    assert [s for s, c in grown["cached"].items() if c] == [], grown["cached"]
    assert {r["counts"]["rows"] for r in first["refs"]["download"]} == {12, 2}
    assert {r["counts"]["rows"] for r in grown["refs"]["download"]} == {24, 2}
    assert grown["refs"]["download"][1] == first["refs"]["download"][1]  # held-out: cached
    assert (
        grown["refs"]["train"][0]["counts"]["train_samples"]
        > (first["refs"]["train"][0]["counts"]["train_samples"])
    )
    reason = _meta(grown, "download")["recompute_reason"]  # refs: training data first
    assert reason.startswith(f"source {chats} changed: 12 -> 24 rows; size ")
    assert "download-recompute-reason" in _artifact_keys(run_id)

    # the target fine-tuned in place: same path, config.json, file names and sizes
    weights = os.path.join(target, "model.safetensors")
    size = os.path.getsize(weights)
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    assert os.path.getsize(weights) == size
    tuned, run_id = _run(params)
    recomputed = {s for s, c in tuned["cached"].items() if not c}
    assert recomputed == set(TARGET_STAGES), tuned["cached"]
    assert tuned["refs"]["tokenize"] == grown["refs"]["tokenize"]  # same tokenizer
    why = _meta(tuned, "extract_hidden")["recompute_reason"]
    assert why.startswith(f"target {target} changed: model.safetensors: ")
    assert "same size, new content" in why
    assert "extract-hidden-recompute-reason" in _artifact_keys(run_id)
    fps = _meta(tuned, "evaluate")["fingerprints"]
    assert fps["target"]["digest"] == _meta(tuned, "train")["fingerprints"]["target"]["digest"]
    assert [s["source"] for s in fps["sources"]] == [str(chats)]
