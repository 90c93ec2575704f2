"""The mutable pointer (storage/pointer.py) on a local root and on S3 (moto): an append-only
history of immutable entries, a head file that follows the newest selected entry, and
concurrent writers (threads, and processes on a local root) that never lose or tear one."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from storage import ArtifactStore
from storage.pointer import PointerLog, new_entry_id


def _log(store: ArtifactStore) -> PointerLog:
    return PointerLog(store, "releases/r", select=lambda e: bool(e.get("promoted")))


def _head_file(store: ArtifactStore) -> dict:
    with store.fs.open(f"{store.root_path}/releases/r/current.json", "rb") as fh:
        return json.loads(fh.read())


def test_entry_ids_sort_by_time():
    ids = [new_entry_id(t) for t in (1_000_000_000_123, 1_000_000_001_000, 2_000_000_000_000)]
    assert ids == sorted(ids)
    assert ids[0].startswith("19700101T001640.000000123Z-")
    assert new_entry_id(5) != new_entry_id(5)  # same instant, two writers: two names


def test_append_head_and_history(store: ArtifactStore):
    log = _log(store)
    assert log.entries() == [] and log.newest() is None
    assert log.read_head().entry is None
    a = log.append({"promoted": True, "export_url": "A"})
    b = log.append({"promoted": False, "export_url": "B"})  # a decision that moves nothing
    assert [e["export_url"] for e in log.entries()] == ["A", "B"]
    assert log.newest() == a
    assert _head_file(store) == a
    c = log.append({"promoted": True, "export_url": "C"})
    assert _head_file(store) == c and log.read_head().stale is False
    assert [e["id"] for e in log.entries()] == [a["id"], b["id"], c["id"]]
    # entries are immutable files named by their id
    names = store.fs.ls(f"{store.root_path}/releases/r/history", detail=False)
    assert sorted(n.rsplit("/", 1)[-1] for n in names) == [f"{e['id']}.json" for e in (a, b, c)]


def test_stale_head_is_reported_and_repaired(store: ArtifactStore):
    log = _log(store)
    a = log.append({"promoted": True, "export_url": "A"})
    # a writer killed after its history entry, before the head: simulate by putting an
    # entry file directly
    eid = new_entry_id()
    doc = {"promoted": True, "export_url": "B", "id": eid}
    with store.fs.open(f"{store.root_path}/releases/r/history/{eid}.json", "wb") as fh:
        fh.write(json.dumps(doc).encode())
    head = log.read_head()
    assert head.stale and head.entry == a and head.newest == doc
    assert log.update_head() == doc
    assert _head_file(store) == doc and not log.read_head().stale


def test_foreign_or_damaged_files_are_skipped(store: ArtifactStore, caplog):
    log = _log(store)
    a = log.append({"promoted": True, "export_url": "A"})
    base = f"{store.root_path}/releases/r/history"
    with store.fs.open(f"{base}/zzz-not-json.json", "wb") as fh:
        fh.write(b"{torn")
    with store.fs.open(f"{base}/29990101T000000.000000000Z-000000000000.json", "wb") as fh:
        fh.write(json.dumps({"promoted": True, "id": "someone-else"}).encode())
    assert log.entries() == [a]
    assert "ignoring" in caplog.text


def _promote_many(root: str, tag: str, n: int, barrier: threading.Barrier | None) -> None:
    store = ArtifactStore(root)
    log = _log(store)
    if barrier is not None:
        barrier.wait()
    for i in range(n):
        log.append({"promoted": True, "export_url": f"{tag}-{i}"})


def _check_consistent(store: ArtifactStore, expected: set[str]) -> None:
    log = _log(store)
    entries = log.entries()
    assert {e["export_url"] for e in entries} == expected  # nothing lost
    assert len(entries) == len(expected)  # nothing doubled
    head = log.read_head()
    assert not head.stale
    assert _head_file(store) == entries[-1]  # valid JSON, the newest entry


def test_concurrent_promotions_threads(store: ArtifactStore):
    n, writers = 5, 4
    barrier = threading.Barrier(writers)
    threads = [
        threading.Thread(target=_promote_many, args=(store.root, f"w{w}", n, barrier))
        for w in range(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_consistent(store, {f"w{w}-{i}" for w in range(writers) for i in range(n)})


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_concurrent_promotions_processes(store: ArtifactStore):
    n, writers = 8, 3
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_promote_many, args=(store.root, f"p{w}", n, None))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    _check_consistent(store, {f"p{w}-{i}" for w in range(writers) for i in range(n)})
