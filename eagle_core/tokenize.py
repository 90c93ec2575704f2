"""The `tokenize` stage: records -> `input_ids` + `loss_mask` Parquet shards.

Per record kind (`format="auto"`), or one kind for all (`format="chat" | "fim" | "tokens"`;
records of another kind are counted as `kind_mismatch` rejects):
- chat: rendered by the tokenizer's chat template, tokenized once, assistant turns and their
  end-of-turn tokens masked (eagle_core.chat).
- fim: PSM or SPM with the tokenizer's own FIM tokens (eagle_core.fim); a `fim_rate` share
  of records (seeded per record) is FIM, the rest plain left-to-right code.
- tokens: pre-tokenized ids pass through (checked against the vocab size).

Truncation to `max_length`: chat and plain samples keep their first tokens; FIM samples
shorten the prefix (keeping its end) and the suffix (keeping its start) first, so the
middle survives. A sample without any loss token left is rejected (`no_loss_tokens`).

Output shard k holds the kept samples of input rows [k*shard_size, (k+1)*shard_size), so a
crashed run resumes shard by shard (journal) with identical results. Each shard's Parquet
footer also holds the histogram of its ids at loss-masked positions
(`eagle_core.vocab.MASKED_COUNTS_KEY`), written in the same file write, so scan_vocab sums
footers instead of decoding every token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from eagle_core.chat import (
    choose_mask_mode,
    encode_batch,
    flatten_ids,
    resolve_chat_template,
    tokenize_chat_batch,
)
from eagle_core.errors import ConfigError, DataError
from eagle_core.fim import (
    FimOrder,
    FimTokens,
    discover_fim_tokens,
    fim_ids,
    record_rng,
)
from eagle_core.records import RejectCounter, parse_messages
from eagle_core.vocab import masked_counts_footer
from storage import ArtifactStore, StageRef
from storage.shards import iter_batches, write_parquet

log = logging.getLogger(__name__)

# 2: generation-block masks mark every token overlapping a block (transformers >= 5.24's
# rule; 1 followed transformers <= 5.23, which dropped the answers after one starting with
# trimmed whitespace): the rows change, so cached shards of "1" must not be served.
# (Shard footers holding the masked-token histogram did not bump it: same rows.)
CODE_VERSION = "2"
STAGE = "tokenize"
Format = Literal["auto", "chat", "fim", "tokens"]

TOKENS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
    ]
)
_RECORD_COLS = [
    "sample_id",
    "kind",
    "source",
    "messages_json",
    "prefix",
    "middle",
    "suffix",
    "input_ids",
    "loss_mask",
]


class TokReason:
    """Reject reasons of the tokenize stage (plus eagle_core.chat.ChatReason)."""

    KIND_MISMATCH = "kind_mismatch"  # e.g. a FIM record with format="chat"
    NO_LOSS_TOKENS = "no_loss_tokens"  # nothing left to learn (after truncation)
    TOKEN_OUT_OF_VOCAB = "token_out_of_vocab"  # pre-tokenized id >= the tokenizer's size


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """Parameters of the tokenize stage (hashed into its key, with the tokenizer's hash)."""

    tokenizer: str  # local dir, Hub name, or a build_demo_target artifact URL
    format: Format = "auto"  # "auto": each record by its own kind
    max_length: int = 2048  # reference EAGLE trainer default
    fim_order: FimOrder = "psm"  # PSM is what FIM models are mostly served with
    # 1.0: records of kind "fim" were made for infilling (the serving workload); lower it
    # (e.g. 0.5) to also teach plain left-to-right code completion from the same files
    fim_rate: float = 1.0
    fim_tokens: tuple[str, str, str, str] | None = None  # (prefix, suffix, middle, end)
    chat_template: str | None = None  # template name of the tokenizer, .jinja file, or text
    chat_mask: Literal["auto", "offsets", "generation"] = "auto"  # see eagle_core.chat
    last_turn_only: bool = False  # mask only the last answer (e.g. regenerated data)
    keep_reasoning: bool = True  # train on reasoning: served reasoning models emit it
    # "answer": loss on assistant answers / FIM middles only (the reference trainers).
    # "all": on every token but the first, prompts included. EAGLE's labels are the target's
    # own next-token distribution, not the data's tokens, so prompt positions are valid
    # training signal too: many times more positions per sample, at the price of also
    # fitting text the target reads but never writes. For short answers / FIM middles.
    loss_on: Literal["answer", "all"] = "answer"
    seed: int = 0  # per-record FIM / plain draw
    shard_size: int = 10_000  # input rows per output shard (the resume unit)

    def __post_init__(self) -> None:
        if not self.tokenizer or not isinstance(self.tokenizer, str):
            raise ConfigError("tokenize.tokenizer is empty", fix="pass a tokenizer dir or name")
        if self.format not in ("auto", "chat", "fim", "tokens"):
            raise ConfigError(
                f"tokenize.format={self.format!r} is unknown", fix="use auto, chat, fim, tokens"
            )
        if self.max_length < 8:
            raise ConfigError(
                f"tokenize.max_length={self.max_length} is too small", fix="use 2048 (default)"
            )
        if self.fim_order not in ("psm", "spm"):
            raise ConfigError(f"tokenize.fim_order={self.fim_order!r}", fix="use psm or spm")
        if not 0.0 <= self.fim_rate <= 1.0:
            raise ConfigError(
                f"tokenize.fim_rate={self.fim_rate} is not in [0, 1]",
                fix="1.0 = all FIM (default), 0.5 = half FIM, half left-to-right",
            )
        if self.fim_tokens is not None:
            object.__setattr__(self, "fim_tokens", tuple(self.fim_tokens))
            if len(self.fim_tokens) != 4:
                raise ConfigError(
                    f"tokenize.fim_tokens={self.fim_tokens} needs 4 strings",
                    fix="give (prefix, suffix, middle, end) token strings",
                )
        if self.loss_on not in ("answer", "all"):
            raise ConfigError(f"tokenize.loss_on={self.loss_on!r}", fix="use answer or all")
        if self.chat_mask not in ("auto", "offsets", "generation"):
            raise ConfigError(
                f"tokenize.chat_mask={self.chat_mask!r}", fix="use auto, offsets or generation"
            )
        if self.shard_size < 1:
            raise ConfigError(f"tokenize.shard_size={self.shard_size} must be >= 1", fix="10000")


# ---- tokenizer -----------------------------------------------------------------------------


def load_tokenizer(ref: str) -> Any:
    """The target's tokenizer (eagle_core.models.load_tokenizer), refused unless fast:
    offsets and batch speed need the Rust tokenizer."""
    from eagle_core.models import load_tokenizer as load_any_tokenizer

    tok = load_any_tokenizer(ref)
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"tokenizer {ref!r} is not a fast (Rust) tokenizer",
            fix="use a tokenizer with tokenizer.json: offsets and batch speed need it",
        )
    return tok


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of the tokenizer (vocab, merges, normalizers, specials, chat template)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    tmpl = getattr(tokenizer, "chat_template", None)
    h.update(repr(sorted(tmpl.items()) if isinstance(tmpl, dict) else tmpl).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:20]


