"""Fingerprints of external inputs: what a source file, object, Hub repo or target HOLDS.

A stage key built from names alone says "cached" after a dataset grew or a target was
fine-tuned in place. The first stage that reads an external input therefore puts its
fingerprint into its key (`ArtifactStore.key(..., fingerprints=)`) and its manifest
(`meta["fingerprints"]`). A fingerprint is a JSON-able dict with a `kind`, what was looked at,
and a `digest` over the parts that identify the content (`digest_view`):

- `files` (local files, directories, globs): every matched file with `size` and `mtime_ns`.
  Files up to `FULL_HASH_BYTES` (16 MiB: data files, configs, tokenizers, small weights) get
  a full `sha256`, and the digest uses size + sha256 only (a `touch` or a fresh checkout
  keeps the key; a same-size rewrite changes it). Bigger files get a `sampled_sha256` of
  three `SAMPLE_BYTES` windows (head, middle, tail; the safetensors header is in the head),
  and the digest uses size + mtime_ns + that sample: a re-run never reads multi-GB weights.
- objects (any fsspec URL that is not local: s3://, gs://, az://, memory://): `fs.info()`'s
  identity fields (ETag, VersionId, generation, md5Hash, crc32c); a store without any of them
  gets a full sha256 of small objects and the modification time otherwise. A new object under
  the same key has a new ETag / generation.
- `hub` (Hugging Face Hub datasets and models): the revision resolved to its commit sha
  (`HfApi.repo_info`; offline, or without network, from the local Hub cache's
  `<type>s--org--name/refs/<revision>`). A 40-hex revision is pinned and never looked up.
  For a model the cached snapshot's files are listed with the blob names, which ARE the
  sha256 of LFS files (weights) in the Hub cache: nothing is hashed.
- `artifact` (an artifact of this store, e.g. the demo target): its stage, key and a sha256
  of its manifest's file list (names, sizes, sha256): the store already hashed every file.

Resolving is cheap by design (stat calls, small files, one Hub call), so it runs at every
stage start; nothing here imports models or Prefect.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec

from storage.urls import fs_options, redact_url

log = logging.getLogger(__name__)

FULL_HASH_BYTES = 16 << 20  # files up to this are hashed in full (<= ~30 ms each)
SAMPLE_BYTES = 64 << 10  # bigger files: sha256 of head, middle and tail windows of this size
MANIFEST = "manifest.json"
_SHA1_OR_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# what a model directory's fingerprint covers: weights, configs, tokenizer files, remote code
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.gguf",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.py",
)
TOKENIZER_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
)
# fs.info() fields that identify an object's content or version, by store
_OBJECT_ID_FIELDS = (
    "ETag",
    "etag",
    "VersionId",
    "version_id",
    "generation",
    "md5Hash",
    "md5",
    "crc32c",
    "content_md5",
)
_OBJECT_TIME_FIELDS = ("LastModified", "last_modified", "mtime", "updated", "created")


# ---- files and objects ------------------------------------------------------------------


def _hash_local(path: str, size: int) -> dict[str, str]:
    """Full sha256 of a small file, or the sampled sha256 of a big one."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            return {"sha256": h.hexdigest()}
        for offset in (0, size // 2 - SAMPLE_BYTES // 2, size - SAMPLE_BYTES):
            fh.seek(max(0, offset))
            h.update(fh.read(SAMPLE_BYTES))
        return {"sampled_sha256": h.hexdigest()}


def local_file_entry(path: str, name: str | None = None) -> dict[str, Any]:
    """{name, size, mtime_ns, sha256 | sampled_sha256} of one local file."""
    st = os.stat(path)
    entry: dict[str, Any] = {"name": name or path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry.update(_hash_local(path, st.st_size))
    return entry


def object_entry(fs: Any, path: str, name: str | None = None) -> dict[str, Any]:
    """{name, size, <identity fields of fs.info()>} of one remote object (fresh, not cached)."""
    fs.invalidate_cache(path)  # a listing cached by this process would hide an overwrite
    info = fs.info(path)
    entry: dict[str, Any] = {"name": name or fs.unstrip_protocol(path), "size": info.get("size")}
    for k in _OBJECT_ID_FIELDS:
        if info.get(k) not in (None, ""):
            entry[k] = str(info[k]).strip('"')
    if not any(k in entry for k in _OBJECT_ID_FIELDS):
        # no content identity from this store (memory://, ftp, http): hash small objects,
        # else rely on the modification time
        if isinstance(info.get("size"), int) and info["size"] <= FULL_HASH_BYTES:
            with fs.open(path, "rb") as fh:
                entry["sha256"] = hashlib.sha256(fh.read()).hexdigest()
        for k in _OBJECT_TIME_FIELDS:
            if info.get(k) is not None:
                entry["modified"] = str(info[k])
                break
    return entry


def files_fingerprint(
    source: str,
    files: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fingerprint of a file, directory or glob (local or any fsspec URL).

    Args:
        source: what the user named (recorded, redacted; e.g. `data/*.jsonl`).
        files: the matched files (URLs or paths) when the caller expanded `source` itself
            (so the fingerprint covers exactly what the stage reads); None: every file of a
            directory, the glob's matches, or the file.
        storage_options: fsspec options for remote URLs.
    """
    fs, root = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    if files is None:
        paths = _expand(fs, root)
    else:
        paths = sorted(fs._strip_protocol(f) for f in files)
    entries = []
    for p in paths:
        if local:
            entries.append(local_file_entry(p))
        else:
            entries.append(object_entry(fs, p, name=redact_url(fs.unstrip_protocol(p))))
    fp: dict[str, Any] = {
        "kind": "files",
        "source": redact_url(source),
        "files": entries,
        "total_size": sum(int(e.get("size") or 0) for e in entries),
    }
    return with_digest(fp)


def _expand(fs: Any, root: str, patterns: tuple[str, ...] = ()) -> list[str]:
    if any(c in root for c in "*?["):
        found = fs.glob(root)
    elif fs.isdir(root):
        # hidden files and dirs (.git, .cache) below the root are not part of the input
        top = root.rstrip("/") + "/"
        found = [
            p
            for p in fs.find(root)
            if not any(part.startswith(".") for part in p[len(top) :].split("/"))
        ]
        if patterns:
            found = [p for p in found if any(fnmatch.fnmatch(_base(p), pat) for pat in patterns)]
    else:
        found = [root] if fs.exists(root) else []
    return sorted(p for p in found if not fs.isdir(p))


def _base(p: str) -> str:
    return p.rstrip("/").rsplit("/", 1)[-1]


# ---- Hugging Face Hub -------------------------------------------------------------------


def hub_cache_dir() -> str:
    """The Hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag:
        return flag.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_cache(repo_id: str, repo_type: str, cache_dir: str | None) -> str:
    folder = f"{repo_type}s--" + repo_id.replace("/", "--")
    return os.path.join(cache_dir or hub_cache_dir(), folder)


def hub_fingerprint(
    repo_id: str,
    repo_type: str = "model",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """The commit sha a Hub revision points at (`resolved_by`: pinned / hub / cache / none).

    A 40-hex revision is pinned: recorded as is, never looked up. Otherwise the Hub is asked
    (unless HF_HUB_OFFLINE), then the local cache's refs file. When neither answers, the
    fingerprint holds only the names (the key then follows the name, as before) and a warning
    says so.
    """
    rev = revision or "main"
    fp: dict[str, Any] = {"kind": "hub", "repo_type": repo_type, "repo_id": repo_id}
    fp["revision"] = rev
    sha, how = None, "none"
    if _SHA1_OR_SHA.match(rev):
        sha, how = rev, "pinned"
    if sha is None and not _offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=rev, timeout=10).sha
            how = "hub"
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the cache below
            log.info("fingerprint: Hub lookup of %s %s@%s failed: %s", repo_type, repo_id, rev, exc)
    repo_dir = _repo_cache(repo_id, repo_type, cache_dir)
    if sha is None:
        ref_file = os.path.join(repo_dir, "refs", rev)
        if os.path.isfile(ref_file):
            with open(ref_file) as fh:
                sha, how = fh.read().strip(), "cache"
    if sha is None:
        log.warning(
            "fingerprint: %s %s@%s: no commit sha (offline and not in the Hub cache %s); its "
            "stages are keyed by name only. Fix: pin revision=<commit sha> or fill the cache",
            repo_type,
            repo_id,
            rev,
            cache_dir or hub_cache_dir(),
        )
    fp["sha"], fp["resolved_by"] = sha, how
    snap = os.path.join(repo_dir, "snapshots", sha) if sha else ""
    if snap and os.path.isdir(snap):
        fp["files"] = _snapshot_files(snap)
    return with_digest(fp)


def _snapshot_files(snap: str) -> list[dict[str, Any]]:
    """Files of a cached snapshot: name, size and the blob name (sha256 for LFS files)."""
    out = []
    for base, dirs, files in os.walk(snap):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            p = os.path.join(base, f)
            entry: dict[str, Any] = {"name": os.path.relpath(p, snap).replace(os.sep, "/")}
            blob = os.path.basename(os.path.realpath(p))
            entry["size"] = os.path.getsize(p)
            if _SHA256.match(blob):
                entry["sha256"] = blob
            elif _SHA1_OR_SHA.match(blob):
                entry["git_sha1"] = blob
            out.append(entry)
    return out


# ---- artifacts of this store and targets -------------------------------------------------


def artifact_fingerprint(url: str, prefix: str = "") -> dict[str, Any] | None:
    """Stage, key and the sha256 of the manifest's file list of `<root>/<stage>/<key>`
    (only files under `prefix/` when the artifact has some); None if it is no artifact."""
    parts = url.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    try:
        murl = url.rstrip("/") + "/" + MANIFEST
        fs, path = fsspec.core.url_to_fs(murl, **fs_options(murl))
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    files = [f for f in doc.get("files", []) if isinstance(f, dict) and "name" in f]
    sub = [f for f in files if prefix and f["name"].startswith(prefix + "/")]
    listed = sorted((f["name"], f.get("size"), f.get("sha256")) for f in (sub or files))
    fp = {
        "kind": "artifact",
        "url": redact_url(url.rstrip("/")),
        "stage": doc.get("stage", parts[1]),
        "key": doc.get("key", parts[2]),
        "files_sha256": hashlib.sha256(json.dumps(listed).encode()).hexdigest(),
        "files": len(listed),
        "total_size": sum(int(s or 0) for _n, s, _h in listed),
    }
    if sub:
        fp["prefix"] = prefix
    return with_digest(fp)


def model_fingerprint(ref: str, part: str = "model") -> dict[str, Any]:
    """Fingerprint of a target (or tokenizer) reference as eagle_core.models resolves it.

    Args:
        ref: a local model dir, an artifact URL of this store (the demo target), or a Hub
            name (`org/name`, optionally `org/name@revision`).
        part: "model" (weights + configs + tokenizer files) or "tokenizer" (tokenizer files
            only; its fingerprint is unchanged by a weights-only update).
    """
    ref = ref.strip()
    patterns = MODEL_FILE_PATTERNS if part == "model" else TOKENIZER_FILE_PATTERNS
    art = artifact_fingerprint(ref, prefix=part)
    if art is not None:
        return art
    local = os.path.expanduser(ref)
    if os.path.isdir(local):
        inner = os.path.join(local, part)
        if not os.path.exists(os.path.join(local, "config.json")) and os.path.isdir(inner):
            local = inner  # an artifact directory given as a path (model/, tokenizer/)
        fs = fsspec.filesystem("file")
        files = _expand(fs, os.path.abspath(local), patterns)
        fp = files_fingerprint(os.path.abspath(local), files=files)
        fp["kind"], fp["part"] = "model_dir", part
        return with_digest(fp)
    if "://" in ref:
        opts = fs_options(ref)
        fs, root = fsspec.core.url_to_fs(ref, **opts)
        files = [fs.unstrip_protocol(p) for p in _expand(fs, root, patterns)]
        fp = files_fingerprint(ref, files=files, storage_options=opts)
        fp["kind"], fp["part"] = "model_dir", part
        return with_digest(fp)
    repo_id, _, revision = ref.partition("@")
    fp = hub_fingerprint(repo_id, "model", revision or None)
    if part == "tokenizer" and "files" in fp:
        fp["files"] = [
            f for f in fp["files"] if any(fnmatch.fnmatch(_base(f["name"]), p) for p in patterns)
        ]
    fp["part"] = part
    return with_digest(fp)


# ---- digests, keys, diffs -----------------------------------------------------------------


def digest_view(fp: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a fingerprint that identify content (what the key hashes)."""
    kind = fp.get("kind")
    if kind == "hub":
        view = {k: fp.get(k) for k in ("repo_type", "repo_id", "sha")}
        if fp.get("sha") is None:
            view["revision"] = fp.get("revision")  # unresolved: the name is all there is
        if fp.get("part") == "tokenizer" and fp.get("files"):
            # a weights-only commit must not change the tokenizer's key
            view = {k: view[k] for k in ("repo_type", "repo_id")}
            view["files"] = [[f["name"], f.get("sha256") or f.get("git_sha1")] for f in fp["files"]]
        return view
    if kind == "artifact":
        return {k: fp.get(k) for k in ("stage", "key", "files_sha256")}
    files = []
    for e in fp.get("files", []):
        if "sha256" in e:  # full content hash: size + hash say it all (mtime would not)
            files.append({"name": e["name"], "size": e.get("size"), "sha256": e["sha256"]})
        else:
            files.append({k: v for k, v in sorted(e.items())})
    return {"kind": kind, "files": files}


def with_digest(fp: dict[str, Any]) -> dict[str, Any]:
    """`fp` with its `digest` (20 hex chars over `digest_view`) set."""
    blob = json.dumps(digest_view(fp), sort_keys=True, separators=(",", ":"), default=str)
    fp["digest"] = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return fp


def digests(fingerprints: Mapping[str, Any] | None) -> dict[str, Any]:
    """{name: digest | [digests]} of a stage's fingerprints (what goes into its key)."""

    def one(v: Any) -> Any:
        if isinstance(v, Mapping):
            return v.get("digest") or with_digest(dict(v))["digest"]
        if isinstance(v, (list, tuple)):
            return [one(x) for x in v]
        return v

    return {str(k): one(v) for k, v in sorted((fingerprints or {}).items())}


def _kb(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _when(mtime_ns: Any) -> str:
    if not isinstance(mtime_ns, int):
        return str(mtime_ns)
    t = _dt.datetime.fromtimestamp(mtime_ns / 1e9, tz=_dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _label(fp: Mapping[str, Any], what: str) -> str:
    if fp.get("kind") == "hub":
        return f"{what} {fp.get('repo_id')}@{fp.get('revision')}"
    return f"{what} {fp.get('source') or fp.get('url') or '?'}"


def describe_change(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    what: str = "source",
    rows: tuple[Any, Any] | None = None,
) -> str | None:
    """One sentence saying how `new` differs from `old`; None when the digests agree.

    `rows` = (old rows, new rows) when the caller knows them (the download manifest does).
    """
    if old is not None and old.get("digest") == new.get("digest"):
        return None
    label = _label(new, what)
    if old is None:
        return f"{label} is new"
    parts: list[str] = []
    if rows is not None and rows[0] != rows[1]:
        parts.append(f"{rows[0]} -> {rows[1]} rows")
    if old.get("kind") != new.get("kind"):
        parts.append(f"now a {new.get('kind')} input (was {old.get('kind')})")
    elif new.get("kind") == "hub":
        parts.append(f"commit {str(old.get('sha'))[:12]} -> {str(new.get('sha'))[:12]}")
    elif new.get("kind") == "artifact":
        if old.get("key") != new.get("key"):
            parts.append(f"artifact key {old.get('key')} -> {new.get('key')}")
        else:
            parts.append("artifact files changed")
    else:
        parts.extend(_file_changes(old.get("files", []), new.get("files", [])))
    return f"{label} changed: " + ("; ".join(parts) or "content changed")


def _file_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    before = {e["name"]: e for e in old}
    after = {e["name"]: e for e in new}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = []
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        if digest_view({"files": [a]}) == digest_view({"files": [b]}):
            continue
        bits = []
        if a.get("size") != b.get("size"):
            bits.append(f"size {_kb(a.get('size'))} -> {_kb(b.get('size'))}")
        if a.get("mtime_ns") != b.get("mtime_ns") and "mtime_ns" in b:
            bits.append(f"mtime {_when(a.get('mtime_ns'))} -> {_when(b.get('mtime_ns'))}")
        for k in (*_OBJECT_ID_FIELDS, "sha256", "sampled_sha256", "modified"):
            if k in b and a.get(k) != b.get(k) and k not in ("sha256", "sampled_sha256"):
                bits.append(f"{k} {str(a.get(k))[:16]} -> {str(b.get(k))[:16]}")
        if a.get("size") == b.get("size") and (a.get("sha256") or b.get("sha256")):
            bits.append("same size, new content (sha256)")
        changed.append((name, bits))
    parts = []
    single = len(before) == 1 and len(after) == 1 and len(changed) == 1
    for name, bits in changed[:3]:
        detail = ", ".join(bits) or "content changed"
        parts.append(detail if single else f"{_base(name)}: {detail}")
    if len(changed) > 3:
        parts.append(f"and {len(changed) - 3} more files changed")
    if added:
        parts.append(f"{len(added)} file(s) added ({', '.join(_base(n) for n in added[:3])})")
    if removed:
        parts.append(f"{len(removed)} file(s) removed ({', '.join(_base(n) for n in removed[:3])})")
    return parts


def describe_all(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    rows: Mapping[str, tuple[Any, Any]] | None = None,
) -> str | None:
    """Sentences for every named fingerprint of a stage that changed (`sources`, `target`,
    `tokenizer`), joined by "; "; None when none changed.

    `rows`: {source name: (old rows, new rows)} when known (download, after reading).
    """
    old, rows = old or {}, rows or {}
    out = []
    for name, value in sorted(new.items()):
        what = "source" if name == "sources" else name
        prev = old.get(name)
        if isinstance(value, (list, tuple)):
            prev_list = list(prev) if isinstance(prev, (list, tuple)) else []
            by_label = {_label(p, what): p for p in prev_list if isinstance(p, Mapping)}
            for v in value:
                n = rows.get(str(v.get("source") or v.get("repo_id")))
                s = describe_change(by_label.get(_label(v, what)), v, what, rows=n)
                if s:
                    out.append(s)
            gone = set(by_label) - {_label(v, what) for v in value}
            out.extend(f"{g} was dropped" for g in sorted(gone))
        elif isinstance(value, Mapping):
            s = describe_change(prev if isinstance(prev, Mapping) else None, value, what)
            if s:
                out.append(s)
    return "; ".join(out) or None


__all__ = [
    "FULL_HASH_BYTES",
    "SAMPLE_BYTES",
    "artifact_fingerprint",
    "describe_all",
    "describe_change",
    "digest_view",
    "digests",
    "files_fingerprint",
    "hub_fingerprint",
    "model_fingerprint",
]
