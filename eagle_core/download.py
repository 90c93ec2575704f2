"""The `download` stage: raw datasets -> normalized `records` Parquet shards.

Sources (`SourceSpec.path`):
- a Hugging Face Hub dataset name, or a local dataset directory laid out like a Hub repo
  (data files + optional README config): loaded with `datasets.load_dataset(path,
  name=config, split=split, revision=revision, streaming=True)` — the same call either way.
  A directory written by `Dataset.save_to_disk` is loaded with `datasets.load_from_disk`.
- a local path, fsspec URL (s3://, gs://, memory://, ...) or glob of `.jsonl` / `.json` /
  `.parquet` / `.arrow` files (optionally compressed, e.g. `.jsonl.gz`). JSON lines are read
  line by line here, not by `datasets`, whose json loader fails a whole file on one bad line:
  every malformed or non-UTF-8 line is a counted reject instead.

Sample ids are stable: `<source label>/<the record's own id>` when it has one (`id`,
`sample_id`, `uuid`), else `<source label>/<file>:<line>` (files) or
`<source label>/<split>:<row>` (datasets). Weighted copies get `#<k>` appended.

Mixing: a source's `weight` multiplies its kept rows: floor(weight) full copies plus a seeded
subset for the fraction (0.5 keeps half, 2.0 repeats every row twice). With `shuffle=False`
and whole-number weights, records stream from the sources straight into shards (memory
stays flat, reading stops at `max_samples`); otherwise the mix is built in memory, then
shuffled (seeded) and capped (fine for chat/code sets up to a few million rows).

The key holds what the sources contain, not only their names (`source_fingerprint`): a file
that grew, an object overwritten under the same key or a Hub revision that moved is read
again, and the manifest says why (`meta["recompute_reason"]`, with the row counts).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from eagle_core.errors import ConfigError, DataError
from eagle_core.fim import FileSplitter, SpanMode
from eagle_core.records import (
    ALL_REASONS,
    Reason,
    RejectCounter,
    Rejected,
    normalize_record,
    raw_id,
    records_table,
)
from storage import ArtifactStore, StageRef
from storage.fingerprint import describe_all, files_fingerprint, hub_fingerprint
from storage.shards import write_parquet
from storage.urls import ENV_S3_ENDPOINT, fs_options, redact_url

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "download"
SourceKind = Literal["chat", "fim", "tokens", "auto"]
_FILE_EXTS = (".jsonl", ".json", ".parquet", ".arrow", ".ndjson")
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd")
_GLOB_CHARS = "*?["


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """One input dataset of a download."""

    path: str  # Hub name, local dataset dir, or local/fsspec file path or glob
    config: str | None = None  # Hub dataset config name (`name=` of load_dataset)
    split: str = "train"  # Hub/dataset-dir split; ignored for plain files
    revision: str | None = None  # Hub revision (branch, tag, commit); pin it for reproducibility
    weight: float = 1.0  # row multiplier in the mix (see module docstring)
    kind: SourceKind = "auto"  # "auto": decided per row from its fields
    label: str | None = None  # `source` column + sample id prefix; default: the path

    def __post_init__(self) -> None:
        if not self.path or not isinstance(self.path, str):
            raise ConfigError("source.path is empty", fix="give a Hub name, a path or a glob")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ConfigError(
                f"source {self.path}: weight={self.weight} must be > 0",
                fix="use 1.0 to take every row once, 0.5 for half, 2.0 to repeat rows",
            )
        if self.kind not in ("chat", "fim", "tokens", "auto"):
            raise ConfigError(
                f"source {self.path}: kind={self.kind!r} is unknown",
                fix="use chat, fim, tokens or auto",
            )

    @property
    def name(self) -> str:
        # the default label is the path with any credential in it redacted: it ends up in
        # every sample id, log line and manifest
        return self.label or redact_url(self.path)

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        """`path[:weight]` or a JSON object of the fields (for command lines).

        A trailing `:<number>` is a weight (so `s3://b/x.jsonl:2` works, colons in URLs too).
        """
        text = text.strip()
        if text.startswith("{"):
            return cls(**json.loads(text))
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(path=head, weight=float(tail))
            except ValueError:
                pass
        return cls(path=text)


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """Parameters of the download stage (hashed into its key)."""

    sources: tuple[SourceSpec, ...]  # one or more inputs, mixed by weight
    max_samples: int | None = None  # cap on records after mixing (None: all)
    seed: int = 0  # shuffling, weighted subsets and whole-file FIM splits
    shuffle: bool = True  # mix sources before the cap; off keeps file order
    fim_split: SpanMode = "lines"  # whole files: middle = random chars / lines / AST node
    fim_seed: int = 0  # seeds whole-file splits per record (independent of the mix seed)
    max_reject_fraction: float = 0.1  # fail the stage above this: a format mismatch, not noise
    shard_size: int = 10_000  # records per output shard
    streaming: bool = True  # Hub/dataset-dir sources: stream rows instead of materializing

    @property
    def source(self) -> str:
        """The source labels, comma-separated (task run names, log lines)."""
        return ",".join(s.name for s in self.sources)

    def __post_init__(self) -> None:
        srcs = self.sources
        if isinstance(srcs, (SourceSpec, str, dict)):
            srcs = (srcs,)
        srcs = tuple(
            SourceSpec.parse(s)
            if isinstance(s, str)
            else SourceSpec(**s)
            if isinstance(s, dict)
            else s
            for s in srcs
        )
        object.__setattr__(self, "sources", srcs)
        if not srcs:
            raise ConfigError("download.sources is empty", fix="give at least one source")
        labels = [s.name for s in srcs]
        if len(set(labels)) != len(labels):
            raise ConfigError(
                f"download.sources has duplicate labels {labels}",
                fix="give each source a distinct label= (ids must stay unique)",
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(
                f"download.max_samples={self.max_samples} must be >= 1",
                fix="omit it (None) to keep every record",
            )
        if self.fim_split not in ("chars", "lines", "ast"):
            raise ConfigError(
                f"download.fim_split={self.fim_split!r} is unknown", fix="use chars, lines or ast"
            )
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ConfigError(
                f"download.max_reject_fraction={self.max_reject_fraction} is not in [0, 1]",
                fix="use 0.1 (default), or 1.0 to never fail on rejects",
            )
        if self.shard_size < 1:
            raise ConfigError(f"download.shard_size={self.shard_size} must be >= 1", fix="10000")


# ---- reading sources -----------------------------------------------------------------------


def default_storage_options(path: str) -> dict[str, Any]:
    """fsspec options for a data URL: the artifact store's (`storage.urls.fs_options`)."""
    return fs_options(path)


