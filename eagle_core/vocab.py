"""The `scan_vocab` stage: the EAGLE-3 draft vocabulary from loss-masked target tokens.

Notation: V target vocab size, Vd draft vocab size (N).

- Counts: a bincount [V] over the target ids at loss-masked positions only, streamed over
  the tokenize shards row group by row group: only `input_ids` and `loss_mask` are decoded,
  flattened zero-copy into numpy (`storage.shards.iter_flat_lists`), no per-row Python.
- Choice: the Vd most frequent ids; ties go to the lower id; if fewer than Vd distinct ids
  were seen, the smallest unseen ids fill the rest (they are never predicted, but the
  draft head keeps its configured size).
- Layout (what SGLang / vLLM load): draft index i <-> target id `i + d2t[i]`, draft ids in
  ascending target-id order; `t2d` [V] bool marks target ids in the draft vocab.
- Coverage: the share of masked tokens whose target id is in the draft vocab (the
  ceiling of what the draft can ever accept).
- Footer histograms: the tokenize stage stores each shard's masked-token histogram in that
  shard's Parquet footer (`MASKED_COUNTS_KEY`, written in the same file write as the rows).
  scan_vocab sums those (footer reads only, no column decoded) and scans the tokens of any
  shard without a usable one (older tokenize output, other writers, a damaged or mismatched
  footer: warned). Both paths give the same counts, so the key and output do not depend on
  which one ran.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from eagle_core.errors import ConfigError, DataError, ModelMismatchError
from storage import ArtifactStore, StageRef
from storage.errors import ArtifactError
from storage.shards import ParquetFooter, flatten_lists, iter_flat_lists, read_footer

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "scan_vocab"
VOCAB_FILE = "vocab_map.safetensors"
# Parquet footer key of a tokenize shard's masked-token histogram (see encode_masked_counts)
MASKED_COUNTS_KEY = "eagle.masked_counts"
MASKED_COUNTS_FORMAT = 1
_IDS_LEAF, _MASK_LEAF = "input_ids.list.element", "loss_mask.list.element"


@dataclass(frozen=True, kw_only=True)
class VocabConfig:
    """Parameters of scan_vocab (hashed into its key)."""

    draft_vocab_size: int = 32000  # EAGLE-3 / SpecForge default for 128k-152k target vocabs
    # the target's config.vocab_size when its embedding is padded past the tokenizer's size
    # (t2d must have the target's V); None: the tokenizer size from the tokenize manifest
    target_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.draft_vocab_size < 1:
            raise ConfigError(
                f"vocab.draft_vocab_size={self.draft_vocab_size} must be >= 1",
                fix="use 32000 (default) or the target vocab size for no reduction",
            )
        if self.target_vocab_size is not None and self.target_vocab_size < 1:
            raise ConfigError(
                f"vocab.target_vocab_size={self.target_vocab_size} must be >= 1",
                fix="omit it to use the tokenizer's size",
            )


@dataclass
class VocabMap:
    """The draft <-> target vocabulary map. d2t: int64 [Vd]; t2d: bool [V]."""

    d2t: torch.Tensor
    t2d: torch.Tensor

    def __post_init__(self) -> None:
        if self.d2t.dtype != torch.int64 or self.d2t.dim() != 1:
            raise ModelMismatchError(
                f"d2t is {self.d2t.dtype} {tuple(self.d2t.shape)}", fix="d2t must be int64 [Vd]"
            )
        if self.t2d.dtype != torch.bool or self.t2d.dim() != 1:
            raise ModelMismatchError(
                f"t2d is {self.t2d.dtype} {tuple(self.t2d.shape)}", fix="t2d must be bool [V]"
            )
        ids = self.draft_ids
        if int(self.t2d.sum()) != len(ids) or (len(ids) and not bool(self.t2d[ids].all())):
            raise ModelMismatchError("d2t and t2d disagree", fix="rebuild the map (scan_vocab)")

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.t2d.numel())

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target ids of the draft vocab, ascending. int64 [Vd]."""
        return torch.arange(self.d2t.numel(), dtype=torch.int64) + self.d2t

    @classmethod
    def from_draft_ids(cls, draft_ids: Sequence[int] | torch.Tensor, vocab_size: int) -> VocabMap:
        ids = torch.as_tensor(draft_ids, dtype=torch.int64).sort().values
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= vocab_size):
            raise ModelMismatchError(
                f"draft ids span [{int(ids[0])}, {int(ids[-1])}] outside the vocab [0, "
                f"{vocab_size})",
                fix="use target ids of this target's vocab",
            )
        if ids.unique().numel() != ids.numel():
            raise ModelMismatchError("draft ids repeat", fix="pass distinct target ids")
        t2d = torch.zeros(vocab_size, dtype=torch.bool)
        t2d[ids] = True
        return cls(d2t=ids - torch.arange(ids.numel(), dtype=torch.int64), t2d=t2d)

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft index of each target id (-1 where not in the draft vocab). Same shape."""
        index = torch.cumsum(self.t2d.long(), 0) - 1  # [V]
        out = index[target_ids]
        return torch.where(self.t2d[target_ids], out, torch.full_like(out, -1))

    def save(self, path: str) -> None:
        save_file({"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}, path)

    @classmethod
    def load(cls, path: str) -> VocabMap:
        try:
            t = load_file(path)
        except (OSError, ValueError) as exc:
            raise ModelMismatchError(
                f"vocab map {path} is unreadable ({exc})", fix="re-run scan_vocab"
            ) from exc
        if "d2t" not in t or "t2d" not in t:
            raise ModelMismatchError(
                f"vocab map {path} lacks d2t/t2d (has {sorted(t)})", fix="re-run scan_vocab"
            )
        return cls(d2t=t["d2t"], t2d=t["t2d"])

    @classmethod
    def from_artifact(cls, store: ArtifactStore, ref: StageRef, tmpdir: str) -> VocabMap:
        return cls.load(store.local_copy(ref, VOCAB_FILE, tmpdir))


def add_masked_counts(
    counts: np.ndarray, ids: np.ndarray, mask: np.ndarray, where: str = "tokens"
) -> None:
    """counts[t] += number of positions with ids == t and mask != 0 (in place).

    Args:
        counts: int64 [V], updated in place.
        ids: integer [N] flattened target ids.
        mask: integer or bool [N] flattened loss mask (nonzero = counted).

    Raises:
        DataError: lengths differ, or an id outside [0, V) (tokenized for another vocab).
    """
    if ids.shape != mask.shape:
        raise DataError(
            f"{where}: input_ids and loss_mask lengths differ ({ids.shape[0]} vs {mask.shape[0]})",
            fix="re-run the tokenize stage",
        )
    v = counts.shape[0]
    picked = ids[mask if mask.dtype == np.bool_ else mask != 0]
    if not picked.size:
        return
    # one pass for the upper bound (a huge id must not size the bincount); bincount itself
    # refuses negative ids
    hi = int(picked.max())
    bad: int | None = hi if hi >= v else None
    if bad is None:
        try:
            found = np.bincount(picked, minlength=v)
        except ValueError:
            bad = int(picked.min())
    if bad is not None:
        raise DataError(
            f"{where}: token id {bad} outside the vocab size {v}",
            fix="tokenize with the target's tokenizer, or set target_vocab_size",
        )
    counts += found


def count_masked_tokens(
    batches: Iterable[pa.RecordBatch], vocab_size: int, where: str = "tokens"
) -> np.ndarray:
    """Frequencies of target ids at loss_mask != 0 over record batches. Returns int64 [V].

    Raises:
        DataError: an id outside [0, V) (the data was tokenized for another vocab).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in batches:
        ids = batch.column("input_ids").flatten().to_numpy(zero_copy_only=False)
        mask = batch.column("loss_mask").flatten().to_numpy(zero_copy_only=False)
        add_masked_counts(counts, ids, mask, where)
    return counts


