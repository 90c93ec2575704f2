"""The extract_hidden stage: run the target over tokenized shards, store its hidden states.

Notation: B samples per forward, T tokens, H target hidden size, A captured layers.

Output (`<root>/extract_hidden/<key>/`), one row per sample:

    sample_id    str
    input_ids    list<int32>   [T]
    loss_mask    list<int8>    [T]
    aux_hidden   tensor [T, A*H] (outputs of decoder layers `aux_layer_ids`, concatenated in
                 layer-id order; see eagle_core/capture.py for the id convention)
    last_hidden  tensor [T, H]   (final-normed last hidden state: the lm_head's input)

Tensor cells are raw little-endian bytes (bf16 as its 16-bit words: bit-exact, 2 bytes per
value, so 8·H bytes per token at A=3); dtype and inner shapes are in the Parquet schema
metadata `eagle.tensors` (storage/shards.py). No logits are stored: the loss recomputes the
target distribution from `last_hidden` and the target's lm_head (draft-vocab rows only).
`format="pt"` writes the same columns as `torch.save`d dicts (`shard-00000.pt`).

manifest.meta: `target`, `target_config_hash`, `aux_layer_ids`, `hidden_size`,
`target_num_layers`, `dtype`, `format`. `check_compatible` refuses shards of another target.

Shards: samples are sorted by length (long first; stable) and cut into shards of at most
`shard_size` samples and `shard_max_tokens` tokens; inside a shard, forwards take at most
`batch_size` samples and `max_tokens` padded tokens. Shard i therefore always holds the same
samples, and a crashed run resumes shard by shard (journaled shards are not recomputed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from eagle_core.capture import (
    capture_states,
    default_aux_layer_ids,
    find_decoder_layers,
    validate_layer_ids,
)
from eagle_core.errors import ConfigError, DataError, ModelMismatchError
from eagle_core.models import config_hash, load_target
from storage import ArtifactStore, StageRef
from storage.errors import ArtifactError
from storage.fingerprint import model_fingerprint
from storage.shards import (
    batch_tensors,
    build_table,
    iter_batches,
    read_pt,
    write_parquet,
    write_pt,
)

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "extract_hidden"
_STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
    ]
)


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """How extract_hidden runs the target and stores its states."""

    target: str  # local dir, Hub name or demo-target artifact URL
    aux_layer_ids: tuple[int, ...] | None = None  # None: (1, N//2-1, N-4), decoder-layer outputs
    batch_size: int = 8  # samples per forward
    max_tokens: int = 16384  # padded tokens per forward (B * T_max): bounds activation memory
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # storage dtype; bf16 = 8H B/tok
    model_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    format: Literal["parquet", "pt"] = "parquet"  # parquet streams; training reads parquet
    shard_size: int = 256  # samples per shard at most
    shard_max_tokens: int = 32768  # tokens per shard at most (1 GiB of bf16 states at H=4096)

    def __post_init__(self) -> None:
        if not self.target or not str(self.target).strip():
            raise ConfigError(
                "extract.target is empty",
                fix="pass a model dir, Hub name or demo-target artifact URL",
            )
        for name in ("batch_size", "max_tokens", "shard_size", "shard_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(
                    f"extract.{name}={getattr(self, name)} must be >= 1",
                    fix=f"use the default {getattr(ExtractConfig, name, '')}",
                )
        choices = {
            "dtype": _STORAGE_DTYPES,
            "model_dtype": ("auto", *_STORAGE_DTYPES),
            "device": ("auto", "cpu", "cuda"),
            "format": ("parquet", "pt"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"extract.{name}={getattr(self, name)!r} is not one of {sorted(allowed)}",
                    fix=f"use one of {sorted(allowed)}",
                )
        if self.aux_layer_ids is not None:
            object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))


def extract_key(store: ArtifactStore, tokens: StageRef, cfg: ExtractConfig) -> str:
    """The stage key: config, tokens artifact, code, and the target's fingerprint (its
    weights, configs and tokenizer files as they are now: a target updated in place at the
    same path gets a new key)."""
    fingerprints = {"target": model_fingerprint(cfg.target)}
    return store.key(STAGE, cfg, inputs=[tokens], code=CODE_VERSION, fingerprints=fingerprints)


@dataclass
class _TokenSample:
    sample_id: str
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] int8


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "extract.device='cuda' but no CUDA device is visible", fix="use device='auto' or 'cpu'"
        )
    return device


def _read_token_samples(
    store: ArtifactStore, tokens: StageRef
) -> tuple[list[_TokenSample], dict[str, int]]:
    """All samples of a tokenize artifact (ids and masks only); rejects counted by reason."""
    samples: list[_TokenSample] = []
    rejected: dict[str, int] = {}
    cols = ["sample_id", "input_ids", "loss_mask"]
    for batch in iter_batches(store, tokens, columns=cols):
        ids_col = batch.column("input_ids").to_pylist()
        mask_col = batch.column("loss_mask").to_pylist()
        for sid, ids, mask in zip(
            batch.column("sample_id").to_pylist(), ids_col, mask_col, strict=True
        ):
            if not ids:
                rejected["empty"] = rejected.get("empty", 0) + 1
                continue
            if mask is None or len(mask) != len(ids):
                rejected["loss_mask_length"] = rejected.get("loss_mask_length", 0) + 1
                log.warning("sample %r: loss_mask length differs from input_ids; rejected", sid)
                continue
            samples.append(
                _TokenSample(sid, np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8))
            )
    return samples, rejected


def plan_shards(lengths: list[int], shard_size: int, shard_max_tokens: int) -> list[list[int]]:
    """Sample indices per shard: sorted by length (long first, stable), then cut greedily."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shards: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in order:
        if cur and (len(cur) >= shard_size or tokens + lengths[i] > shard_max_tokens):
            shards.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += lengths[i]
    if cur:
        shards.append(cur)
    return shards


