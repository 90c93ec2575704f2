"""Fingerprints follow content: files (local and S3 on moto), Hub revisions resolved offline
from a real Hub cache layout, artifacts, and the store's "why did this recompute" index."""

from __future__ import annotations

import hashlib
import json
import os
import time

from storage import ArtifactStore
from storage import fingerprint as fpm
from storage.fingerprint import (
    describe_all,
    describe_change,
    files_fingerprint,
    hub_fingerprint,
    model_fingerprint,
)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _bump_mtime(path: str) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_small_file_same_size_rewrite_changes_touch_does_not(tmp_path):
    src = _write(tmp_path / "chats.jsonl", b'{"a": 1}\n')
    before = files_fingerprint(src)
    assert before["files"][0]["sha256"] == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    _bump_mtime(src)  # touched, same bytes: a full hash proves nothing changed
    assert files_fingerprint(src)["digest"] == before["digest"]
    _write(tmp_path / "chats.jsonl", b'{"a": 2}\n')  # same size, new content
    after = files_fingerprint(src)
    assert after["files"][0]["size"] == before["files"][0]["size"]
    assert after["digest"] != before["digest"]
    why = describe_change(before, after)
    assert why.startswith(f"source {src} changed") and "same size, new content" in why


def test_big_file_is_sampled_and_keyed_by_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(fpm, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(fpm, "SAMPLE_BYTES", 100)
    big = _write(tmp_path / "model.safetensors", bytes(5000))
    a = files_fingerprint(big)
    entry = a["files"][0]
    assert "sha256" not in entry and len(entry["sampled_sha256"]) == 64
    _bump_mtime(big)  # rewritten in place with the same bytes and size: mtime says "new"
    assert files_fingerprint(big)["digest"] != a["digest"]
    with open(big, "r+b") as fh:  # a change inside the tail window
        fh.seek(4950)
        fh.write(b"x")
    os.utime(big, ns=(entry["mtime_ns"], entry["mtime_ns"]))  # even with the old mtime
    assert files_fingerprint(big)["files"][0]["sampled_sha256"] != entry["sampled_sha256"]


def test_glob_covers_every_match(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "a.jsonl", b"1\n")
    a = files_fingerprint(str(d / "*.jsonl"))
    assert [os.path.basename(f["name"]) for f in a["files"]] == ["a.jsonl"]
    _write(d / "b.jsonl", b"2\n")
    b = files_fingerprint(str(d / "*.jsonl"))
    assert len(b["files"]) == 2 and b["digest"] != a["digest"]
    assert "1 file(s) added (b.jsonl)" in describe_change(a, b)


def test_s3_object_overwritten_in_place_changes(s3_root):
    import fsspec

    from storage.urls import fs_options

    url = s3_root.rsplit("/", 1)[0] + "/data/chats.jsonl"
    opts = fs_options(url)
    with fsspec.open(url, "wb", **opts) as fh:
        fh.write(b'{"a": 1}\n')
    a = files_fingerprint(url, storage_options=opts)
    assert a["files"][0]["ETag"]
    with fsspec.open(url, "wb", **opts) as fh:  # same key, same size, new object
        fh.write(b'{"a": 2}\n')
    b = files_fingerprint(url, storage_options=opts)
    assert b["files"][0]["size"] == a["files"][0]["size"]
    assert b["digest"] != a["digest"]
    assert "ETag" in describe_change(a, b)
    assert files_fingerprint(url, storage_options=opts)["digest"] == b["digest"]  # stable


def _hub_cache(root, repo_type: str, repo_id: str) -> str:
    repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    return str(repo)


def _snapshot(repo: str, sha: str, files: dict[str, bytes]) -> None:
    """Hub cache layout: snapshots/<sha>/<name> -> ../../blobs/<sha256 of the content>."""
    snap = os.path.join(repo, "snapshots", sha)
    os.makedirs(snap, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as fh:
            fh.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))


def test_hub_dataset_revision_resolved_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = _hub_cache(tmp_path, "dataset", "org/chats")
    sha1, sha2 = "a" * 40, "b" * 40
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(sha1)
    a = hub_fingerprint("org/chats", "dataset")
    assert (a["sha"], a["resolved_by"], a["revision"]) == (sha1, "cache", "main")
    with open(os.path.join(repo, "refs", "main"), "w") as fh:  # `main` moved
        fh.write(sha2)
    b = hub_fingerprint("org/chats", "dataset")
    assert b["sha"] == sha2 and b["digest"] != a["digest"]
    assert describe_change(a, b) == (
        f"source org/chats@main changed: commit {sha1[:12]} -> {sha2[:12]}"
    )
    pinned = hub_fingerprint("org/chats", "dataset", revision=sha1)  # never looked up
    assert (pinned["sha"], pinned["resolved_by"]) == (sha1, "pinned")
    assert pinned["digest"] == a["digest"]  # same commit, however it was resolved


