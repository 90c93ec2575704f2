"""The artifact store: every file the pipeline writes lives at `<root>/<stage>/<key>/`.

Publishing protocol (why an artifact is either complete or absent):

1. Files are written first, each to a temporary local file, hashed (sha256), then put under
   its final name (local roots: `os.replace`, atomic; object stores: one PUT, atomic per
   object).
2. Sharded stages record each finished shard in `_journal/<name>.json` right after the shard
   is put. A rerun after a crash reuses journaled shards (size re-checked) and rewrites the
   rest, overwriting whatever partial files the crash left.
3. `manifest.json` is written LAST and lists every file with size and sha256, plus the
   parameters and inputs that made the key. It is the commit point: an artifact exists only
   if its manifest does. Readers never look at a directory without one. Starting a publish
   deletes an old manifest of the key first; a clean finish deletes the journal.
4. Only failures that a retry cannot fix (permission, no space, missing bucket, a file where
   a directory should be) become `StoreError`; transient I/O errors propagate unchanged so
   the tasks' retry policy can retry them.

Keys that follow content: a stage passes the fingerprints of the external inputs it reads
(`storage.fingerprint`) to `key()`. Their digests go into the key, the full fingerprints into
`meta["fingerprints"]`, and `<stage>/_latest/<identity>.json` (identity = the key without
fingerprints) points at the last key of those same-named inputs, so a new key can say which
input changed (`meta["recompute_reason"]`, logged).

Two runs publishing the same key at once write identical bytes (keys are content hashes), so
whichever manifest lands last is as valid as the first: compare-and-publish is not needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

from storage.errors import ArtifactError, StoreError
from storage.fingerprint import describe_all, digests
from storage.keys import canonical, content_key
from storage.urls import (
    ENV_S3_ENDPOINT,
    OBJECT_STORE_PROTOCOLS,
    fs_options,
    has_credentials,
    install_log_redaction,
    redact_obj,
    redact_url,
    url_secrets,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
JOURNAL_DIR = "_journal"
# `<root>/<stage>/_latest/<identity>.json`: the last key published for a stage's name-based
# identity (its key without fingerprints) and its fingerprints, so that a new key can say
# which input changed. Never a key itself (keys are hex), never read for caching.
LATEST_DIR = "_latest"
ENV_ROOT = "EAGLE_PIPELINE_STORE"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
_HASH_CHUNK = 1 << 20
# errors a retry cannot fix: no space, quota, read-only fs, name too long
# EFBIG: a file-size limit (ulimit -f, a filesystem's maximum file size) does not lift by retrying
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG}
_TMP_PREFIX = ".tmp-"
UPLOAD_STAGING_DIR = "eagle-pipeline-upload"  # under the system temp dir, for remote roots
_STALE_TMP_S = 24 * 3600  # a temp file this old belongs to no live writer, whoever made it


def default_root() -> str:
    """`$EAGLE_PIPELINE_STORE`, else `./artifacts` under the working directory."""
    return os.environ.get(ENV_ROOT) or os.path.abspath("artifacts")


def check_name(name: str, what: str = "file name") -> str:
    """Refuse names that could escape the artifact root (`..`, absolute paths, odd chars)."""
    if not _SAFE_NAME.match(name) or ".." in name.split("/"):
        raise ArtifactError(
            f"{what} {name!r} is not a safe relative name inside the artifact root",
            fix="use letters, digits, '.', '_', '-' and '/' only, with no '..' or leading '/'",
        )
    return name


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact, as listed in its manifest."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StageRef:
    """What tasks pass between each other: where an artifact is, never its contents."""

    stage: str
    key: str
    url: str
    counts: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # the URL may hold credentials (an http root's user:password)
        return (
            f"StageRef(stage={self.stage!r}, key={self.key!r}, url={redact_url(self.url)!r}, "
            f"counts={self.counts!r})"
        )

    __str__ = __repr__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRef:
        return cls(stage=d["stage"], key=d["key"], url=d["url"], counts=dict(d.get("counts", {})))


@dataclass
class Manifest:
    stage: str
    key: str
    files: dict[str, FileEntry]
    params: Any = None
    inputs: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["files"] = [dataclasses.asdict(f) for f in sorted(self.files.values(), key=_by_name)]
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        doc = json.loads(text)
        files = {f["name"]: FileEntry(**f) for f in doc.pop("files")}
        return cls(files=files, **doc)


def _by_name(f: FileEntry) -> str:
    return f.name


def _sha256_file(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class ArtifactStore:
    """A root URL (local path or any fsspec URL) holding `<stage>/<key>/` artifacts.

    Credentials are never parameters: fsspec reads them from the environment or its config
    (`AWS_ACCESS_KEY_ID`..., `~/.config/fsspec`). `EAGLE_PIPELINE_S3_ENDPOINT` points s3://
    roots at MinIO or another S3 API server.
    """

    def __init__(self, root: str | None = None, storage_options: dict[str, Any] | None = None):
        root = root or default_root()
        # an S3 endpoint from the env; no listings cache on object stores (see fs_options)
        opts = fs_options(root, storage_options)
        protocol = fsspec.core.split_protocol(root)[0] or "file"
        if protocol in OBJECT_STORE_PROTOCOLS and has_credentials(root):
            # s3fs / gcsfs would take `KEY:SECRET@bucket` as the bucket name, and their
            # errors would echo it: refuse before any client sees it
            raise StoreError(
                f"artifact root {redact_url(root)} carries credentials or a query string in "
                "the URL, which object stores cannot use",
                fix=f"drop them from the URL and give credentials through the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, a profile, "
                f"an instance role; ${ENV_S3_ENDPOINT} for MinIO)",
            )
        if protocol not in ("file", "local") and "?" in root.partition("://")[2]:
            raise StoreError(
                f"artifact root {redact_url(root)} has a query string",
                fix="drop it: artifact paths <root>/<stage>/<key> are appended to the root, "
                "so a query cannot stay at its end; give credentials through the environment",
            )
        if has_credentials(root):
            # e.g. an http root with user:password: fsspec's own debug lines print the URL
            install_log_redaction(url_secrets(root))
        try:
            self.fs, path = fsspec.core.url_to_fs(root, **opts)
        except (ValueError, ImportError) as exc:
            raise StoreError(
                f"artifact root {root!r}: protocol {protocol!r} is not usable ({exc})",
                fix="use a local path or an fsspec URL such as s3://bucket/prefix, gs://..., "
                "memory://..., and install the protocol's package (s3fs, gcsfs, adlfs)",
            ) from exc
        self.is_local = protocol in ("file", "local")
        self.root_path = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.root = self.root_path if self.is_local else self.fs.unstrip_protocol(self.root_path)
        self.storage_options = opts
        # (stage, key) -> (identity, fingerprints) of the keys this store computed: publish()
        # records them in the manifest and explains a recompute with them
        self._fingerprints: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    # ---- addressing --------------------------------------------------------------------
    def key(
        self,
        stage: str,
        params: Any,
        inputs: list[Any] | tuple = (),
        code: str = "1",
        fingerprints: dict[str, Any] | None = None,
    ) -> str:
        """The content key (`storage.keys.content_key`).

        Args:
            fingerprints: {name: fingerprint | [fingerprints]} of the external inputs this
                stage reads itself (`storage.fingerprint`; e.g. {"sources": [...]} or
                {"target": {...}}). Their digests go into the key; a later `publish` of this
                key writes them to `meta["fingerprints"]` and, when the key is new for the
                stage's name-based identity, logs which input changed (`recompute_reason`).
        """
        key = content_key(stage, params, inputs, code, digests(fingerprints))
        if fingerprints:
            identity = content_key(stage, params, inputs, code)
            self._fingerprints[(stage, key)] = (identity, dict(fingerprints))
        return key

    def recompute_reason(self, stage: str, key: str) -> str | None:
        """Why `key` (computed by this store with fingerprints) is being computed: which
        fingerprint differs from the last artifact published for the same name-based
        identity (same parameters, inputs and code). None when there is no such artifact, or
        it had this very key (a forced or resumed run)."""
        info = self._fingerprints.get((stage, key))
        if info is None:
            return None
        identity, fingerprints = info
        try:
            doc = json.loads(self._read_bytes(self.path(stage, LATEST_DIR, f"{identity}.json")))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if doc.get("key") == key:
            return None
        old = doc.get("fingerprints") or {}
        return describe_all(old, fingerprints) or f"key {doc.get('key')} -> {key}"

    def fingerprints_of(self, stage: str, key: str) -> dict[str, Any]:
        """The fingerprints `key()` hashed into `key` in this process ({} if none)."""
        info = self._fingerprints.get((stage, key))
        return dict(info[1]) if info else {}

    def latest_key(
        self, stage: str, params: Any, inputs: list[Any] | tuple = (), code: str = "1"
    ) -> str | None:
        """The key last published for this name-based identity (fingerprints left out), or
        None: what a stage can still serve when an input it read is gone."""
        identity = content_key(stage, params, inputs, code)
        try:
            doc = json.loads(self._read_bytes(self.path(stage, LATEST_DIR, f"{identity}.json")))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        key = doc.get("key")
        return key if isinstance(key, str) and self.is_done(stage, key) else None

    def previous(self, stage: str, key: str) -> Manifest | None:
        """The manifest of the last artifact of the same identity as `key`, if still there."""
        info = self._fingerprints.get((stage, key))
        if info is None:
            return None
        try:
            doc = json.loads(self._read_bytes(self.path(stage, LATEST_DIR, f"{info[0]}.json")))
            if doc.get("key") and doc["key"] != key and self.is_done(stage, doc["key"]):
                return self.manifest(stage, doc["key"])
        except (FileNotFoundError, NotADirectoryError, ValueError, ArtifactError):
            return None
        return None

    def lineage_fingerprints(self, refs: list[Any], max_manifests: int = 64) -> dict[str, Any]:
        """{"sources": [...], "target": {...}} found in the manifests upstream of `refs`
        (their inputs, recursively): the data and target a draft was made from. The nearest
        target fingerprint wins; sources are deduplicated by digest."""
        out: dict[str, Any] = {"sources": []}
        seen: set[tuple[str, str]] = set()
        queue = [(r.stage, r.key, getattr(r, "url", "")) for r in refs]
        while queue and len(seen) < max_manifests:
            stage, key, url = queue.pop(0)
            if (stage, key) in seen:
                continue
            seen.add((stage, key))
            try:
                src = self if not url or url.startswith(self.root) else self.for_url(url)[0]
                m = src.manifest(stage, key)
            except (ArtifactError, StoreError, OSError):
                continue
            fps = m.meta.get("fingerprints") or {}
            if "target" in fps and "target" not in out:
                out["target"] = fps["target"]
            digests_seen = {s.get("digest") for s in out["sources"]}
            for fp in fps.get("sources") or []:
                if fp.get("digest") not in digests_seen:
                    out["sources"].append(fp)
            queue.extend((i["stage"], i["key"], i.get("url", "")) for i in m.inputs if "key" in i)
        return out

    def path(self, stage: str, key: str, name: str = "") -> str:
        """fs path (no protocol) of a file of an artifact."""
        base = f"{self.root_path}/{check_name(stage, 'stage')}/{check_name(key, 'key')}"
        return f"{base}/{check_name(name)}" if name else base

    def url(self, stage: str, key: str, name: str = "") -> str:
        p = self.path(stage, key, name)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    @classmethod
    def for_url(
        cls, url: str, storage_options: dict[str, Any] | None = None
    ) -> tuple[ArtifactStore, str, str]:
        """Split an artifact URL `<root>/<stage>/<key>` into (store, stage, key)."""
        parts = url.rstrip("/").rsplit("/", 2)
        if len(parts) != 3 or not parts[0] or parts[0].endswith(":/"):
            raise ArtifactError(f"{url!r} is not an artifact URL", fix="pass <root>/<stage>/<key>")
        root, stage, key = parts
        check_name(stage, "stage"), check_name(key, "key")
        return cls(root, storage_options), stage, key

    # ---- reading -----------------------------------------------------------------------
    def is_done(self, stage: str, key: str) -> bool:
        """True once the artifact's manifest exists (it is written last)."""
        return self._exists(self.path(stage, key, MANIFEST))

    def manifest(self, stage: str, key: str) -> Manifest:
        p = self.path(stage, key, MANIFEST)
        try:
            text = self._read_bytes(p).decode()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ArtifactError(
                f"artifact {self.url(stage, key)} has no manifest (never finished, or deleted)",
                fix="run its stage again; a crashed stage is resumed from its journal",
            ) from exc
        try:
            return Manifest.from_json(text)
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(
                f"{self.url(stage, key, MANIFEST)} is not a valid manifest ({exc})",
                fix="delete it and re-run the stage (use force=True / --force)",
            ) from exc

    def ref(self, stage: str, key: str) -> StageRef:
        m = self.manifest(stage, key)
        return StageRef(stage=stage, key=key, url=self.url(stage, key), counts=m.counts)

    def list_files(self, ref: StageRef, prefix: str = "", suffix: str = "") -> list[str]:
        """Names listed in the manifest (never a directory listing), sorted."""
        m = self.manifest(ref.stage, ref.key)
        return sorted(n for n in m.files if n.startswith(prefix) and n.endswith(suffix))

    @contextlib.contextmanager
    def open(self, ref: StageRef, name: str, verify: bool = False) -> Iterator[IO[bytes]]:
        """Open a file of a published artifact for reading (streamed, not loaded).

        verify=True checks its sha256 against the manifest first (one extra read).
        """
        if verify:
            self.verify(ref, names=[name])
        p = self.path(ref.stage, ref.key, name)
        try:
            fh = self.fs.open(p, "rb")
        except FileNotFoundError as exc:
            # only the open is guarded: a FileNotFoundError raised by the caller's own code
            # inside the with-block must not be reported as a missing artifact file
            raise ArtifactError(
                f"{self.url(ref.stage, ref.key, name)} is missing",
                fix="check the name with list_files(); if it is listed, delete the artifact's "
                "manifest.json and re-run its stage",
            ) from exc
        with fh:
            yield fh

    def read_bytes(self, ref: StageRef, name: str, verify: bool = True) -> bytes:
        """The whole file (small files only); verify=True checks its sha256 (default)."""
        entry = None
        if verify:
            entry = self.manifest(ref.stage, ref.key).files.get(name)
            if entry is None:
                raise ArtifactError(
                    f"{name!r} is not listed in {self.url(ref.stage, ref.key, MANIFEST)}",
                    fix="check the file name; list_files() shows what the artifact holds",
                )
        try:
            data = self._read_bytes(self.path(ref.stage, ref.key, name))
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{self.url(ref.stage, ref.key, name)} is missing",
                fix="check the name with list_files(); if it is listed, delete the artifact's "
                "manifest.json and re-run its stage",
            ) from exc
        if entry is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
            raise self._corrupt(ref, name)
        return data

    def read_json(self, ref: StageRef, name: str) -> Any:
        return json.loads(self.read_bytes(ref, name))

    def local_copy(self, ref: StageRef, name: str, dest_dir: str) -> str:
        """A local path holding the file (the file itself on local roots)."""
        if self.is_local:
            return self.path(ref.stage, ref.key, name)
        dest = os.path.join(dest_dir, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        self.fs.get_file(self.path(ref.stage, ref.key, name), dest)
        return dest

    def local_dir(self, ref: StageRef, dest_dir: str) -> str:
        """A local directory holding every file of the artifact (copied from remote roots)."""
        if self.is_local:
            return self.path(ref.stage, ref.key)
        for name in self.list_files(ref):
            self.local_copy(ref, name, dest_dir)
        return dest_dir

    def verify(self, ref: StageRef, names: list[str] | None = None) -> None:
        """Check size and sha256 of files against the manifest; ArtifactError names the file."""
        m = self.manifest(ref.stage, ref.key)
        for name in names if names is not None else sorted(m.files):
            entry = m.files.get(name)
            if entry is None:
                raise ArtifactError(
                    f"{name!r} is not listed in {self.url(ref.stage, ref.key, MANIFEST)}",
                    fix="check the file name",
                )
            h = hashlib.sha256()
            size = 0
            try:
                with self.fs.open(self.path(ref.stage, ref.key, name), "rb") as fh:
                    while chunk := fh.read(_HASH_CHUNK):
                        h.update(chunk)
                        size += len(chunk)
            except FileNotFoundError as exc:
                raise ArtifactError(
                    f"{self.url(ref.stage, ref.key, name)} is listed in the manifest but missing",
                    fix="delete the artifact's manifest.json and re-run its stage",
                ) from exc
            if size != entry.size or h.hexdigest() != entry.sha256:
                raise self._corrupt(ref, name)

    def _corrupt(self, ref: StageRef, name: str) -> ArtifactError:
        return ArtifactError(
            f"{self.url(ref.stage, ref.key, name)} does not match the checksum in its manifest "
            "(corrupted or changed after publishing)",
            fix=f"delete {self.url(ref.stage, ref.key, MANIFEST)} and re-run the stage "
            "(use force=True / --force)",
        )

    # ---- writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def publish(
        self,
        stage: str,
        key: str,
        params: Any = None,
        inputs: list[Any] | tuple = (),
        force: bool = False,
    ) -> Iterator[ArtifactWriter]:
        """Write an artifact; its manifest is written only if the block finishes.

        An existing manifest of this key is deleted first (the artifact is being rewritten,
        so it is not done). The journal of a crashed earlier attempt is kept, so `w.has()`
        can skip the shards it finished; force=True drops it too, so nothing old is reused.
        On a clean exit the manifest is written, then the journal is deleted.
        """
        # An artifact being (re)written is not done: its old manifest would describe files
        # this run may overwrite, and survive a crash of this run.
        self._rm(self.path(stage, key, MANIFEST))
        if force:
            self._rm(self.path(stage, key, JOURNAL_DIR), recursive=True)
        writer = ArtifactWriter(self, stage, key)
        info = self._fingerprints.get((stage, key))
        if info is not None:
            writer.identity, writer.fingerprints = info
            reason = self.recompute_reason(stage, key)
            if reason:
                log.info("%s %s: %s; recomputing", stage, key, reason)
                writer.meta["recompute_reason"] = reason
        yield writer
        writer._commit(params, inputs)

    # ---- low level ---------------------------------------------------------------------
    def _exists(self, p: str) -> bool:
        try:
            return self.fs.exists(p)
        except PermissionError as exc:
            raise self._io_error(p, exc, action="read") from exc

    def _read_bytes(self, p: str) -> bytes:
        with self.fs.open(p, "rb") as fh:
            return fh.read()

    def _rm(self, p: str, recursive: bool = False) -> None:
        try:
            if self.fs.exists(p):
                self.fs.rm(p, recursive=recursive)
        except FileNotFoundError:
            pass  # removed by someone else in between: the goal is reached
        except OSError as exc:
            self._wrap_permanent(p, exc)
            raise

    def _put(self, local: str, p: str) -> None:
        """Move a finished local temp file to its final place, atomically per file.

        Local: fsync then `os.replace` (a reader sees the old file or the new one, never a
        torn one, even after a power loss). Object stores: one PUT (multipart uploads become
        visible only when complete); there are no directories to create.
        """
        try:
            if self.is_local:
                with open(local, "rb+") as fh:
                    os.fsync(fh.fileno())
                for attempt in range(3):
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    try:
                        if _same_device(local, p):
                            os.replace(local, p)
                        else:
                            _copy_replace(local, p)
                        break
                    except FileNotFoundError:
                        # a concurrent writer of the same key removed the (journal) dir
                        # between makedirs and replace: recreate it and try again
                        if attempt == 2 or not os.path.exists(local):
                            raise
            else:
                self.fs.put_file(local, p)
        except OSError as exc:
            self._wrap_permanent(p, exc)
            raise

    def _wrap_permanent(self, p: str, exc: OSError) -> None:
        """Raise StoreError for a failure that will not fix itself; else let `exc` propagate.

        Transient trouble (a reset connection, an S3 503, a timeout) stays a plain OSError so
        that the tasks' `retry_transient` retries it; a StoreError is never retried.
        """
        if (
            isinstance(
                exc,
                PermissionError
                | FileNotFoundError
                | NotADirectoryError
                | IsADirectoryError
                | FileExistsError,
            )
            or exc.errno in _PERMANENT_ERRNOS
        ):
            raise self._io_error(p, exc) from exc

    def _io_error(self, p: str, exc: Exception, action: str = "write") -> StoreError:
        reason = type(exc).__name__
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "disk full"
        elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            reason = "file size limit exceeded"
        elif isinstance(exc, OSError) and exc.errno == errno.EROFS:
            reason = "read-only file system"
        elif isinstance(exc, PermissionError):
            reason = "permission denied"
        elif isinstance(exc, NotADirectoryError | FileExistsError):
            reason = "a parent of the path is a file, not a directory"
        elif isinstance(exc, FileNotFoundError) and not self.is_local:
            reason = "no such bucket or container"
        return StoreError(
            f"cannot {action} {p} under artifact root {self.root}: {reason} ({exc})",
            fix="free space, fix the permissions of the artifact root, or point --store / "
            f"${ENV_ROOT} at a writable location",
        )


