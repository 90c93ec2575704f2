"""Atomic publish, checksums, names, roots and errors: on a local root and on S3 (moto)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage import ArtifactError, ArtifactStore, StageRef, StoreError
from storage.store import ENV_ROOT, MANIFEST

REPO = Path(__file__).parent.parent.parent


def _publish_two(store: ArtifactStore, key: str = "k") -> StageRef:
    with store.publish("stage", key, params={"p": 1}) as w:
        w.write_bytes("a.bin", b"alpha")
        w.write_json("stats.json", {"rows": 2})
        w.counts.update(rows=2, rejected=0)
        w.meta.update(note="x")
    return store.ref("stage", key)


def test_manifest_appears_only_when_block_exits(store: ArtifactStore) -> None:
    with store.publish("stage", "k", params={"p": 1}) as w:
        w.write_bytes("a.bin", b"alpha")
        w.write_bytes("dir/b.bin", b"beta")
        # the files are in place, the artifact is not: no manifest until the block exits
        assert store.fs.exists(store.path("stage", "k", "a.bin"))
        assert not store.is_done("stage", "k")
        assert not store.fs.exists(store.path("stage", "k", MANIFEST))
        with pytest.raises(ArtifactError, match="no manifest"):
            store.ref("stage", "k")
    assert store.is_done("stage", "k")
    m = store.manifest("stage", "k")
    assert sorted(m.files) == ["a.bin", "dir/b.bin"]
    assert m.files["a.bin"].size == 5
    assert m.params == {"p": 1}


def test_exception_leaves_no_manifest_and_rerun_overwrites(store: ArtifactStore) -> None:
    with pytest.raises(ValueError, match="boom"), store.publish("stage", "k") as w:
        w.write_bytes("a.bin", b"partial garbage from the first attempt")
        raise ValueError("boom")
    assert not store.is_done("stage", "k")
    assert store.fs.cat_file(store.path("stage", "k", "a.bin")).startswith(b"partial")

    ref = _publish_two(store)
    assert store.read_bytes(ref, "a.bin") == b"alpha"
    store.verify(ref)
    assert ref.counts == {"rows": 2, "rejected": 0}
    assert store.manifest("stage", "k").meta == {"note": "x"}
    assert store.read_json(ref, "stats.json") == {"rows": 2}


def test_republish_removes_old_manifest_first(store: ArtifactStore) -> None:
    _publish_two(store)
    with pytest.raises(RuntimeError), store.publish("stage", "k") as w:
        w.write_bytes("a.bin", b"new content")  # the old manifest's sha256 no longer holds
        raise RuntimeError("crash")
    assert not store.is_done("stage", "k")


def test_write_file_error_leaves_nothing(store: ArtifactStore) -> None:
    def fails(path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"), store.publish("stage", "k") as w:
        w.write_file("x.bin", fails)
    assert not store.fs.exists(store.path("stage", "k", "x.bin"))
    assert not store.is_done("stage", "k")
    if store.is_local:  # the temp file was removed too
        assert [n for n in os.listdir(store.path("stage", "k")) if n.startswith(".tmp-")] == []


@pytest.mark.parametrize("same_size", [True, False])
def test_corrupted_file_detected(store: ArtifactStore, same_size: bool) -> None:
    ref = _publish_two(store)
    bad = b"alphA" if same_size else b"alpha!"
    store.fs.pipe_file(store.path("stage", "k", "a.bin"), bad)
    for check in (
        lambda: store.verify(ref),
        lambda: store.read_bytes(ref, "a.bin"),
        lambda: store.open(ref, "a.bin", verify=True).__enter__(),
    ):
        with pytest.raises(ArtifactError, match="checksum") as info:
            check()
        assert store.url("stage", "k", "a.bin") in str(info.value)
        assert "Fix:" in str(info.value)
    store.verify(ref, names=["stats.json"])  # the other file is fine
    assert store.read_bytes(ref, "a.bin", verify=False) == bad


def test_missing_and_unlisted_files(store: ArtifactStore) -> None:
    ref = _publish_two(store)
    with pytest.raises(ArtifactError, match="not listed"):
        store.read_bytes(ref, "nope.bin")
    with pytest.raises(ArtifactError, match="not listed"):
        store.verify(ref, names=["nope.bin"])
    store.fs.rm(store.path("stage", "k", "a.bin"))
    with pytest.raises(ArtifactError, match="missing") as info:
        store.verify(ref)
    assert "a.bin" in str(info.value)
    with pytest.raises(ArtifactError, match="missing"), store.open(ref, "a.bin"):
        pass


def test_open_does_not_relabel_caller_errors(store: ArtifactStore) -> None:
    ref = _publish_two(store)
    with pytest.raises(FileNotFoundError, match="caller"), store.open(ref, "a.bin") as fh:
        assert fh.read() == b"alpha"
        raise FileNotFoundError("caller's own missing file")


def test_corrupt_manifest_is_artifact_error(store: ArtifactStore) -> None:
    _publish_two(store)
    store.fs.pipe_file(store.path("stage", "k", MANIFEST), b"{not json")
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        store.ref("stage", "k")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "..", "a//b", "", "a\\b", " a"])
def test_path_escaping_names_refused(store: ArtifactStore, name: str, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    with store.publish("stage", "k") as w:
        with pytest.raises(ArtifactError, match="not a safe relative name"):
            w.write_bytes(name, b"x")
        with pytest.raises(ArtifactError, match="not a safe relative name"):
            w.add_dir(str(tmp_path), prefix=name) if name else w.write_json(name, {})
    if name:
        with pytest.raises(ArtifactError, match="not a safe relative name"):
            store.path(name, "k")
        with pytest.raises(ArtifactError, match="not a safe relative name"):
            store.path("stage", name)
    assert store.list_files(store.ref("stage", "k")) == []


def test_add_dir_local_dir_and_local_copy(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "hf"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    with store.publish("stage", "k") as w:
        w.add_dir(str(src), prefix="model")
    ref = store.ref("stage", "k")
    assert store.list_files(ref, prefix="model/") == ["model/config.json", "model/sub/weights.bin"]
    dest = tmp_path / "copy"
    local = store.local_dir(ref, str(dest))
    want = (src / "sub/weights.bin").read_bytes()
    assert Path(local, "model/sub/weights.bin").read_bytes() == want
    one = store.local_copy(ref, "model/config.json", str(tmp_path / "one"))
    assert json.loads(Path(one).read_text()) == {"a": 1}
    if store.is_local:
        assert local == store.path("stage", "k")  # no copy on local roots
    else:
        assert local == str(dest)


def test_for_url_round_trip(store: ArtifactStore) -> None:
    ref = _publish_two(store)
    again, stage, key = ArtifactStore.for_url(ref.url)
    assert (stage, key, again.root) == ("stage", "k", store.root)
    assert again.read_bytes(again.ref(stage, key), "a.bin") == b"alpha"
    assert again.ref(stage, key) == ref
    assert StageRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    if not store.is_local:
        assert ref.url.startswith("s3://") and ref.url.endswith("/stage/k")


@pytest.mark.parametrize("url", ["nokey", "s3://bucket", "/stage/../k", "s3://"])
def test_for_url_rejects_non_artifact_urls(url: str) -> None:
    with pytest.raises(ArtifactError):
        ArtifactStore.for_url(url)


def test_is_done_sees_manifest_written_by_another_client(s3_root: str, s3_endpoint: str) -> None:
    """fsspec's listing cache must not hide an artifact another process published."""
    import boto3

    store = ArtifactStore(s3_root)
    with pytest.raises(RuntimeError), store.publish("stage", "k") as w:
        w.write_bytes("a.bin", b"alpha")
        raise RuntimeError("crash")
    store.fs.ls(store.path("stage", "k"))  # would cache the listing without the manifest
    assert not store.is_done("stage", "k")
    bucket, _, prefix = s3_root.removeprefix("s3://").partition("/")
    body = store.fs.cat_file(store.path("stage", "k", "a.bin"))
    assert body == b"alpha"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key=f"{prefix}/stage/k/{MANIFEST}", Body=b"{}"
    )
    assert store.is_done("stage", "k")
    assert ArtifactStore(s3_root).is_done("stage", "k")