def count_artifact_tokens(
    store: ArtifactStore, ref: StageRef, vocab_size: int, names: Sequence[str] | None = None
) -> np.ndarray:
    """Frequencies of target ids at loss_mask != 0 over a tokenize artifact. int64 [V].

    The scan path: only `input_ids` and `loss_mask` are decoded, row group by row group,
    straight into numpy (no per-row Python objects), then one masked bincount per row group.

    Args:
        names: only these shards (default: every `.parquet` file of the artifact).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    if names is not None and not names:
        return counts
    for part in iter_flat_lists(store, ref, ["input_ids", "loss_mask"], names=names):
        where = f"{ref.url}/{part.shard}"
        add_masked_counts(counts, part.values["input_ids"], part.values["loss_mask"], where)
    return counts


# ---- masked-token histograms in the tokenize shards' footers ------------------------------


def masked_histogram(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of `ids` at positions where mask != 0.

    Args:
        ids: integer [N] flattened token ids.
        mask: integer or bool [N] flattened loss mask.

    Returns:
        (distinct ids int32 [D] ascending, their counts int64 [D], all > 0).
    """
    picked = ids[mask if mask.dtype == np.bool_ else mask != 0]
    if not picked.size:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    lo, hi = min(int(picked.min()), 0), int(picked.max())
    # a dense bincount over [lo, hi] (one pass; the ids of one vocab) unless the span is far
    # larger than the data (stray huge ids): then sort
    if hi - lo <= max(4 * picked.size, 1 << 20):
        dense = np.bincount(picked.astype(np.int64) - lo if lo else picked)
        nz = np.flatnonzero(dense)
        return (nz + lo).astype(np.int32), dense[nz].astype(np.int64, copy=False)
    uniq, cnt = np.unique(picked, return_counts=True)
    return uniq.astype(np.int32), cnt.astype(np.int64)