def plan_batches(lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Consecutive positions grouped so that B <= batch_size and B * max(T) <= max_tokens."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * new_longest > max_tokens):
            batches.append(cur)
            cur, new_longest = [], n
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


def _shard_name(i: int, fmt: str) -> str:
    return f"shard-{i:05d}.{'parquet' if fmt == 'parquet' else 'pt'}"


@torch.no_grad()
def _run_shard(
    model: torch.nn.Module,
    samples: list[_TokenSample],
    layer_ids: tuple[int, ...],
    cfg: ExtractConfig,
    device: str,
) -> tuple[list[Tensor], list[Tensor]]:
    """Hidden states of the samples of one shard: aux [T_i, A*H], last [T_i, H] per sample."""
    store_dtype = _STORAGE_DTYPES[cfg.dtype]
    aux_rows: list[Tensor] = []
    last_rows: list[Tensor] = []
    lengths = [len(s.input_ids) for s in samples]
    for idx in plan_batches(lengths, cfg.batch_size, cfg.max_tokens):
        t_max = max(lengths[i] for i in idx)
        ids = torch.zeros(len(idx), t_max, dtype=torch.long)
        att = torch.zeros(len(idx), t_max, dtype=torch.long)
        for row, i in enumerate(idx):  # right padding: causal attention keeps rows exact
            n = lengths[i]
            ids[row, :n] = torch.from_numpy(samples[i].input_ids.astype(np.int64))
            att[row, :n] = 1
        states = capture_states(model, ids.to(device), att.to(device), layer_ids)
        aux = states.aux.to(store_dtype).cpu()  # [B, T, A*H]
        last = states.last.to(store_dtype).cpu()  # [B, T, H]
        for row, i in enumerate(idx):
            n = lengths[i]
            aux_rows.append(aux[row, :n].clone())
            last_rows.append(last[row, :n].clone())
    return aux_rows, last_rows


def extract_hidden(
    store: ArtifactStore,
    tokens: StageRef,
    cfg: ExtractConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> StageRef:
    """Run the target over the tokenized samples; write hidden-state shards.

    Args:
        store: artifact store.
        tokens: a tokenize artifact (`sample_id`, `input_ids`, `loss_mask`).
        cfg: target, layer ids, batching, dtype, device, format.
        force: recompute even when the artifact exists (journaled shards are dropped too).
        progress: called with (shards done, shards total).

    Returns:
        The extract_hidden artifact's StageRef (counts: samples, tokens, shards, rejected).

    Raises:
        ModelMismatchError: token ids outside the target's vocab (another tokenizer).
        DataError: no usable sample.
    """
    key = extract_key(store, tokens, cfg)
    if store.is_done(STAGE, key) and not force:
        log.info("extract_hidden %s: cached", key)
        return store.ref(STAGE, key)
    device = resolve_device(cfg.device)
    model_dtype = cfg.model_dtype
    if model_dtype == "auto":
        model_dtype = "bfloat16" if device == "cuda" else "float32"
    log.info("extract_hidden %s: target %s on %s (%s)", key, cfg.target, device, model_dtype)
    model = load_target(cfg.target, dtype=model_dtype, device=device)  # type: ignore[arg-type]
    n_layers = len(find_decoder_layers(model))
    layer_ids = validate_layer_ids(
        cfg.aux_layer_ids if cfg.aux_layer_ids is not None else default_aux_layer_ids(n_layers),
        n_layers,
    )
    tconf = (
        model.config.get_text_config()
        if hasattr(model.config, "get_text_config")
        else (model.config)
    )
    hidden_size, vocab = int(tconf.hidden_size), int(tconf.vocab_size)
    max_pos = int(getattr(tconf, "max_position_embeddings", 0) or 0)

    samples, rejected = _read_token_samples(store, tokens)
    kept: list[_TokenSample] = []
    for s in samples:
        if max_pos and len(s.input_ids) > max_pos:
            rejected["longer_than_max_position_embeddings"] = (
                rejected.get("longer_than_max_position_embeddings", 0) + 1
            )
            continue
        bad = int(s.input_ids.max()) if len(s.input_ids) else 0
        if bad >= vocab or int(s.input_ids.min()) < 0:
            raise ModelMismatchError(
                f"sample {s.sample_id!r} of {tokens.url} has token id {bad} outside the "
                f"target's vocab [0, {vocab})",
                fix="tokenize with the target's own tokenizer",
            )
        kept.append(s)
    if rejected:
        log.warning("extract_hidden %s: rejected %s", key, rejected)
    if not kept:
        raise DataError(
            f"no usable samples in {tokens.url} (rejected: {rejected})",
            fix="check the tokenize stage's output and max length",
        )
    shards = plan_shards([len(s.input_ids) for s in kept], cfg.shard_size, cfg.shard_max_tokens)
    meta = {
        "target": cfg.target,
        "target_config_hash": config_hash(model),
        "aux_layer_ids": list(layer_ids),
        "hidden_size": hidden_size,
        "target_num_layers": n_layers,
        "dtype": cfg.dtype,
        "format": cfg.format,
    }
    with store.publish(STAGE, key, params=cfg, inputs=[tokens], force=force) as w:
        for i, idx in enumerate(shards):
            name = _shard_name(i, cfg.format)
            if w.has(name):
                log.debug("extract_hidden %s: %s done by an earlier attempt", key, name)
            else:
                part = [kept[j] for j in idx]
                aux, last = _run_shard(model, part, layer_ids, cfg, device)
                _write_shard(w, name, part, aux, last, meta, cfg.format)
                log.debug("extract_hidden %s: wrote %s (%d samples)", key, name, len(part))
            if progress is not None:
                progress(i + 1, len(shards))
        w.meta.update(meta)
        w.counts.update(
            samples=len(kept),
            tokens=int(sum(len(s.input_ids) for s in kept)),
            shards=len(shards),
            rejected=int(sum(rejected.values())),
            rejected_reasons=dict(rejected),
        )
    ref = store.ref(STAGE, key)
    log.info("extract_hidden %s: done, %s", key, ref.counts)
    return ref


def _write_shard(
    w: Any,
    name: str,
    samples: list[_TokenSample],
    aux: list[Tensor],
    last: list[Tensor],
    meta: dict[str, Any],
    fmt: str,
) -> None:
    if fmt == "pt":
        write_pt(
            w,
            name,
            {
                "sample_id": [s.sample_id for s in samples],
                "input_ids": [torch.from_numpy(s.input_ids.copy()) for s in samples],
                "loss_mask": [torch.from_numpy(s.loss_mask.copy()) for s in samples],
                "aux_hidden": aux,
                "last_hidden": last,
                "meta": dict(meta),
            },
        )
        return
    table = build_table(
        {
            "sample_id": [s.sample_id for s in samples],
            "input_ids": pa.array([s.input_ids for s in samples], type=pa.list_(pa.int32())),
            "loss_mask": pa.array([s.loss_mask for s in samples], type=pa.list_(pa.int8())),
        },
        tensors={"aux_hidden": aux, "last_hidden": last},
        metadata=meta,
        schema=SHARD_SCHEMA,
    )
    write_parquet(w, name, table)


def iter_hidden_samples(store: ArtifactStore, ref: StageRef) -> Iterator[dict[str, Any]]:
    """Every sample of an extract_hidden artifact, in shard order.

    Yields:
        dicts with `sample_id` (str), `input_ids` [T] int64, `loss_mask` [T] int64,
        `aux_hidden` [T, A*H] and `last_hidden` [T, H] (stored dtype, bit-exact).
    """
    meta = store.manifest(ref.stage, ref.key).meta
    if meta.get("format", "parquet") == "pt":
        for name in store.list_files(ref, suffix=".pt"):
            d = read_pt(store, ref, name)
            for i, sid in enumerate(d["sample_id"]):
                yield _sample(
                    ref,
                    name,
                    sid,
                    d["input_ids"][i],
                    d["loss_mask"][i],
                    d["aux_hidden"][i],
                    d["last_hidden"][i],
                )
        return
    names = store.list_files(ref, suffix=".parquet")
    for batch in iter_batches(store, ref, names=names):
        aux, last = batch_tensors(batch, "aux_hidden"), batch_tensors(batch, "last_hidden")
        ids = batch.column("input_ids").to_pylist()
        masks = batch.column("loss_mask").to_pylist()
        for i, sid in enumerate(batch.column("sample_id").to_pylist()):
            yield _sample(
                ref,
                "parquet shards",
                sid,
                torch.tensor(ids[i]),
                torch.tensor(masks[i]),
                aux[i],
                last[i],
            )


def _sample(
    ref: StageRef, where: str, sid: str, ids: Tensor, mask: Tensor, aux: Tensor, last: Tensor
) -> dict[str, Any]:
    n = ids.numel()
    if mask.numel() != n or aux.shape[0] != n or last.shape[0] != n:
        raise ArtifactError(
            f"sample {sid!r} in {ref.url} ({where}): {n} tokens, {mask.numel()} mask values, "
            f"{aux.shape[0]}/{last.shape[0]} hidden rows",
            fix="the shard is inconsistent: re-run extract_hidden with force",
        )
    return {
        "sample_id": sid,
        "input_ids": ids.long(),
        "loss_mask": mask.long(),
        "aux_hidden": aux,
        "last_hidden": last,
    }


def check_compatible(
    meta: dict[str, Any], target_config: Any, aux_layer_ids: tuple[int, ...] | list[int]
) -> None:
    """Refuse hidden shards made for another target or other layers.

    Args:
        meta: the extract_hidden manifest's meta.
        target_config: the target's config (or model) the shards are to be used with.
        aux_layer_ids: the draft's aux layer ids.

    Raises:
        ModelMismatchError: config hash, hidden size or layer ids differ.
    """
    want = config_hash(target_config)
    got = meta.get("target_config_hash")
    if got != want:
        raise ModelMismatchError(
            f"hidden shards were extracted from target {meta.get('target')!r} "
            f"(config hash {got}); this target's config hash is {want}",
            fix="re-run extract_hidden for this target, or train against the shards' target",
        )
    if list(meta.get("aux_layer_ids", [])) != [int(i) for i in aux_layer_ids]:
        raise ModelMismatchError(
            f"hidden shards hold layers {meta.get('aux_layer_ids')}, the draft reads "
            f"{list(aux_layer_ids)}",
            fix="set the draft's aux_layer_ids to the shards' ids, or re-run extract_hidden",
        )
    cfg = getattr(target_config, "config", target_config)
    h = getattr(cfg, "hidden_size", None)
    if h is not None and meta.get("hidden_size") != int(h):
        raise ModelMismatchError(
            f"hidden shards have H={meta.get('hidden_size')}, the target has H={h}",
            fix="re-run extract_hidden for this target",
        )
