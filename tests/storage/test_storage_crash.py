"""A writer killed with SIGKILL mid-shard leaves no manifest; the rerun resumes from the journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from storage import ArtifactStore
from storage.shards import batch_tensors, iter_batches
from storage.store import JOURNAL_DIR, MANIFEST, UPLOAD_STAGING_DIR

HERE = Path(__file__).parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import crash_writer  # noqa: E402  (the same code the subprocess runs)


def _start_crashing_writer(root: str, key: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), root, key, str(log_path), "crash"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _mtimes(store: ArtifactStore, key: str, names: list[str]) -> dict[str, object]:
    out = {}
    for n in names:
        info = store.fs.info(store.path(crash_writer.STAGE, key, n))
        out[n] = info.get("mtime") or info.get("LastModified") or info.get("created")
    return out


@pytest.mark.slow  # a real subprocess importing torch: ~3-6 s on 2 busy cores
def test_sigkill_mid_shard_then_resume(store: ArtifactStore, tmp_path: Path) -> None:
    key = store.key(crash_writer.STAGE, {"shards": crash_writer.SHARDS})
    log_path = tmp_path / "written.log"
    proc = _start_crashing_writer(store.root, key, log_path)
    try:
        line = proc.stdout.readline()  # blocks until the child is halfway into shard 3
        assert line.strip() == "HALFWAY", f"child failed: {line!r} {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # the crash left no manifest, three journaled shards and (locally) a torn temp file
    assert not store.is_done(crash_writer.STAGE, key)
    assert not store.fs.exists(store.path(crash_writer.STAGE, key, MANIFEST))
    done = [f"shard-{i:05d}.parquet" for i in range(crash_writer.CRASH_AT)]
    journal = store.fs.ls(store.path(crash_writer.STAGE, key, JOURNAL_DIR), detail=False)
    assert sorted(os.path.basename(p) for p in journal) == [f"{n}.json" for n in done]
    assert not store.fs.exists(store.path(crash_writer.STAGE, key, "shard-00003.parquet"))
    # the killed writer's torn temp file: in the artifact dir (local) or the staging dir
    tmp_dir = (
        store.path(crash_writer.STAGE, key)
        if store.is_local
        else os.path.join(tempfile.gettempdir(), UPLOAD_STAGING_DIR)
    )
    tag = f"-{proc.pid}-"

    def leftovers() -> list[str]:
        return [n for n in os.listdir(tmp_dir) if n.startswith(".tmp-") and tag in n]

    assert leftovers(), "expected the killed writer's torn temp file"
    assert log_path.read_text().split() == ["0", "1", "2", "3"]
    before = _mtimes(store, key, done)

    # rerun (in this process): journaled shards are kept, the rest written
    crash_writer.main(store.root, key, str(log_path), "finish")
    assert log_path.read_text().split() == ["0", "1", "2", "3", "3", "4"]
    assert _mtimes(store, key, done) == before, "journaled shards were rewritten"

    assert store.is_done(crash_writer.STAGE, key)
    ref = store.ref(crash_writer.STAGE, key)
    assert ref.counts == {"shards": crash_writer.SHARDS}
    names = store.list_files(ref, suffix=".parquet")
    assert names == [f"shard-{i:05d}.parquet" for i in range(crash_writer.SHARDS)]
    store.verify(ref)  # every shard, the resumed ones included, matches its checksum
    for i, name in enumerate(names):
        (batch,) = list(iter_batches(store, ref, names=[name]))
        want = batch_tensors(crash_writer.shard_table(i).to_batches()[0], "hidden")
        got = batch_tensors(batch, "hidden")
        assert all(
            g.view(torch.int16).equal(w.view(torch.int16)) for g, w in zip(got, want, strict=True)
        )
    # committed: the journal is gone, and so are the dead writer's temp files
    assert not store.fs.exists(store.path(crash_writer.STAGE, key, JOURNAL_DIR))
    assert leftovers() == []


@pytest.mark.parametrize("force", [False, True])
def test_force_drops_journal(store: ArtifactStore, tmp_path: Path, force: bool) -> None:
    """A crashed attempt's journal is reused, unless force=True, which also drops the manifest."""
    key = "forcekey"
    with pytest.raises(RuntimeError), store.publish("s", key) as w:
        w.write_bytes("shard-00000.parquet", b"first attempt", journal=True)
        raise RuntimeError("crash after one shard")
    with store.publish("s", key, force=force) as w:
        assert w.has("shard-00000.parquet") is (not force)
        assert w.journaled == ([] if force else ["shard-00000.parquet"])
        if not w.has("shard-00000.parquet"):
            w.write_bytes("shard-00000.parquet", b"second attempt", journal=True)
    ref = store.ref("s", key)
    want = b"second attempt" if force else b"first attempt"
    assert store.read_bytes(ref, "shard-00000.parquet") == want

    # force on a finished artifact: the old manifest is gone before the new one is written
    with pytest.raises(RuntimeError), store.publish("s", key, force=True) as w:
        assert not store.is_done("s", key)
        raise RuntimeError("crash")
    assert not store.is_done("s", key)


def test_has_checks_size_and_optionally_hash(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.publish("s", "k1") as w:
        w.write_bytes("a.bin", b"aaaa", journal=True)
        w.write_bytes("b.bin", b"bbbb", journal=True)
        raise RuntimeError("crash")
    store.fs.pipe_file(store.path("s", "k1", "a.bin"), b"aaaaaa")  # other size
    store.fs.pipe_file(store.path("s", "k1", "b.bin"), b"bxbb")  # same size, other bytes
    with store.publish("s", "k1") as w:
        assert not w.has("a.bin")
        assert w.has("b.bin")  # size only: cheap, and enough against torn writes
        assert not w.has("b.bin", verify=True)
        w.write_bytes("a.bin", b"aaaa")
        w.write_bytes("b.bin", b"bbbb")
    store.verify(store.ref("s", "k1"))


def test_nested_journal_names_do_not_collide(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.publish("s", "k2") as w:
        w.write_bytes("a/b.bin", b"nested", journal=True)
        w.write_bytes("a__b.bin", b"flat", journal=True)
        raise RuntimeError("crash")
    with store.publish("s", "k2") as w:
        assert w.journaled == ["a/b.bin", "a__b.bin"]
        assert w.has("a/b.bin") and w.has("a__b.bin")
    ref = store.ref("s", "k2")
    assert store.read_bytes(ref, "a/b.bin") == b"nested"
    assert store.read_bytes(ref, "a__b.bin") == b"flat"