def list_levels(offsets: np.ndarray) -> int:
    """Parquet's num_values of a non-null list column with these offsets [rows + 1]: one per
    item, one per empty list."""
    return int(np.maximum(np.diff(offsets), 1).sum())


def _shuffle(a: np.ndarray) -> bytes:
    """Bytes of a 1-D little-endian array, grouped by byte position (all first bytes, then
    all second bytes, ...): the high bytes of small numbers become long zero runs."""
    return a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes()


def _unshuffle(data: bytes, n: int, width: int) -> np.ndarray:
    """Inverse of _shuffle for unsigned little-endian `width`-byte numbers -> int64 [n]
    (the top bit of an 8-byte number lands in the sign)."""
    planes = np.frombuffer(data, np.uint8).reshape(width, n)
    out = planes[0].astype(np.int64)
    for k in range(1, width):
        if planes[k].any():  # mostly zero planes: small gaps and counts
            out |= planes[k].astype(np.int64) << (8 * k)
    return out


def encode_masked_counts(ids: np.ndarray, counts: np.ndarray, *, rows: int, levels: int) -> str:
    """The footer value of one shard's masked-token histogram (`MASKED_COUNTS_KEY`).

    JSON (ASCII, so any Parquet tool shows it): `format`, the shard's `rows` and `levels`
    (Parquet num_values of the input_ids and loss_mask leaves: they tie the histogram to
    the table it was made from), `masked_tokens` (= sum of counts), `distinct` (D), `first`
    (ids[0], 0 if D == 0) and `data`: base64 of one zstd frame of the byte-shuffled
    little-endian uint32 gaps ids[1:] - ids[:-1] [D-1], then the byte-shuffled int64 counts
    [D] (12 D - 4 bytes). A 1M-token shard over a 128k vocab: ~60k distinct ids, ~48 kB
    of footer (zlib of the plain ids + counts: ~165 kB), decoded in ~1 ms.

    Args:
        ids: int32 [D] distinct ids, ascending; counts: int64 [D] (masked_histogram).
        rows: rows of the shard; levels: list_levels of its input_ids offsets.
    """
    ids64 = np.asarray(ids, dtype=np.int64)
    gaps = np.diff(ids64).astype("<u4")
    raw = _shuffle(gaps) + _shuffle(np.ascontiguousarray(counts, dtype="<i8"))
    return json.dumps(
        {
            "format": MASKED_COUNTS_FORMAT,
            "rows": int(rows),
            "levels": int(levels),
            "masked_tokens": int(counts.sum()),
            "distinct": int(ids64.shape[0]),
            "first": int(ids64[0]) if ids64.size else 0,
            "data": base64.b64encode(pa.compress(raw, codec="zstd", asbytes=True)).decode(),
        },
        separators=(",", ":"),
    )


def masked_counts_footer(table: pa.Table) -> dict[str, str]:
    """The footer key-values that store a tokenize table's masked-token histogram
    (`write_parquet(..., file_metadata=...)`). The flat `input_ids` / `loss_mask` buffers
    are read zero-copy; one bincount.

    Raises:
        ArtifactError: input_ids and loss_mask are not row-aligned list columns.
    """
    part = flatten_lists(table, ["input_ids", "loss_mask"], "", 0, "tokenize table")
    ids, counts = masked_histogram(part.values["input_ids"], part.values["loss_mask"])
    value = encode_masked_counts(ids, counts, rows=table.num_rows, levels=list_levels(part.offsets))
    return {MASKED_COUNTS_KEY: value}