def test_hub_model_blobs_are_the_weights_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = _hub_cache(tmp_path, "model", "org/target")
    tok = {"tokenizer.json": b'{"v": 1}', "config.json": b"{}"}
    _snapshot(repo, "1" * 40, {**tok, "model.safetensors": b"weights-1"})
    _snapshot(repo, "2" * 40, {**tok, "model.safetensors": b"weights-2"})
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write("1" * 40)
    a, ta = model_fingerprint("org/target"), model_fingerprint("org/target", part="tokenizer")
    weights = {f["name"]: f for f in a["files"]}["model.safetensors"]
    assert weights["sha256"] == hashlib.sha256(b"weights-1").hexdigest()  # nothing hashed
    with open(os.path.join(repo, "refs", "main"), "w") as fh:  # fine-tuned: new weights only
        fh.write("2" * 40)
    b, tb = model_fingerprint("org/target"), model_fingerprint("org/target", part="tokenizer")
    assert b["digest"] != a["digest"]
    assert tb["digest"] == ta["digest"]  # same tokenizer files: tokenize keeps its key
    assert model_fingerprint("org/target@" + "1" * 40)["digest"] == a["digest"]


def test_model_dir_weights_rewritten_same_size(tmp_path):
    d = tmp_path / "target"
    d.mkdir()
    _write(d / "config.json", b'{"hidden_size": 64}')
    _write(d / "tokenizer.json", b'{"v": 1}')
    _write(d / "model.safetensors", b"\x00" * 64)
    _write(d / "notes.md", b"not part of the model")
    (d / ".cache").mkdir()
    _write(d / ".cache" / "x.json", b"{}")
    a, ta = model_fingerprint(str(d)), model_fingerprint(str(d), part="tokenizer")
    names = [os.path.basename(f["name"]) for f in a["files"]]
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [os.path.basename(f["name"]) for f in ta["files"]] == ["tokenizer.json"]
    _write(d / "model.safetensors", b"\x01" * 64)
    b = model_fingerprint(str(d))
    assert b["digest"] != a["digest"]
    assert model_fingerprint(str(d), part="tokenizer")["digest"] == ta["digest"]
    why = describe_all({"target": a}, {"target": b})
    assert why.startswith(f"target {d} changed: model.safetensors:")


def test_artifact_fingerprint_is_its_manifest_file_list(store):
    with store.publish("build_demo_target", "k1") as w:
        w.write_bytes("model/model.safetensors", b"w1")
        w.write_bytes("data/x.jsonl", b"{}\n")
    url = store.url("build_demo_target", "k1")
    a = model_fingerprint(url)
    assert (a["kind"], a["key"], a["prefix"], a["files"]) == ("artifact", "k1", "model", 1)
    with store.publish("build_demo_target", "k1") as w:  # rebuilt: data changed, model same
        w.write_bytes("model/model.safetensors", b"w1")
        w.write_bytes("data/x.jsonl", b"{}\n{}\n")
    assert model_fingerprint(url)["digest"] == a["digest"]
    with store.publish("build_demo_target", "k1") as w:
        w.write_bytes("model/model.safetensors", b"w2")
    assert model_fingerprint(url)["digest"] != a["digest"]


def test_store_keys_follow_fingerprints_and_explain_a_recompute(store, tmp_path):
    src = _write(tmp_path / "chats.jsonl", b"1\n")
    params = {"max_samples": None}

    def key_now() -> tuple[ArtifactStore, str]:
        s = ArtifactStore(store.root)  # a fresh process's store
        return s, s.key("download", params, fingerprints={"sources": [files_fingerprint(src)]})

    s1, k1 = key_now()
    assert k1 != s1.key("download", params)  # fingerprints are part of the key
    assert s1.recompute_reason("download", k1) is None  # nothing published before
    with s1.publish("download", k1, params=params) as w:
        w.write_bytes("x", b"x")
    meta = s1.manifest("download", k1).meta
    assert meta["fingerprints"]["sources"][0]["digest"] == files_fingerprint(src)["digest"]
    assert "recompute_reason" not in meta

    s2, k2 = key_now()
    assert k2 == k1  # unchanged input: same key
    time.sleep(0.01)
    _write(tmp_path / "chats.jsonl", b"1\n2\n")
    s3, k3 = key_now()
    assert k3 != k1
    why = s3.recompute_reason("download", k3)
    assert why.startswith(f"source {src} changed: size 2 B -> 4 B, mtime ")
    with s3.publish("download", k3, params=params) as w:
        w.write_bytes("x", b"y")
    assert s3.manifest("download", k3).meta["recompute_reason"] == why
    assert s3.latest_key("download", params) == k3
    index = json.loads(
        s3._read_bytes(s3.path("download", "_latest", f"{s3.key('download', params)}.json"))
    )
    assert index["key"] == k3


def test_resolving_a_big_target_is_cheap(tmp_path):
    """A re-run must not read multi-GB weights: a sparse 4 GiB file costs three samples."""
    d = tmp_path / "big"
    d.mkdir()
    _write(d / "config.json", b"{}")
    with open(d / "model.safetensors", "wb") as fh:
        fh.truncate(4 << 30)
    t0 = time.perf_counter()
    fp = model_fingerprint(str(d))
    elapsed = time.perf_counter() - t0
    assert {
        f["name"].rsplit("/", 1)[-1]: f.get("sampled_sha256") is not None for f in fp["files"]
    } == {
        "config.json": False,
        "model.safetensors": True,
    }
    assert elapsed < 1.0, elapsed