# ---- per-chunk work ------------------------------------------------------------------------


@dataclass
class ChunkStats:
    """Counts of one chunk; summed over chunks into the manifest."""

    rows: int = 0
    tokens: int = 0
    masked_tokens: int = 0
    truncated: int = 0
    turns_without_eot: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    fim_layout: dict[str, int] = field(default_factory=dict)
    length_hist: dict[str, int] = field(default_factory=dict)
    rejects: RejectCounter = field(default_factory=RejectCounter)

    def add(self, other: ChunkStats) -> None:
        self.rows += other.rows
        self.tokens += other.tokens
        self.masked_tokens += other.masked_tokens
        self.truncated += other.truncated
        self.turns_without_eot += other.turns_without_eot
        for mine, theirs in (
            (self.by_kind, other.by_kind),
            (self.fim_layout, other.fim_layout),
            (self.length_hist, other.length_hist),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.rejects.merge(other.rejects)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "masked_tokens": self.masked_tokens,
            "truncated": self.truncated,
            "turns_without_eot": self.turns_without_eot,
            "by_kind": self.by_kind,
            "fim_layout": self.fim_layout,
            "length_hist": self.length_hist,
            "rejected_by_reason": self.rejects.counts,
            "reject_examples": self.rejects.examples,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkStats:
        s = cls(
            rows=d["rows"],
            tokens=d["tokens"],
            masked_tokens=d["masked_tokens"],
            truncated=d["truncated"],
            turns_without_eot=d.get("turns_without_eot", 0),
            by_kind=d["by_kind"],
            fim_layout=d["fim_layout"],
            length_hist=d["length_hist"],
        )
        s.rejects.counts, s.rejects.examples = (
            dict(d["rejected_by_reason"]),
            dict(d["reject_examples"]),
        )
        return s


def length_bin(n: int) -> str:
    """Power-of-two histogram bin label: '<=64', '<=128', ..."""
    return f"<={1 << max(4, math.ceil(math.log2(max(n, 1))))}"


def truncate_fim_pieces(
    prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int], max_length: int
) -> tuple[Sequence[int], Sequence[int], Sequence[int], bool]:
    """Shorten prefix (keep its end) and suffix (keep its start) so the sample fits.

    A FIM sample has 4 special tokens besides the pieces. If the middle alone does not fit,
    the pieces are returned unchanged and the caller truncates the sequence on the right.
    """
    budget = max_length - 4 - len(middle)
    if len(prefix) + len(suffix) <= budget:
        return prefix, middle, suffix, False
    if budget < 0:
        return prefix, middle, suffix, True
    half = budget // 2
    if len(prefix) < half:
        keep_p, keep_s = len(prefix), budget - len(prefix)
    elif len(suffix) < budget - half:
        keep_p, keep_s = budget - len(suffix), len(suffix)
    else:
        keep_p, keep_s = half, budget - half
    return prefix[len(prefix) - keep_p :], middle, suffix[:keep_s], True