class FooterCountsUnusable(Exception):
    """A shard's footer histogram cannot be used (the reason is the message); the caller
    scans the shard's tokens instead."""


def decode_masked_counts(footer: ParquetFooter) -> tuple[np.ndarray, np.ndarray] | None:
    """The (ids int32 [D], counts int64 [D]) histogram a tokenize shard's footer holds.

    Returns None if the footer has none (written before it existed, or by another writer).

    Raises:
        FooterCountsUnusable: an unknown format version, a damaged value, or one that does
            not match this shard (rows, list lengths, or a total other than masked_tokens).
    """
    raw = footer.key_values.get(MASKED_COUNTS_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        version = doc.get("format") if isinstance(doc, dict) else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FooterCountsUnusable(f"not JSON ({exc})") from exc
    if version != MASKED_COUNTS_FORMAT:
        raise FooterCountsUnusable(
            f"format {version!r}, this code reads format {MASKED_COUNTS_FORMAT}"
        )
    try:
        rows, levels = int(doc["rows"]), int(doc["levels"])
        total, d, first = int(doc["masked_tokens"]), int(doc["distinct"]), int(doc["first"])
        if d < 0:
            raise ValueError(f"distinct={d}")
        size = 12 * d - 4 if d else 0
        packed = base64.b64decode(doc["data"], validate=True)
        # the frame must decode to exactly `size` bytes (OSError otherwise)
        data = pa.decompress(packed, decompressed_size=size, codec="zstd", asbytes=True)
    except (KeyError, TypeError, ValueError, binascii.Error, OSError, pa.ArrowException) as exc:
        raise FooterCountsUnusable(f"damaged ({type(exc).__name__}: {exc})") from exc
    if len(data) != size:
        raise FooterCountsUnusable(f"damaged ({len(data)} data bytes for {d} distinct ids)")
    if d:
        gaps = _unshuffle(data[: 4 * (d - 1)], d - 1, 4)
        counts = _unshuffle(data[4 * (d - 1) :], d, 8)
        ids64 = np.concatenate([[first], first + np.cumsum(gaps)])
        if (
            (gaps.size and int(gaps.min()) <= 0)
            or not -(2**31) <= first <= int(ids64[-1]) < 2**31
            or int(counts.min()) <= 0
        ):
            raise FooterCountsUnusable("damaged (ids not ascending int32 or counts not positive)")
        ids = ids64.astype(np.int32)
    else:
        ids, counts = np.zeros(0, np.int32), np.zeros(0, np.int64)
    if int(counts.sum()) != total:
        raise FooterCountsUnusable(
            f"its counts add up to {int(counts.sum())}, not its masked_tokens={total}"
        )
    have = (
        footer.num_rows,
        footer.leaf_values.get(_IDS_LEAF),
        footer.leaf_values.get(_MASK_LEAF),
    )
    if have != (rows, levels, levels):
        raise FooterCountsUnusable(
            f"made for another table: rows/levels {rows}/{levels}, the shard has "
            f"{have[0]} rows, {have[1]}/{have[2]} input_ids/loss_mask levels"
        )
    return ids, counts


@dataclass
class CountReport:
    """Which path counted each shard of one artifact (for logs and tests)."""

    footer: list[str]  # shards whose footer histogram was used
    scanned: dict[str, str]  # shard -> why its tokens were scanned


def artifact_counts(
    store: ArtifactStore, ref: StageRef, vocab_size: int, footer_counts: bool = True
) -> tuple[np.ndarray, CountReport]:
    """Frequencies of target ids at loss_mask != 0 over a tokenize artifact. int64 [V].

    Each shard's footer histogram is added where it is usable; every other shard's tokens
    are scanned (count_artifact_tokens). Damaged or mismatched histograms are warned about
    and scanned: the tokens are the truth and the histogram only a summary of them, so the
    result is the scan's either way. If every shard was counted from its footer and the
    total disagrees with the manifest's masked_tokens, the whole artifact is scanned.

    Args:
        footer_counts: False scans every shard (the reference the histograms must equal).

    Raises:
        DataError: an id outside [0, V) (raised by the scan of that shard, naming it).
    """
    names = store.list_files(ref, suffix=".parquet")
    if not footer_counts:
        report = CountReport(footer=[], scanned=dict.fromkeys(names, "footer_counts=False"))
        return count_artifact_tokens(store, ref, vocab_size), report
    counts = np.zeros(vocab_size, dtype=np.int64)
    report = CountReport(footer=[], scanned={})
    for name in names:
        where = f"{ref.url}/{name}"
        try:
            hist = decode_masked_counts(read_footer(store, ref, name))
        except FooterCountsUnusable as exc:
            log.warning("%s: footer histogram unusable, scanning its tokens: %s", where, exc)
            report.scanned[name] = f"unusable footer histogram: {exc}"
            continue
        except ArtifactError as exc:  # the scan names the file (and fails) the usual way
            report.scanned[name] = f"unreadable footer: {exc.what}"
            continue
        if hist is None:
            report.scanned[name] = "no footer histogram"
            continue
        ids, c = hist
        if ids.size and (int(ids[0]) < 0 or int(ids[-1]) >= vocab_size):
            # the scan raises the usual DataError naming the shard and the id
            report.scanned[name] = f"footer histogram holds ids outside [0, {vocab_size})"
            continue
        counts[ids] += c  # ids are distinct
        report.footer.append(name)
    if report.scanned:
        scanned = count_artifact_tokens(store, ref, vocab_size, names=list(report.scanned))
        counts += scanned
    want = ref.counts.get("masked_tokens") if isinstance(ref.counts, dict) else None
    if not report.scanned and isinstance(want, int) and int(counts.sum()) != want:
        log.warning(
            "%s: footer histograms add up to %d masked tokens, the manifest says %d: "
            "scanning every shard",
            ref.url,
            int(counts.sum()),
            want,
        )
        report = CountReport(
            footer=[], scanned=dict.fromkeys(names, "footer total != manifest masked_tokens")
        )
        return count_artifact_tokens(store, ref, vocab_size), report
    return counts, report


def choose_draft_ids(counts: np.ndarray, n: int) -> np.ndarray:
    """The n draft ids (ascending target ids): most frequent first, ties -> lower id, then
    the smallest unseen ids as filler. counts: int64 [V]. Returns int64 [n]."""
    v = counts.shape[0]
    if n > v:
        raise ConfigError(
            f"draft_vocab_size={n} is larger than the target vocab ({v})",
            fix=f"use draft_vocab_size <= {v}",
        )
    if n <= 0:
        return np.zeros(0, np.int64)
    ids = np.arange(v, dtype=np.int64)
    cmax = int(counts.max())
    if n < v and cmax < (1 << 62) // v:
        # one distinct key per id, ordered by (count desc, id asc); unseen ids (count 0)
        # come last in id order, i.e. they are the filler. O(V) selection, no sort.
        key = (cmax - counts.astype(np.int64)) * v + ids
        return np.sort(np.argpartition(key, n - 1)[:n]).astype(np.int64)
    order = np.lexsort((ids, -counts))  # by count desc, then id asc
    seen = order[counts[order] > 0][:n]
    if seen.size < n:
        unseen = ids[counts == 0][: n - seen.size]  # ascending already
        seen = np.concatenate([seen, unseen])
    return np.sort(seen).astype(np.int64)


@dataclass(frozen=True)
class VocabStats:
    masked_tokens: int
    distinct_seen: int
    covered_tokens: int

    @property
    def coverage(self) -> float:
        return self.covered_tokens / self.masked_tokens if self.masked_tokens else 0.0


def build_vocab_map(counts: np.ndarray, n: int) -> tuple[VocabMap, VocabStats]:
    """The map and its coverage from token counts [V]."""
    draft = choose_draft_ids(counts, n)
    stats = VocabStats(
        masked_tokens=int(counts.sum()),
        distinct_seen=int((counts > 0).sum()),
        covered_tokens=int(counts[draft].sum()),
    )
    return VocabMap.from_draft_ids(torch.from_numpy(draft), counts.shape[0]), stats


def _vocab_size(store: ArtifactStore, refs: Sequence[StageRef], cfg: VocabConfig) -> int:
    metas = [store.manifest(r.stage, r.key).meta for r in refs]
    hashes = {m.get("tokenizer_hash") for m in metas}
    if len(hashes) > 1:
        raise ModelMismatchError(
            f"tokenize artifacts {[r.url for r in refs]} used different tokenizers",
            fix="tokenize every dataset with the target's tokenizer",
        )
    sizes = [m.get("vocab_size") for m in metas if m.get("vocab_size")]
    tok_v = max(sizes) if sizes else None
    if cfg.target_vocab_size is not None:
        if tok_v is not None and cfg.target_vocab_size < tok_v:
            raise ConfigError(
                f"vocab.target_vocab_size={cfg.target_vocab_size} < tokenizer size {tok_v}",
                fix="use the target model's config.vocab_size",
            )
        return cfg.target_vocab_size
    if tok_v is None:
        raise ConfigError(
            "the tokenize manifest has no vocab_size", fix="set vocab.target_vocab_size"
        )
    return int(tok_v)


def scan_vocab(
    store: ArtifactStore,
    tokens: StageRef | Sequence[StageRef],
    cfg: VocabConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    footer_counts: bool = True,
) -> StageRef:
    """Choose the draft vocabulary over one or more tokenize artifacts (cached by key).

    Writes `vocab_map.safetensors` (d2t int64 [Vd], t2d bool [V]) and `vocab_stats.json`.

    Args:
        footer_counts: sum the shards' footer histograms where usable (artifact_counts);
            False scans every token. Not part of the key: both give the same counts.
    """
    refs = [tokens] if isinstance(tokens, StageRef) else list(tokens)
    if not refs:
        raise ConfigError("scan_vocab got no tokenize artifact", fix="pass at least one")
    key = store.key(STAGE, cfg, inputs=refs, code=CODE_VERSION)
    if store.is_done(STAGE, key) and not force:
        log.info("scan_vocab %s: cached", key)
        return store.ref(STAGE, key)
    v = _vocab_size(store, refs, cfg)
    if cfg.draft_vocab_size > v:
        raise ConfigError(
            f"draft_vocab_size={cfg.draft_vocab_size} is larger than the target vocab ({v})",
            fix=f"use draft_vocab_size <= {v}",
        )
    counts = np.zeros(v, dtype=np.int64)
    for i, ref in enumerate(refs):
        part, report = artifact_counts(store, ref, v, footer_counts=footer_counts)
        counts += part
        _log_report(ref, report)
        if progress:
            progress(i + 1, len(refs))
    if not counts.any():
        raise DataError(
            f"no loss-masked tokens in {[r.url for r in refs]}",
            fix="check the tokenize stage's loss masks",
        )
    vmap, stats = build_vocab_map(counts, cfg.draft_vocab_size)
    with store.publish(STAGE, key, params=cfg, inputs=refs, force=force) as w:
        w.write_file(VOCAB_FILE, vmap.save)
        w.write_json(
            "vocab_stats.json",
            {
                "coverage": stats.coverage,
                "masked_tokens": stats.masked_tokens,
                "distinct_seen": stats.distinct_seen,
                "draft_vocab_size": vmap.draft_vocab_size,
                "vocab_size": vmap.vocab_size,
            },
        )
        w.counts.update(
            draft_vocab_size=vmap.draft_vocab_size,
            vocab_size=vmap.vocab_size,
            coverage=round(stats.coverage, 6),
            masked_tokens=stats.masked_tokens,
            distinct_seen=stats.distinct_seen,
        )
        w.meta.update(
            tokenizer_hash=store.manifest(refs[0].stage, refs[0].key).meta.get("tokenizer_hash")
        )
    log.info(
        "scan_vocab %s: Vd=%d of V=%d, coverage %.4f (%d distinct ids seen)",
        key,
        vmap.draft_vocab_size,
        v,
        stats.coverage,
        stats.distinct_seen,
    )
    return store.ref(STAGE, key)


def _log_report(ref: StageRef, report: CountReport) -> None:
    n = len(report.footer) + len(report.scanned)
    if not report.scanned:
        log.info("scan_vocab: %s: %d shard(s) counted from footer histograms", ref.url, n)
        return
    why: dict[str, int] = {}
    for reason in report.scanned.values():
        why[reason] = why.get(reason, 0) + 1
    log.info(
        "scan_vocab: %s: %d of %d shard(s) counted from footer histograms, %d scanned (%s)",
        ref.url,
        len(report.footer),
        n,
        len(report.scanned),
        "; ".join(f"{k}: {v}" for k, v in why.items()),
    )


def load_vocab_map(url_or_path: str, tmpdir: str) -> VocabMap:
    """A VocabMap from a scan_vocab artifact URL or a local .safetensors path."""
    if url_or_path.endswith(".safetensors") and os.path.exists(url_or_path):
        return VocabMap.load(url_or_path)
    store, stage, key = ArtifactStore.for_url(url_or_path)
    return VocabMap.from_artifact(store, store.ref(stage, key), tmpdir)


def stats_json(store: ArtifactStore, ref: StageRef) -> dict[str, Any]:
    return json.loads(store.read_bytes(ref, "vocab_stats.json"))
