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
"""

from __future__ import annotations

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
from storage.shards import iter_flat_lists

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "scan_vocab"
VOCAB_FILE = "vocab_map.safetensors"


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


def count_artifact_tokens(store: ArtifactStore, ref: StageRef, vocab_size: int) -> np.ndarray:
    """Frequencies of target ids at loss_mask != 0 over a tokenize artifact. int64 [V].

    The fast path: only `input_ids` and `loss_mask` are decoded, row group by row group,
    straight into numpy (no per-row Python objects), then one masked bincount per row group.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in iter_flat_lists(store, ref, ["input_ids", "loss_mask"]):
        where = f"{ref.url}/{part.shard}"
        add_masked_counts(counts, part.values["input_ids"], part.values["loss_mask"], where)
    return counts


def choose_draft_ids(counts: np.ndarray, n: int) -> np.ndarray:
    """The n draft ids (ascending target ids): most frequent first, ties -> lower id, then
    the smallest unseen ids as filler. counts: int64 [V]. Returns int64 [n]."""
    v = counts.shape[0]
    if n > v:
        raise ConfigError(
            f"draft_vocab_size={n} is larger than the target vocab ({v})",
            fix=f"use draft_vocab_size <= {v}",
        )
    ids = np.arange(v)
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
) -> StageRef:
    """Choose the draft vocabulary over one or more tokenize artifacts (cached by key).

    Writes `vocab_map.safetensors` (d2t int64 [Vd], t2d bool [V]) and `vocab_stats.json`.
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
        counts += count_artifact_tokens(store, ref, v)
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


def load_vocab_map(url_or_path: str, tmpdir: str) -> VocabMap:
    """A VocabMap from a scan_vocab artifact URL or a local .safetensors path."""
    if url_or_path.endswith(".safetensors") and os.path.exists(url_or_path):
        return VocabMap.load(url_or_path)
    store, stage, key = ArtifactStore.for_url(url_or_path)
    return VocabMap.from_artifact(store, store.ref(stage, key), tmpdir)


def stats_json(store: ArtifactStore, ref: StageRef) -> dict[str, Any]:
    return json.loads(store.read_bytes(ref, "vocab_stats.json"))