@dataclass
class LoadedTokenizer:
    """A tokenizer plus what the config derives from it (shared by every chunk)."""

    tok: Any
    cfg: TokenizeConfig
    template: str | None = None
    mask_mode: Literal["offsets", "generation"] = "offsets"
    fim: FimTokens | None = None
    fim_error: ConfigError | None = None

    @classmethod
    def load(cls, cfg: TokenizeConfig, tok: Any | None = None) -> LoadedTokenizer:
        tok = tok if tok is not None else load_tokenizer(cfg.tokenizer)
        t = cls(tok=tok, cfg=cfg)
        if cfg.format in ("auto", "chat"):
            try:
                t.template = resolve_chat_template(tok, cfg.chat_template)
                t.mask_mode = choose_mask_mode(t.template, cfg.chat_mask)
            except ConfigError:
                if cfg.format == "chat":
                    raise
        if cfg.format in ("auto", "fim"):
            try:
                t.fim = discover_fim_tokens(tok, cfg.fim_tokens)
            except ConfigError as exc:
                if cfg.format == "fim":
                    raise
                t.fim_error = exc  # raised only if a FIM record shows up
        return t


def tokenize_chunk(t: LoadedTokenizer, rows: list[dict[str, Any]]) -> tuple[pa.Table, ChunkStats]:
    """Tokenize a chunk of records -> (TOKENS_SCHEMA table, stats).

    Token data stays in numpy arrays from the Rust tokenizer to the Arrow table (one flat
    ids buffer + offsets per column; no Python list per token).
    """
    cfg, stats = t.cfg, ChunkStats()
    out: dict[int, tuple[Any, Any, bool]] = {}  # row -> ids [T], mask [T], fim-trimmed
    chats: list[int] = []
    fims: list[int] = []
    for i, r in enumerate(rows):
        kind = r["kind"]
        if cfg.format != "auto" and kind != cfg.format:
            stats.rejects.add(
                TokReason.KIND_MISMATCH, r["sample_id"], f"{kind} record, format={cfg.format}"
            )
        elif kind == "chat":
            chats.append(i)
        elif kind == "fim":
            fims.append(i)
        elif kind == "tokens":
            ids, mask = r["input_ids"], r["loss_mask"]
            if max(ids) >= len(t.tok):
                stats.rejects.add(
                    TokReason.TOKEN_OUT_OF_VOCAB, r["sample_id"], f"id {max(ids)} >= {len(t.tok)}"
                )
                continue
            out[i] = (np.asarray(ids, np.int32), np.asarray(mask, np.int8), False)
    if chats:
        if t.template is None:
            resolve_chat_template(t.tok, cfg.chat_template)  # raises the ConfigError
        batch = tokenize_chat_batch(
            t.tok,
            [parse_messages(rows[i]["messages_json"]) for i in chats],
            template=t.template or "",
            mask_mode=t.mask_mode,
            last_turn_only=cfg.last_turn_only,
            keep_reasoning=cfg.keep_reasoning,
        )
        for n, rej in batch.rejects:
            stats.rejects.add(rej.reason, rows[chats[n]]["sample_id"], rej.detail)
        for k, n in enumerate(batch.index):
            stats.turns_without_eot += batch.turns_without_eot[k]
            ids, mask = batch.sample(k)
            out[chats[n]] = (ids, mask, False)
    if fims:
        if t.fim is None:
            raise t.fim_error or ConfigError("no FIM tokens", fix="pass fim_tokens")
        _tokenize_fim(t, rows, fims, out, stats)
    ids_parts, mask_parts, sid_col, src_col = [], [], [], []
    for i in sorted(out):
        ids, mask, trimmed = out[i]
        truncated = trimmed or len(ids) > cfg.max_length
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
        if cfg.loss_on == "all":
            mask = np.ones_like(mask)
            mask[:1] = 0  # nothing predicts the first token
        n_loss = int(np.count_nonzero(mask))
        if not n_loss:
            stats.rejects.add(
                TokReason.NO_LOSS_TOKENS,
                rows[i]["sample_id"],
                "truncated away" if truncated else "no masked token",
            )
            continue
        stats.truncated += truncated
        stats.rows += 1
        stats.tokens += len(ids)
        stats.masked_tokens += n_loss
        kind = rows[i]["kind"]
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
        b = length_bin(len(ids))
        stats.length_hist[b] = stats.length_hist.get(b, 0) + 1
        ids_parts.append(ids)
        mask_parts.append(mask)
        sid_col.append(rows[i]["sample_id"])
        src_col.append(rows[i]["source"])
    table = pa.Table.from_arrays(
        [
            pa.array(sid_col, pa.string()),
            pa.array(src_col, pa.string()),
            list_array(ids_parts, np.int32),
            list_array(mask_parts, np.int8),
        ],
        schema=TOKENS_SCHEMA,
    )
    return table, stats