def test_unknown_protocol_is_store_error() -> None:
    with pytest.raises(StoreError, match="'nosuchproto'") as info:
        ArtifactStore("nosuchproto://bucket/prefix")
    assert "fsspec URL" in info.value.fix


def test_missing_bucket_is_store_error(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAGLE_PIPELINE_S3_ENDPOINT", s3_endpoint)
    store = ArtifactStore("s3://no-such-bucket-eagle/prefix")
    assert not store.is_done("stage", "k")
    with pytest.raises(StoreError, match="no-such-bucket-eagle/prefix/stage/k/") as info:
        with store.publish("stage", "k") as w:
            w.write_bytes("a.bin", b"x")
    assert "no such bucket" in str(info.value)


@pytest.mark.parametrize(
    "exc, permanent",
    [
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),
        (TimeoutError("read timed out"), False),
        (OSError(errno.EIO, "I/O error"), False),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EROFS, "Read-only file system"), True),
        (PermissionError(errno.EACCES, "Permission denied"), True),
    ],
)
def test_only_permanent_io_errors_become_store_errors(exc: OSError, permanent: bool) -> None:
    """Transient errors stay OSErrors: the tasks retry those, never a StoreError."""
    store = ArtifactStore("memory://eagle-classify")
    if permanent:
        with pytest.raises(StoreError, match="/stage/k/a.bin"):
            store._wrap_permanent("/stage/k/a.bin", exc)
    else:
        store._wrap_permanent("/stage/k/a.bin", exc)  # returns: the caller re-raises exc


