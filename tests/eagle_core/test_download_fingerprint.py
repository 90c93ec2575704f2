"""download keys on what its sources hold: a file that grows or an S3 object overwritten in
place is read again (the new rows are there); an unchanged source stays cached."""

from __future__ import annotations

import json
import os

from eagle_core.download import DownloadConfig, SourceSpec, download, download_key
from storage import ArtifactStore
from storage.shards import iter_batches


def _chat(i: int, answer: str = "hello") -> dict:
    return {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": f"{answer} {i}"},
        ],
    }


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _answers(store: ArtifactStore, ref) -> list[str]:
    rows = [r for b in iter_batches(store, ref) for r in b.to_pylist()]
    return [json.loads(r["messages_json"])[-1]["content"] for r in rows]


def test_a_growing_file_is_read_again_and_says_why(tmp_path):
    src = tmp_path / "chats.jsonl"
    src.write_bytes(_jsonl([_chat(i) for i in range(50)]))
    cfg = DownloadConfig(sources=(SourceSpec(path=str(src), kind="chat"),), shuffle=False)
    root = str(tmp_path / "store")
    first = download(ArtifactStore(root), cfg)
    assert first.counts["rows"] == 50
    created = ArtifactStore(root).manifest("download", first.key).created_at

    again = download(ArtifactStore(root), cfg)  # unchanged: same key, nothing rewritten
    assert again.key == first.key
    assert ArtifactStore(root).manifest("download", first.key).created_at == created

    src.write_bytes(_jsonl([_chat(i) for i in range(100)]))
    grown = download(ArtifactStore(root), cfg)
    assert grown.key != first.key and grown.counts["rows"] == 100
    meta = ArtifactStore(root).manifest("download", grown.key).meta
    assert meta["recompute_reason"].startswith(f"source {src} changed: 50 -> 100 rows; size ")
    (fp,) = meta["fingerprints"]["sources"]
    assert fp["source"] == str(src) and fp["files"][0]["size"] == src.stat().st_size


def test_s3_object_overwritten_in_place_is_recomputed(s3_root, tmp_path):
    import fsspec

    from storage.urls import fs_options

    url = s3_root.rsplit("/", 1)[0] + "/data/chats.jsonl"
    old, new = (
        _jsonl([_chat(i, "hello") for i in range(4)]),
        _jsonl([_chat(i, "HELLO") for i in range(4)]),
    )
    assert len(old) == len(new)  # same size: only the object's ETag tells them apart
    with fsspec.open(url, "wb", **fs_options(url)) as fh:
        fh.write(old)
    store = ArtifactStore(s3_root)
    cfg = DownloadConfig(sources=(SourceSpec(path=url, kind="chat"),), shuffle=False)
    first = download(store, cfg)
    assert download_key(ArtifactStore(s3_root), cfg) == first.key  # stable while unchanged
    with fsspec.open(url, "wb", **fs_options(url)) as fh:
        fh.write(new)
    second = download(ArtifactStore(s3_root), cfg)
    assert second.key != first.key
    assert _answers(store, second) == [f"HELLO {i}" for i in range(4)]
    reason = store.manifest("download", second.key).meta["recompute_reason"]
    assert "ETag" in reason and "4 -> 4 rows" not in reason


def test_a_source_gone_since_its_download_keeps_its_last_download(tmp_path):
    src = tmp_path / "scratch.jsonl"
    src.write_bytes(_jsonl([_chat(i) for i in range(3)]))
    cfg = DownloadConfig(sources=(SourceSpec(path=str(src), kind="chat"),))
    store = ArtifactStore(str(tmp_path / "store"))
    ref = download(store, cfg)
    os.remove(src)
    assert download(ArtifactStore(store.root), cfg).key == ref.key


def test_a_hub_dataset_keys_on_its_commit_resolved_offline(tmp_path, monkeypatch):
    from eagle_core.download import source_fingerprint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub" / "datasets--org--chats" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = DownloadConfig(sources=(SourceSpec(path="org/chats", kind="chat"),))
    fp = source_fingerprint(cfg.sources[0])
    assert (fp["kind"], fp["sha"], fp["resolved_by"]) == ("hub", "a" * 40, "cache")
    before = download_key(store, cfg)
    (refs / "main").write_text("b" * 40)  # `main` moved: the dataset is read again
    assert download_key(store, cfg) != before
    pinned = DownloadConfig(sources=(SourceSpec(path="org/chats", revision="a" * 40),))
    assert source_fingerprint(pinned.sources[0])["resolved_by"] == "pinned"