def list_array(parts: list[np.ndarray], dtype: type[np.generic]) -> pa.ListArray:
    """A list<dtype> Arrow array from per-row 1-D arrays: one flat buffer + int32 offsets."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    if parts:
        np.cumsum([len(p) for p in parts], out=offsets[1:])
    flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _tokenize_fim(
    t: LoadedTokenizer,
    rows: list[dict[str, Any]],
    idx: list[int],
    out: dict[int, tuple[Any, Any, bool]],
    stats: ChunkStats,
) -> None:
    """FIM / plain samples for rows `idx`; every piece encoded in one batched call, samples
    assembled from numpy slices (the masks are ranges: middle + <end>, or everything)."""
    cfg, fim = t.cfg, t.fim
    assert fim is not None
    is_fim = [
        record_rng(cfg.seed, rows[i]["sample_id"], "fim_rate").random() < cfg.fim_rate for i in idx
    ]
    texts: list[str] = []
    for i, f in zip(idx, is_fim, strict=True):
        r = rows[i]
        if f:
            texts += [r["prefix"], r["middle"], r["suffix"]]
        else:
            texts.append(r["prefix"] + r["middle"] + r["suffix"])
    flat, bounds = flatten_ids(encode_batch(t.tok, texts)[0] if texts else [])
    k = 0
    for i, f in zip(idx, is_fim, strict=True):
        if f:
            p, m, s = (flat[bounds[j] : bounds[j + 1]] for j in (k, k + 1, k + 2))
            k += 3
            p, m, s, trimmed = truncate_fim_pieces(p, m, s, cfg.max_length)
            ids, n_head = fim_ids(fim, p, m, s, cfg.fim_order)
            mask = np.zeros(len(ids), dtype=np.int8)
            mask[n_head:] = 1
            layout = cfg.fim_order
        else:
            ids = np.append(flat[bounds[k] : bounds[k + 1]], np.int32(fim.end_id))
            mask, trimmed, layout = np.ones(len(ids), dtype=np.int8), False, "plain"
            k += 1
        stats.fim_layout[layout] = stats.fim_layout.get(layout, 0) + 1
        out[i] = (ids, mask, trimmed)


# worker-process state for num_proc > 1 (loaded once per worker)
_WORKER: LoadedTokenizer | None = None


def _init_worker(cfg: TokenizeConfig) -> None:
    global _WORKER
    _WORKER = LoadedTokenizer.load(cfg)


def _mp_context() -> Any:
    """fork when this process has a single thread (workers start in milliseconds, like
    `datasets.map`; the Rust tokenizer disables its own pool in forked children); otherwise
    (e.g. inside a Prefect worker thread) forkserver or spawn, since forking a
    multi-threaded process can copy a lock held by another thread and deadlock."""
    import threading

    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        # a single-threaded server process imports the heavy modules once, workers fork
        # from it
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["eagle_core.tokenize", "transformers"])
        return ctx
    return multiprocessing.get_context("spawn")


def _work(rows: list[dict[str, Any]]) -> tuple[pa.Table, ChunkStats]:
    assert _WORKER is not None
    return tokenize_chunk(_WORKER, rows)


# ---- the stage -----------------------------------------------------------------------------


def iter_chunks(
    store: ArtifactStore, records: StageRef, size: int
) -> Iterator[list[dict[str, Any]]]:
    """Records in input order, in lists of `size` rows."""
    buf: list[dict[str, Any]] = []
    for batch in iter_batches(store, records, columns=_RECORD_COLS, batch_size=1024):
        buf.extend(batch.to_pylist())
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if buf:
        yield buf


def tokenize(
    store: ArtifactStore,
    records: StageRef,
    cfg: TokenizeConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    num_proc: int = 1,
    footer_counts: bool = True,
) -> StageRef:
    """Tokenize a download artifact (cached by key: config + records + tokenizer hash).

    Args:
        store: the artifact store.
        records: a `download` artifact.
        cfg: see TokenizeConfig.
        force: recompute even if the artifact exists.
        progress: called as progress(input_rows_done, input_rows_total).
        num_proc: worker processes (each loads the tokenizer); not part of the key.
        footer_counts: store each shard's masked-token histogram in its footer (False: the
            shards as earlier versions wrote them, which scan_vocab scans; for measuring what
            the histograms cost). Not part of the key: the rows are the same, so a cached
            artifact written without histograms is reused as it is (scanned, not re-written).

    Raises:
        ConfigError: tokenizer without a chat template / FIM tokens that the data needs.
        DataError: no sample left.
    """
    base = LoadedTokenizer.load(cfg)
    thash = tokenizer_hash(base.tok)
    key = store.key(STAGE, cfg, inputs=[records, f"tokenizer:{thash}"], code=CODE_VERSION)
    if store.is_done(STAGE, key) and not force:
        log.info("tokenize %s: cached", key)
        return store.ref(STAGE, key)
    by_kind = records.counts.get("by_kind") or {}
    if cfg.format == "auto" and by_kind.get("fim") and base.fim is None:
        raise base.fim_error or ConfigError("no FIM tokens", fix="pass fim_tokens")
    if cfg.format == "auto" and by_kind.get("chat") and base.template is None:
        resolve_chat_template(base.tok, cfg.chat_template)  # raises the ConfigError
    total_rows = int(records.counts.get("rows") or 0)
    log.info("tokenize %s: %s rows of %s with %s", key, total_rows, records.url, cfg.tokenizer)
    totals = ChunkStats()
    done_rows = 0
    with store.publish(STAGE, key, params=cfg, inputs=[records], force=force) as w:
        pool = None
        if num_proc > 1:
            pool = ProcessPoolExecutor(
                num_proc,
                mp_context=_mp_context(),
                initializer=_init_worker,
                initargs=(cfg,),
            )
        try:
            pending: list[tuple[int, int, Any]] = []
            for n, chunk in enumerate(iter_chunks(store, records, cfg.shard_size)):
                name, stats_name = f"shard-{n:05d}.parquet", f"stats/shard-{n:05d}.json"
                if w.has(name) and w.has(stats_name):
                    totals.add(ChunkStats.from_json(_read_partial_json(store, w, stats_name)))
                    done_rows += len(chunk)
                    continue
                fut = pool.submit(_work, chunk) if pool else None
                pending.append((n, len(chunk), fut if fut else tokenize_chunk(base, chunk)))
                if len(pending) >= max(1, num_proc) * 2 or not pool:
                    done_rows += _drain(
                        w, pending, totals, keep=num_proc if pool else 0, footer=footer_counts
                    )
                    if progress:
                        progress(done_rows, total_rows)
            done_rows += _drain(w, pending, totals, keep=0, footer=footer_counts)
            if progress:
                progress(done_rows, total_rows)
        finally:
            if pool:
                pool.shutdown()
        if totals.rows == 0:
            raise DataError(
                f"tokenize: no sample left from {records.url} (rejected: {totals.rejects.counts})",
                fix="check format= against the record kinds, the chat template and max_length",
            )
        w.counts.update(
            rows=totals.rows,
            rejected=totals.rejects.total,
            rejected_by_reason=totals.rejects.counts,
            tokens=totals.tokens,
            masked_tokens=totals.masked_tokens,
            truncated=totals.truncated,
            by_kind=totals.by_kind,
        )
        w.meta.update(
            tokenizer=cfg.tokenizer,
            tokenizer_hash=thash,
            # the key already follows the tokenizer's content (tokenizer_hash: vocab, merges,
            # template, specials), never the target's weights: a weights-only update of the
            # target keeps every tokenize key
            fingerprints={
                "tokenizer": {"kind": "tokenizer", "ref": cfg.tokenizer, "digest": thash}
            },
            vocab_size=len(base.tok),
            format=cfg.format,
            max_length=cfg.max_length,
            chat_mask=base.mask_mode if base.template else None,
            fim_tokens=[base.fim.prefix, base.fim.suffix, base.fim.middle, base.fim.end]
            if base.fim
            else None,
            fim_family=base.fim.family if base.fim else None,
            fim_layout=totals.fim_layout,
            chat_turns_without_eot=totals.turns_without_eot,
            length_hist=dict(sorted(totals.length_hist.items(), key=lambda kv: int(kv[0][2:]))),
            reject_examples=totals.rejects.examples,
        )
    if totals.turns_without_eot:
        log.warning(
            "tokenize %s: %d answers have no special end-of-turn token after them (the "
            "template ends turns with plain text?): the draft will not learn to stop there",
            key,
            totals.turns_without_eot,
        )
    if totals.rejects.total:
        log.warning(
            "tokenize %s: %d rejected: %s", key, totals.rejects.total, totals.rejects.counts
        )
    log.info(
        "tokenize %s: %d samples, %d tokens (%d masked), %d truncated",
        key,
        totals.rows,
        totals.tokens,
        totals.masked_tokens,
        totals.truncated,
    )
    return store.ref(STAGE, key)


def _drain(
    w: Any, pending: list[tuple[int, int, Any]], totals: ChunkStats, keep: int, footer: bool
) -> int:
    """Write finished chunks in order until `keep` remain; returns input rows written.

    With `footer`, the shard's masked-token histogram goes into its Parquet footer: the
    same (journaled) file write as the rows, so a shard never exists without it.
    """
    done = 0
    while len(pending) > keep:
        n, n_rows, res = pending.pop(0)
        table, stats = res.result() if hasattr(res, "result") else res
        meta = masked_counts_footer(table) if footer else None
        write_parquet(w, f"shard-{n:05d}.parquet", table, file_metadata=meta)
        w.write_bytes(
            f"stats/shard-{n:05d}.json", json.dumps(stats.to_json()).encode(), journal=True
        )
        totals.add(stats)
        done += n_rows
    return done


def _read_partial_json(store: ArtifactStore, w: Any, name: str) -> dict[str, Any]:
    return json.loads(store._read_bytes(store.path(w.stage, w.key, name)))


def samples(store: ArtifactStore, ref: StageRef) -> Iterator[dict[str, Any]]:
    """Every tokenized sample of a tokenize artifact (tests, debugging)."""
    for batch in iter_batches(store, ref):
        yield from batch.to_pylist()


def config_from_options(tokenizer: str, **options: Any) -> TokenizeConfig:
    """A TokenizeConfig from command-line style options (None values use the defaults)."""
    opts = {k: v for k, v in options.items() if v is not None}
    if isinstance(opts.get("fim_tokens"), str):
        opts["fim_tokens"] = tuple(opts["fim_tokens"].split(","))
    return TokenizeConfig(tokenizer=tokenizer, **opts)


__all__: Sequence[str] = ["TokenizeConfig", "config_from_options", "tokenize", "samples"]