def _is_data_file(name: str) -> bool:
    base = name.lower()
    for c in _COMPRESSIONS:
        if base.endswith(c):
            base = base[: -len(c)]
    return base.endswith(_FILE_EXTS)


def source_type(path: str) -> Literal["files", "hub", "saved"]:
    """How a source path is read: plain files, `load_dataset`, or `load_from_disk`."""
    if "://" in path:
        return "files"
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
            os.path.join(path, "state.json")
        ):
            return "saved"
        # a directory of JSON lines is read line by line (per-line rejects); other layouts
        # (parquet/arrow/csv data files, a README config) go through load_dataset like a repo
        for _base, _dirs, files in os.walk(path):
            if any(f.lower().endswith((".jsonl", ".ndjson", ".jsonl.gz")) for f in files):
                return "files"
        return "hub"
    if any(c in path for c in _GLOB_CHARS) or os.path.exists(path):
        return "files"
    return "hub"


def expand_files(path: str, storage_options: dict[str, Any]) -> list[str]:
    """Sorted data files of a file/dir/glob path (local or fsspec URL), as full URLs."""
    fs, fpath = fsspec.core.url_to_fs(path, **storage_options)
    if any(c in fpath for c in _GLOB_CHARS):
        found = fs.glob(fpath)
    elif fs.isdir(fpath):
        found = [p for p in fs.find(fpath) if _is_data_file(p)]
    else:
        found = [fpath] if fs.exists(fpath) else []
    found = sorted(p for p in found if not fs.isdir(p))
    if not found:
        raise DataError(
            f"source {redact_url(path)!r} matches no files",
            fix=f"check the path / glob (and credentials or ${ENV_S3_ENDPOINT} for s3)",
        )
    is_local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return [p if is_local else fs.unstrip_protocol(p) for p in found]