def _same_device(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(os.path.dirname(b)).st_dev
    except OSError:
        return False


def _copy_replace(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    os.unlink(src)


class ArtifactWriter:
    """Writes the files of one artifact; see the module docstring for the protocol."""

    def __init__(self, store: ArtifactStore, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        self.url = store.url(stage, key)
        self.files: dict[str, FileEntry] = {}
        self.counts: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        # set by publish() from the store's key(): written to meta and the identity index
        self.identity: str | None = None
        self.fingerprints: dict[str, Any] = {}
        # Temp files are made next to the final place on local roots (atomic rename), in the
        # system temp dir otherwise.
        if store.is_local:
            base = store.path(stage, key)
            try:
                os.makedirs(base, exist_ok=True)
                if not os.access(base, os.W_OK | os.X_OK):
                    raise PermissionError(13, "not writable", base)
            except OSError as exc:
                store._wrap_permanent(base, exc)
                raise
            self._tmp_dir = base
            _remove_stale_temp_files(base)
        else:
            # one shared staging dir, so a killed uploader's leftovers can be found and removed
            self._tmp_dir = os.path.join(tempfile.gettempdir(), UPLOAD_STAGING_DIR)
            os.makedirs(self._tmp_dir, exist_ok=True)
            _remove_stale_temp_files(self._tmp_dir)
        self._journal = self._read_journal()

    # -- shards and resume
    def _read_journal(self) -> dict[str, FileEntry]:
        jdir = self.store.path(self.stage, self.key, JOURNAL_DIR)
        entries: dict[str, FileEntry] = {}
        try:
            names = self.store.fs.ls(jdir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return entries
        for p in names:
            if not p.endswith(".json"):
                continue
            try:
                entry = FileEntry(**json.loads(self.store._read_bytes(p)))
            except (ValueError, TypeError, FileNotFoundError) as exc:
                # journal entries are put atomically, so this is a foreign or damaged file:
                # the shard it described is simply redone
                log.warning("ignoring unreadable journal entry %s (%s)", redact_url(p), exc)
                continue
            entries[entry.name] = entry
        return entries

    @property
    def journaled(self) -> list[str]:
        """Names an earlier (crashed) attempt finished and journaled, sorted."""
        return sorted(self._journal)

    def has(self, name: str, verify: bool = False) -> bool:
        """True if `name` was finished by an earlier (crashed) attempt and is still intact.

        The size is always re-checked; verify=True also re-hashes the file (a full read).
        A True answer adds the file to this artifact's manifest, so the caller skips it.
        """
        entry = self._journal.get(name)
        if entry is None:
            return False
        p = self.store.path(self.stage, self.key, name)
        try:
            size = self.store.fs.size(p)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if size != entry.size:
            return False
        if verify:
            h = hashlib.sha256()
            with self.store.fs.open(p, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    h.update(chunk)
            if h.hexdigest() != entry.sha256:
                return False
        self.files[name] = entry
        return True

    # -- writing files
    @contextlib.contextmanager
    def local_file(self, name: str, journal: bool = False) -> Iterator[str]:
        """Yield a local temp path to write `name` into; it is hashed and put on exit."""
        check_name(name)
        fd, tmp = self._mkstemp(suffix="-" + name.replace("/", "_"))
        os.close(fd)
        try:
            try:
                yield tmp
            except OSError as exc:  # disk full / file-size limit while writing the temp file
                if exc.errno in _PERMANENT_ERRNOS:
                    dest = self.store.path(self.stage, self.key, name)
                    raise self.store._io_error(f"{dest} (via {tmp})", exc) from exc
                raise
            size, sha = _sha256_file(tmp)
            self.store._put(tmp, self.store.path(self.stage, self.key, name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        entry = FileEntry(name=name, size=size, sha256=sha)
        self.files[name] = entry
        if journal:
            self._write_journal(entry)

    def _write_latest(self, manifest: Manifest) -> None:
        """Point the stage's identity index at this key (after the manifest: a reader that
        finds the index may read the manifest). Last writer wins; it only explains."""
        doc = {
            "key": self.key,
            "fingerprints": manifest.meta.get("fingerprints"),
            "created_at": manifest.created_at,
        }
        fd, tmp = self._mkstemp()
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(doc, sort_keys=True).encode())
            self.store._put(tmp, self.store.path(self.stage, LATEST_DIR, f"{self.identity}.json"))
        except (OSError, StoreError) as exc:  # the artifact is published; only the "why" is lost
            log.warning("could not update the %s index of %s: %s", LATEST_DIR, self.stage, exc)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _write_journal(self, entry: FileEntry) -> None:
        # flat journal dir; a nested name also carries its hash, so `a/b` and `a__b` differ
        stem = entry.name
        if "/" in stem:
            digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
            stem = f"{stem.replace('/', '__')}.{digest}"
        jname = f"{JOURNAL_DIR}/{stem}.json"
        data = json.dumps(dataclasses.asdict(entry)).encode()
        self._put_bytes(jname, data)

    def _mkstemp(self, suffix: str = "") -> tuple[int, str]:
        # host and pid in the name let a later run tell a dead writer's leftovers apart
        try:
            return tempfile.mkstemp(
                prefix=f"{_TMP_PREFIX}{_tmp_tag()}-", suffix=suffix, dir=self._tmp_dir
            )
        except OSError as exc:
            self.store._wrap_permanent(self._tmp_dir, exc)
            raise

    def _put_bytes(self, name: str, data: bytes) -> None:
        fd, tmp = self._mkstemp()
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.store._put(tmp, self.store.path(self.stage, self.key, name))
        except OSError as exc:
            self.store._wrap_permanent(f"{self.store.path(self.stage, self.key, name)}", exc)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_bytes(self, name: str, data: bytes, journal: bool = False) -> FileEntry:
        with self.local_file(name, journal=journal) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
        return self.files[name]

    def write_json(self, name: str, obj: Any) -> FileEntry:
        return self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_file(self, name: str, write: Callable[[str], None], journal: bool = False) -> None:
        """`write(local_path)` produces the file; used for safetensors, torch.save, parquet."""
        with self.local_file(name, journal=journal) as tmp:
            write(tmp)

    def add_dir(self, local_dir: str, prefix: str = "") -> None:
        """Copy every file of a local directory (e.g. a saved HF model) into the artifact."""
        if prefix:
            check_name(prefix, "prefix")
        if not os.path.isdir(local_dir):
            raise ArtifactError(
                f"add_dir: {local_dir!r} is not a directory",
                fix="pass the directory the model/tokenizer was saved to",
            )
        for base, _dirs, files in sorted(os.walk(local_dir)):
            for fname in sorted(files):
                src = os.path.join(base, fname)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                name = f"{prefix}/{rel}" if prefix else rel
                with self.local_file(name) as tmp:
                    shutil.copyfile(src, tmp)

    # -- commit
    def _commit(self, params: Any, inputs: list[Any] | tuple) -> None:
        if self.fingerprints:
            # the stage may have added more (e.g. the sources a draft was trained on)
            self.meta["fingerprints"] = {**self.fingerprints, **self.meta.get("fingerprints", {})}
            self.meta["identity"] = self.identity
        manifest = Manifest(
            stage=self.stage,
            key=self.key,
            files=dict(self.files),
            # informational (the key is computed from the params, not read back from here):
            # a credential in a data URL must not be persisted next to the data
            params=redact_obj(canonical(params)) if params is not None else None,
            inputs=[_input_record(i) for i in inputs],
            counts=canonical(self.counts),
            meta=canonical(self.meta),
            created_at=time.time(),
        )
        self._put_bytes(MANIFEST, manifest.to_json().encode())
        log.info("published %s (%d files)", redact_url(self.url), len(self.files))
        if self.identity and self.fingerprints:
            self._write_latest(manifest)
        # The manifest now lists everything the journal did; a leftover journal is harmless
        # (a later publish rewrites or force-drops it), so a failure here is only logged.
        try:
            self.store._rm(self.store.path(self.stage, self.key, JOURNAL_DIR), recursive=True)
        except OSError as exc:  # e.g. a concurrent writer of this key adding an entry
            log.warning("could not remove the journal of %s: %s", redact_url(self.url), exc)
        except StoreError as exc:
            log.warning("could not remove the journal of %s: %s", redact_url(self.url), exc)


def _input_record(i: Any) -> dict[str, str]:
    """How an input appears in a manifest: stage/key/url for artifacts, else its value."""
    if hasattr(i, "stage") and hasattr(i, "key"):
        return {"stage": i.stage, "key": i.key, "url": getattr(i, "url", "")}
    return {"value": i if isinstance(i, str) else json.dumps(canonical(i), sort_keys=True)}


def _tmp_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _remove_stale_temp_files(base: str) -> None:
    """Delete temp files that a killed writer left in a local artifact (or staging) dir.

    A file is stale when its writer (host and pid are in its name) is this host and no
    longer runs, or when it is older than a day (writers on other hosts of a shared disk).
    """
    me = _tmp_tag().rsplit("-", 1)[0]
    now = time.time()
    for entry in os.scandir(base):
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        parts = entry.name[len(_TMP_PREFIX) :].split("-", 2)
        stale = False
        if len(parts) == 3 and parts[0] == me and parts[1].isdigit():
            stale = not _pid_alive(int(parts[1]))
        with contextlib.suppress(OSError):
            stale = stale or now - entry.stat().st_mtime > _STALE_TMP_S
            if stale:
                os.unlink(entry.path)
                log.debug("removed stale temp file %s", entry.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