def test_memory_root_works() -> None:
    store = ArtifactStore("memory://eagle-test-root")
    assert not store.is_local and store.root.startswith("memory://")
    with store.publish("stage", "m") as w:
        w.write_bytes("a.bin", b"alpha")
    again, stage, key = ArtifactStore.for_url(store.ref("stage", "m").url)
    assert again.read_bytes(again.ref(stage, key), "a.bin") == b"alpha"


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_ROOT, raising=False)
    monkeypatch.chdir(tmp_path)
    assert ArtifactStore().root == str(tmp_path / "artifacts")
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "elsewhere"))
    assert ArtifactStore().root == str(tmp_path / "elsewhere")
    assert ArtifactStore(str(tmp_path / "given")).root == str(tmp_path / "given")
    assert ArtifactStore("file://" + str(tmp_path / "u")).is_local


def _assert_store_error_names(root: str, path_part: str) -> None:
    store = ArtifactStore(root)
    assert not store.is_done("stage", "k")  # reading an unwritable root is fine
    with pytest.raises(StoreError) as info, store.publish("stage", "k") as w:
        w.write_bytes("a.bin", b"x")
    assert path_part in str(info.value)
    assert "Fix:" in str(info.value)


def test_root_under_a_file_is_store_error(tmp_path: Path) -> None:
    (tmp_path / "plain_file").write_text("not a directory")
    root = str(tmp_path / "plain_file" / "artifacts")
    _assert_store_error_names(root, root)


def test_root_in_sysfs_is_store_error() -> None:
    """/sys refuses new entries even to root (EPERM): a real permission error."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs mounted")
    _assert_store_error_names("/sys/kernel/eagle-artifacts", "/sys/kernel/eagle-artifacts")


def test_read_only_dir_is_store_error(tmp_path: Path) -> None:
    """chmod 555 root. As uid 0 chmod does not bind, so the write runs as `nobody` instead."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="eagle-ro-"))  # /tmp: traversable by other users
    try:
        base.chmod(0o755)
        ro = base / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        root = str(ro / "artifacts")
        if os.geteuid() != 0:
            _assert_store_error_names(root, root)
            return
        code = (  # imports first: the venv's interpreter may not be readable by nobody
            "import os, sys\n"
            "from storage import ArtifactStore, StoreError\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    with ArtifactStore(sys.argv[1]).publish('stage', 'k') as w:\n"
            "        w.write_bytes('a.bin', b'x')\n"
            "except StoreError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, root],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 3, out.stderr
        assert root in out.stdout and "permission denied" in out.stdout
    finally:
        for p in sorted(base.rglob("*"), reverse=True):
            p.chmod(0o755)
        import shutil

        shutil.rmtree(base)


def test_two_writers_of_one_key_both_succeed(store: ArtifactStore) -> None:
    """Keys are content hashes: concurrent writers put the same bytes; either manifest is valid."""
    import threading

    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def write() -> None:
        try:
            with store.publish("stage", "same", params={"p": 1}) as w:
                barrier.wait(timeout=30)
                for i in range(3):
                    w.write_bytes(f"shard-{i:05d}.bin", bytes([i]) * 1000, journal=True)
                w.counts.update(rows=3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    ref = store.ref("stage", "same")
    assert ref.counts == {"rows": 3}
    assert store.list_files(ref) == [f"shard-{i:05d}.bin" for i in range(3)]
    store.verify(ref)