@dataclass
class RawRow:
    """One raw input row (parsed) or a row-level reject, with its default id suffix."""

    where: str  # "<file>:<line>" or "<split>:<row>"
    value: Any = None
    rejected: Rejected | None = None


def _file_rows(url: str, storage_options: dict[str, Any]) -> Iterator[RawRow]:
    """Rows of one data file, streamed; JSON lines parsed here (per-line rejects)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    base = name.lower()
    for c in _COMPRESSIONS:
        base = base.removesuffix(c)
    with fsspec.open(url, "rb", compression="infer", **copy.deepcopy(storage_options)) as fh:
        if base.endswith(".parquet"):
            pf = pq.ParquetFile(fh)
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for value in batch.to_pylist():
                    yield RawRow(f"{name}:{row}", value)
                    row += 1
            return
        if base.endswith(".arrow"):
            data = fh.read()
            try:
                table = pa.ipc.open_stream(data).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(data).read_all()
            for row, value in enumerate(table.to_pylist()):
                yield RawRow(f"{name}:{row}", value)
            return
        if base.endswith(".json"):
            data = fh.read()
            whole = _parse_whole_json(data)
            if whole is not None:
                for row, value in enumerate(whole):
                    yield RawRow(f"{name}:{row}", value)
                return
            lines: Any = data.splitlines()
        else:
            lines = fh
        for lineno, line in enumerate(lines, start=1):
            where = f"{name}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(where, rejected=Rejected(Reason.NOT_UTF8, str(exc)[:80]))
                continue
            if not text.strip():
                continue  # blank lines separate nothing and are not records
            try:
                yield RawRow(where, json.loads(text))
            except json.JSONDecodeError as exc:
                yield RawRow(where, rejected=Rejected(Reason.MALFORMED_JSON, str(exc)[:80]))


def _parse_whole_json(data: bytes) -> list[Any] | None:
    """A .json file holding one array / object, or None (then it is read as JSON lines)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, list) else [doc]


def _dataset_rows(spec: SourceSpec, kind: str, streaming: bool) -> Iterator[RawRow]:
    """Rows of a Hub dataset or a local dataset directory, through `datasets`."""
    import datasets

    try:
        if kind == "saved":
            ds = datasets.load_from_disk(spec.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(
                spec.path,
                name=spec.config,
                split=spec.split,
                revision=spec.revision,
                streaming=streaming,
            )
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as exc:
        raise DataError(
            f"source {redact_url(spec.path)!r} (config={spec.config}, split={spec.split}, "
            f"revision={spec.revision}) could not be loaded: {type(exc).__name__}: {exc}",
            fix="check the dataset name, config and split (and HF_TOKEN / network for the "
            "Hub); JSON lines with bad lines load per line when given as files",
        ) from exc
    for row, value in enumerate(ds):
        yield RawRow(f"{spec.split}:{row}", value)


def iter_source(
    spec: SourceSpec, storage_options: dict[str, Any] | None = None, streaming: bool = True
) -> Iterator[RawRow]:
    """Every raw row of one source, in a stable order."""
    stype = source_type(spec.path)
    if stype == "files":
        opts = fs_options(spec.path, storage_options)
        for url in expand_files(spec.path, opts):
            log.debug("download: reading %s", redact_url(url))
            yield from _file_rows(url, opts)
    else:
        yield from _dataset_rows(spec, stype, streaming)


def source_fingerprint(
    spec: SourceSpec, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a source holds now (storage.fingerprint): its files' sizes, mtimes and hashes
    (objects: ETag / version), or the Hub commit its revision points at. Part of the key."""
    stype = source_type(spec.path)
    if (
        stype == "hub"
        and not os.path.exists(spec.path)
        and (spec.path.startswith(("/", "./", "../", "~")) or _is_data_file(spec.path))
    ):
        # a local file that is not there (any more): not a Hub name
        raise DataError(
            f"source {redact_url(spec.path)!r} matches no files",
            fix="check the path / glob (a Hub dataset is named org/name)",
        )
    if stype == "files":
        opts = fs_options(spec.path, storage_options)
        fp = files_fingerprint(spec.path, expand_files(spec.path, opts), opts)
    elif os.path.isdir(spec.path):  # a dataset dir (Hub layout or save_to_disk)
        fp = files_fingerprint(os.path.abspath(spec.path))
    else:
        fp = hub_fingerprint(spec.path, "dataset", spec.revision)
    fp["source"] = spec.name  # how logs and diffs name it (the label, redacted path)
    return fp


# ---- the stage ----------------------------------------------------------------------------


@dataclass
class SourceResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0


def iter_normalized(
    spec: SourceSpec,
    cfg: DownloadConfig,
    rejects: RejectCounter,
    splitter: FileSplitter,
    storage_options: dict[str, Any] | None = None,
    tally: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Normalized records of one source, streamed; rejects go to `rejects`, and
    tally["read"] counts raw rows."""
    tally = tally if tally is not None else {}
    tally.setdefault("read", 0)
    seen: set[str] = set()
    for row in iter_source(spec, storage_options, cfg.streaming):
        tally["read"] += 1
        own = raw_id(row.value) if isinstance(row.value, dict) else None
        sid = f"{spec.name}/{own if own is not None else row.where}"
        if row.rejected is not None:
            rejects.add(row.rejected.reason, sid, row.rejected.detail)
            continue
        if sid in seen:
            rejects.add(Reason.DUPLICATE_ID, sid, f"at {row.where}")
            continue
        seen.add(sid)
        rec = normalize_record(
            row.value, sample_id=sid, source=spec.name, kind=spec.kind, split_file=splitter
        )
        if isinstance(rec, Rejected):
            rejects.add(rec.reason, sid, rec.detail)
            continue
        yield rec


def read_source(
    spec: SourceSpec,
    cfg: DownloadConfig,
    rejects: RejectCounter,
    splitter: FileSplitter,
    storage_options: dict[str, Any] | None = None,
) -> SourceResult:
    """All normalized records of one source (the shuffled / fractional-weight path)."""
    tally: dict[str, int] = {}
    out = SourceResult()
    for rec in iter_normalized(spec, cfg, rejects, splitter, storage_options, tally):
        out.records.append(rec)
    out.read = tally.get("read", 0)
    return out


def apply_weight(records: list[dict[str, Any]], weight: float, rng: random.Random) -> list[dict]:
    """floor(weight) copies of every record plus a seeded subset for the fraction."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    out: list[dict[str, Any]] = []
    for k in range(whole):
        out.extend(records if k == 0 else [_copy_id(r, k) for r in records])
    n_extra = round(frac * len(records))
    if n_extra:
        picks = sorted(rng.sample(range(len(records)), n_extra))
        out.extend(records[i] if whole == 0 else _copy_id(records[i], whole) for i in picks)
    return out


def _copy_id(rec: dict[str, Any], k: int) -> dict[str, Any]:
    return {**rec, "sample_id": f"{rec['sample_id']}#{k}"}


def download_key(
    store: ArtifactStore, cfg: DownloadConfig, storage_options: dict[str, Any] | None = None
) -> str:
    """The stage key: the config and what its sources hold now (`source_fingerprint`).

    Raises:
        DataError: a source matches no files.
    """
    fingerprints = {"sources": [source_fingerprint(s, storage_options) for s in cfg.sources]}
    return store.key(STAGE, cfg, code=CODE_VERSION, fingerprints=fingerprints)


def download(
    store: ArtifactStore,
    cfg: DownloadConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StageRef:
    """Read, validate and normalize the sources into `records` shards (cached by key).

    Args:
        store: the artifact store.
        cfg: sources and options.
        force: recompute even if the artifact exists.
        progress: called as progress(sources_done, n_sources).
        storage_options: fsspec options for file sources (default: S3 endpoint from env);
            not part of the key (they locate data, they do not change it).

    Raises:
        DataError: more than `max_reject_fraction` rows rejected, or no record left.
    """
    try:
        key = download_key(store, cfg, storage_options)
    except DataError as exc:
        # a source is gone (a scratch file deleted after its download): the last download of
        # these sources is all that is left of them, so a rerun keeps using it
        prior = None if force else store.latest_key(STAGE, cfg, code=CODE_VERSION)
        if prior is None:
            raise
        log.warning("download %s: %s; reusing the last download of these sources", prior, exc.what)
        return store.ref(STAGE, prior)
    if store.is_done(STAGE, key) and not force:
        log.info("download %s: cached", key)
        return store.ref(STAGE, key)
    previous = store.previous(STAGE, key)  # same sources by name, other content
    log.info("download %s: %d source(s)", key, len(cfg.sources))
    run = _Run(cfg, FileSplitter(mode=cfg.fim_split, seed=cfg.fim_seed))
    if is_streamable(cfg):
        records: Iterator[dict[str, Any]] = _streamed(run, progress, storage_options)
    else:
        records = iter(_in_memory(run, progress, storage_options))
        _check_rejects(cfg, run.rejects, run.read_total)  # before writing anything
    by_kind: dict[str, int] = {}
    n_rows = n_shards = 0
    with store.publish(STAGE, key, params=cfg, force=force) as w:
        while chunk := list(itertools.islice(records, cfg.shard_size)):
            name = f"shard-{n_shards:05d}.parquet"
            if not w.has(name):  # journaled by a crashed earlier attempt: same content
                write_parquet(w, name, records_table(chunk))
            for r in chunk:
                by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
            n_rows += len(chunk)
            n_shards += 1
        _check_rejects(cfg, run.rejects, run.read_total)  # no manifest if it raises
        if not n_rows:
            raise DataError(
                f"download: no records left from {[s.name for s in cfg.sources]} "
                f"(rejected: {run.rejects.counts})",
                fix="check the sources' format (chat messages, FIM fields or input_ids)",
            )
        w.counts.update(
            rows=n_rows,
            read=run.read_total,
            rejected=run.rejects.total,
            rejected_by_reason={r: run.rejects.counts.get(r, 0) for r in ALL_REASONS},
            by_kind=by_kind,
            shards=n_shards,
        )
        w.meta.update(
            reject_examples=run.rejects.examples,
            sources=run.per_source,
            fim_ast_fallbacks=run.splitter.ast_fallbacks,
            fim_split=cfg.fim_split,
            streamed=is_streamable(cfg),
        )
        if previous is not None and w.meta.get("recompute_reason"):
            # now the new row counts are known: say them next to the size / mtime change
            old_sources = previous.meta.get("sources") or {}
            rows = {
                name: ((old_sources.get(name) or {}).get("read"), n.get("read"))
                for name, n in run.per_source.items()
            }
            now = store.fingerprints_of(STAGE, key)
            reason = describe_all(previous.meta.get("fingerprints"), now, rows=rows)
            if reason:
                w.meta["recompute_reason"] = reason
                log.info("download %s: %s", key, reason)
    log.info(
        "download %s: %d records (%d read, %d rejected %s)",
        key,
        n_rows,
        run.read_total,
        run.rejects.total,
        run.rejects.counts,
    )
    return store.ref(STAGE, key)


def is_streamable(cfg: DownloadConfig) -> bool:
    """Records go straight to shards (no shuffle, whole-number weights); otherwise the
    mix is built in memory first (a seeded shuffle / subset needs every row)."""
    return not cfg.shuffle and all(float(s.weight).is_integer() for s in cfg.sources)


@dataclass
class _Run:
    """State of one download: rejects, per-source counts, the file splitter."""

    cfg: DownloadConfig
    splitter: FileSplitter
    rejects: RejectCounter = field(default_factory=RejectCounter)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    read_total: int = 0


def _streamed(
    run: _Run,
    progress: Callable[[int, int], None] | None,
    storage_options: dict[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    """Sources in order, each record followed by its weight copies; stops at the cap."""
    cfg, emitted = run.cfg, 0
    for i, spec in enumerate(cfg.sources):
        tally: dict[str, int] = {}
        before, kept, out = run.rejects.total, 0, 0
        try:
            for rec in iter_normalized(
                spec, cfg, run.rejects, run.splitter, storage_options, tally
            ):
                kept += 1
                for k in range(int(spec.weight)):
                    if cfg.max_samples is not None and emitted >= cfg.max_samples:
                        return
                    yield rec if k == 0 else _copy_id(rec, k)
                    emitted += 1
                    out += 1
        finally:
            run.read_total += tally.get("read", 0)
            run.per_source[spec.name] = {
                "read": tally.get("read", 0),
                "kept": kept,
                "rejected": run.rejects.total - before,
                "after_weight": out,
            }
        if progress:
            progress(i + 1, len(cfg.sources))


def _in_memory(
    run: _Run,
    progress: Callable[[int, int], None] | None,
    storage_options: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The whole mix: weights (exact seeded subsets), seeded shuffle, cap."""
    cfg = run.cfg
    rng = random.Random(cfg.seed)
    records: list[dict[str, Any]] = []
    for i, spec in enumerate(cfg.sources):
        before = run.rejects.total
        res = read_source(spec, cfg, run.rejects, run.splitter, storage_options)
        picked = apply_weight(res.records, spec.weight, rng)
        run.per_source[spec.name] = {
            "read": res.read,
            "kept": len(res.records),
            "rejected": run.rejects.total - before,
            "after_weight": len(picked),
        }
        run.read_total += res.read
        records.extend(picked)
        if progress:
            progress(i + 1, len(cfg.sources))
    if cfg.shuffle:
        rng.shuffle(records)
    return records[: cfg.max_samples] if cfg.max_samples is not None else records


def _check_rejects(cfg: DownloadConfig, rejects: RejectCounter, read_total: int) -> None:
    if read_total and rejects.total / read_total > cfg.max_reject_fraction:
        detail = "; ".join(
            f"{r}={n} (e.g. {rejects.examples.get(r, [])[:2]})"
            for r, n in sorted(rejects.counts.items(), key=lambda kv: -kv[1])
        )
        raise DataError(
            f"download: {rejects.total} of {read_total} rows rejected "
            f"({rejects.total / read_total:.1%} > max_reject_fraction="
            f"{cfg.max_reject_fraction}): {detail}",
            fix="check that the sources are the format you expect (kind=, split=), clean "
            "them, or raise max_reject_fraction",
        )
    if rejects.total:
        log.warning("download: %d rows rejected: %s", rejects.total, rejects.counts)


def config_from_options(
    sources: list[str],
    *,
    max_samples: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    fim_split: str = "lines",
    max_reject_fraction: float = 0.1,
    kind: str = "auto",
    split: str = "train",
    config: str | None = None,
    revision: str | None = None,
) -> DownloadConfig:
    """A DownloadConfig from command-line style options (`path[:weight]` or JSON sources).

    `kind`, `split`, `config`, `revision` apply to sources given as plain strings.
    """
    specs = []
    for s in sources:
        spec = SourceSpec.parse(s)
        if not s.strip().startswith("{"):
            spec = dataclasses.replace(
                spec, kind=kind, split=split, config=config, revision=revision
            )
        specs.append(spec)
    return DownloadConfig(
        sources=tuple(specs),
        max_samples=max_samples,
        seed=seed,
        shuffle=shuffle,
        fim_split=fim_split,  # type: ignore[arg-type]
        max_reject_fraction=max_reject_fraction,
    )


__all__ = [
    "CODE_VERSION",
    "DownloadConfig",
    "SourceSpec",
    "config_from_options",
    "download",
    "iter_source",
]
