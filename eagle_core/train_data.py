"""Training data: sample index over Parquet shards, length-grouped epoch plans, collation.

Notation: B micro batch, T tokens (padded to the longest sample of the micro batch), H hidden,
A captured target layers, W world size (data-parallel ranks), G gradient accumulation steps.

Two sources, one code path:
- offline: hidden-state shards of `extract_hidden` (columns `sample_id`, `input_ids`,
  `loss_mask`, tensor columns `aux_hidden` [T, A*H] bf16 and `last_hidden` [T, H] bf16);
- online: token shards of `tokenize` (`sample_id`, `input_ids`, `loss_mask`); the target runs
  inside the training step (eagle_core/train.py).

Order of samples (`plan_epoch`), the same for every world size:
1. the row groups of all shards ("blocks") are permuted, and the samples inside each block,
   with a generator seeded by (seed, epoch): reading stays block-local, yet the order changes
   every epoch;
2. the sample sequence is cut into windows of `group_steps` optimizer steps; inside a window
   samples are shuffled, then sorted by length (long first) and cut into micro batches: every
   micro batch holds samples of similar length, so little compute goes to padding;
3. the steps of a window are shuffled, so lengths do not decrease steadily through training;
4. the sequence is padded to whole optimizer steps by repeating its first samples (as
   torch's DistributedSampler does): no sample is dropped and every rank runs the same
   number of steps.

The plan is a flat list of micro batches. Optimizer step s consumes micro batches
[s*W*G, (s+1)*W*G); rank r at accumulation step a reads micro batch s*W*G + a*W + r. So a run on
W ranks with G accumulation steps sees exactly the samples of a run on 1 rank with W*G
accumulation steps, step by step; the data position of a checkpoint is (epoch, micro batches
consumed in that epoch) and does not depend on W.

Token budget (`max_tokens`, TrainConfig.max_tokens): instead of a fixed micro batch of
`micro_batch_size` samples, step 2 cuts each window's length-sorted samples greedily
(`cut_micro_batches`): a micro batch takes the next sample while it holds fewer than
`micro_batch_size` samples and (samples + 1) x longest <= max_tokens; a sample longer than
the budget is a micro batch of its own (`count_over_budget`). A window is
micro_batch_size x W x G x group_steps samples; its micro batches form optimizer steps of
W x G micro batches, which are shuffled as in step 3 (a step's micro batches are of similar
length, so ranks finish a step at about the same time). The micro batches left over after
the last whole step of a window (its shortest samples) go back into the next window; the
last window keeps them. Step 4 becomes: the list of micro batches is padded to whole
optimizer steps by repeating its first micro batches. What holds:
- every sample of the epoch is in exactly one micro batch, plus the padding repeats
  (fewer than W x G micro batches, all taken from the start of the plan);
- the plan depends on W and G only through W x G (window size, step size, padding): W ranks
  with G accumulation steps read exactly the micro batches of 1 rank with W x G;
- the number of micro batches, hence of optimizer steps, differs between epochs; the
  data position of a checkpoint is (epoch, micro batches consumed), as above.
Without `max_tokens` plans are exactly those of steps 1-4.

`BatchPrefetcher` reads and collates a rank's micro batches one ahead, in a background thread,
so shard reads and padding overlap the training step.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from eagle_core.errors import DataError
from storage import ArtifactStore, StageRef
from storage.shards import TensorSpec, batch_tensors, tensor_specs

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ("sample_id", "input_ids", "loss_mask")
HIDDEN_COLUMNS = ("aux_hidden", "last_hidden")
_CACHED_ROW_GROUPS = 8  # decoded row groups kept per rank (a window touches few of them)


@dataclass(frozen=True)
class SampleLocation:
    """Where one sample lives: artifact (index into the dataset's refs), shard, row group, row."""

    source: int
    shard: str
    row_group: int
    row: int


@dataclass
class Sample:
    """One training sample as read from a shard.

    Attributes:
        sample_id: stable id from the download stage.
        input_ids: [T] int64.
        loss_mask: [T] int64 (1 where the token must be predicted).
        aux_hidden: [T, A*H] bf16 (offline only).
        last_hidden: [T, H] bf16 (offline only).
    """

    sample_id: str
    input_ids: Tensor
    loss_mask: Tensor
    aux_hidden: Tensor | None = None
    last_hidden: Tensor | None = None


@dataclass
class CollatedBatch:
    """A right-padded micro batch; the train step turns it into a DraftBatch.

    Attributes:
        sample_ids: B ids (for error messages).
        input_ids: [B, T] int64, 0 on padding.
        attention_mask: [B, T] int64, 1 on real tokens.
        loss_mask: [B, T] int64, 0 on padding.
        aux_hidden: [B, T, A*H] (offline) or None.
        last_hidden: [B, T, H] (offline) or None.
    """

    sample_ids: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    aux_hidden: Tensor | None
    last_hidden: Tensor | None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def pin_memory(self) -> CollatedBatch:
        """A copy in page-locked memory: its host-to-GPU copies can run asynchronously."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            loss_mask=self.loss_mask.pin_memory(),
            aux_hidden=None if self.aux_hidden is None else self.aux_hidden.pin_memory(),
            last_hidden=None if self.last_hidden is None else self.last_hidden.pin_memory(),
        )


def is_heldout(sample_id: str, fraction: float, seed: int) -> bool:
    """Deterministic held-out membership from a hash of the id (independent of order and W)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class ShardDataset:
    """Random access to the samples of the Parquet shards of one or more artifacts.

    The index (shard, row group, row, length) is built from the `sample_id` and `input_ids`
    columns only; hidden-state columns are read per row group when a batch needs them, and the
    last few decoded row groups are cached.

    Args:
        store: the artifact store holding every ref, or None: each ref's store is taken from
            its URL (inputs may live under another root than the run's output).
        refs: tokenize (online) or extract_hidden (offline) artifacts, read in this order.
        hidden: read `aux_hidden` / `last_hidden` too (offline mode).
        heldout_fraction / seed: keep the samples `is_heldout` says are held out
            (`split="heldout"`), or the others (`split="train"`); fraction 0 keeps all.
    """

    def __init__(
        self,
        store: ArtifactStore | None,
        refs: Sequence[StageRef],
        *,
        hidden: bool,
        split: str = "all",
        heldout_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.refs, self.hidden = list(refs), hidden
        self.stores = [store or ArtifactStore.for_url(r.url)[0] for r in self.refs]
        self.columns = list(TOKEN_COLUMNS) + (list(HIDDEN_COLUMNS) if hidden else [])
        self.locations: list[SampleLocation] = []
        self.lengths: list[int] = []
        self.sample_ids: list[str] = []
        self.blocks: list[list[int]] = []  # dataset indices per row group, in shard order
        self._cache: OrderedDict[tuple[int, str, int], pa.Table] = OrderedDict()
        self._specs: dict[tuple[int, str], dict[str, TensorSpec]] = {}
        for source, ref in enumerate(self.refs):
            names = self.stores[source].list_files(ref, suffix=".parquet")
            if not names:
                raise DataError(
                    f"artifact {ref.url} has no Parquet shards",
                    fix="re-run the stage that produced it (tokenize or extract_hidden)",
                )
            for name in names:
                self._index_shard(source, name, split, heldout_fraction, seed)
        if not self.locations:
            raise DataError(
                f"no {split} samples in {[r.url for r in self.refs]} "
                f"(heldout_fraction={heldout_fraction})",
                fix="use more data or a different heldout_fraction",
            )

    def _index_shard(self, source: int, name: str, split: str, fraction: float, seed: int):
        ref = self.refs[source]
        with self.stores[source].open(ref, name) as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in self.columns if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(
                    f"shard {ref.url}/{name} lacks columns {missing} (has {pf.schema_arrow.names})",
                    fix="offline training needs extract_hidden shards, online training "
                    "tokenize shards; pass the right artifact URL",
                )
            self._specs[(source, name)] = {
                k: v for k, v in tensor_specs(pf.schema_arrow).items() if k in HIDDEN_COLUMNS
            }
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg, columns=["sample_id", "input_ids"])
                ids = table.column("sample_id").to_pylist()
                lens = pc.list_value_length(table.column("input_ids")).to_pylist()
                block: list[int] = []
                for row, (sid, n) in enumerate(zip(ids, lens, strict=True)):
                    if split != "all" and is_heldout(sid, fraction, seed) != (split == "heldout"):
                        continue
                    if not n:
                        raise DataError(
                            f"sample {sid!r} in {ref.url}/{name} has no tokens",
                            fix="the tokenize stage should have rejected it; re-run it",
                        )
                    block.append(len(self.locations))
                    self.locations.append(SampleLocation(source, name, rg, row))
                    self.lengths.append(int(n))
                    self.sample_ids.append(sid)
                if block:
                    self.blocks.append(block)

    def __len__(self) -> int:
        return len(self.locations)

    def hidden_spec(self) -> dict[str, tuple[int, ...]]:
        """Inner shapes of the hidden columns, e.g. {"aux_hidden": (3H,), "last_hidden": (H,)}."""
        first = next(iter(self._specs.values()), {})
        return {k: tuple(v.inner_shape) for k, v in first.items()}

    def _row_group(self, source: int, shard: str, rg: int) -> pa.Table:
        key = (source, shard, rg)
        table = self._cache.get(key)
        if table is None:
            with self.stores[source].open(self.refs[source], shard) as fh:
                pf = pq.ParquetFile(fh)
                table = pf.read_row_group(rg, columns=self.columns)
                # keep the tensor specs so batch_tensors can decode the cells
                table = table.replace_schema_metadata(pf.schema_arrow.metadata)
            self._cache[key] = table
            while len(self._cache) > _CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table

    def __getitem__(self, index: int) -> Sample:
        loc = self.locations[index]
        table = self._row_group(loc.source, loc.shard, loc.row_group).slice(loc.row, 1)
        where = f"{self.refs[loc.source].url}/{loc.shard}"
        batch = table.to_batches()[0]
        sid = batch.column("sample_id")[0].as_py()
        ids = torch.tensor(batch.column("input_ids")[0].as_py(), dtype=torch.long)
        mask = torch.tensor(batch.column("loss_mask")[0].as_py(), dtype=torch.long)
        if mask.shape != ids.shape:
            raise DataError(
                f"sample {sid!r} in {where}: loss_mask has {mask.numel()} "
                f"values, input_ids {ids.numel()}",
                fix="re-run the tokenize stage; the shard is inconsistent",
            )
        sample = Sample(sample_id=sid, input_ids=ids, loss_mask=mask)
        if self.hidden:
            aux = batch_tensors(batch, "aux_hidden")[0]
            last = batch_tensors(batch, "last_hidden")[0]
            if aux.shape[0] != ids.numel() or last.shape[0] != ids.numel():
                raise DataError(
                    f"sample {sid!r} in {where}: hidden states have "
                    f"{aux.shape[0]}/{last.shape[0]} rows for {ids.numel()} tokens",
                    fix="re-run extract_hidden; the shard is inconsistent",
                )
            sample.aux_hidden, sample.last_hidden = aux, last
        return sample


def plan_epoch(
    blocks: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    epoch: int,
    seed: int,
    micro_batch_size: int,
    world_size: int,
    grad_accum: int,
    group_steps: int,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """The epoch's micro batches (dataset indices), in global consumption order.

    See the module docstring. `group_steps` <= 1 turns length grouping off (plain shuffle).
    The result's length is a multiple of world_size * grad_accum. Without `max_tokens` every
    micro batch holds exactly micro_batch_size indices; with it, micro batches are cut by the
    token budget (`_plan_token_budget`) and hold 1 to micro_batch_size indices.
    """
    rng = np.random.default_rng([seed, epoch])
    order: list[int] = []
    for b in rng.permutation(len(blocks)):
        block = blocks[int(b)]
        order.extend(block[int(i)] for i in rng.permutation(len(block)))
    if not order:
        return []
    if max_tokens is not None:
        return _plan_token_budget(
            order,
            lengths,
            rng,
            micro_batch_size=micro_batch_size,
            step_micro=world_size * grad_accum,
            group_steps=group_steps,
            max_tokens=max_tokens,
        )
    step_samples = micro_batch_size * world_size * grad_accum
    _pad_with_head(order, step_samples)
    window = step_samples * max(group_steps, 1)
    plan: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = _mix_window(np.asarray(order[start : start + window]), lengths, rng, group_steps)
        steps = [chunk[s : s + step_samples] for s in range(0, len(chunk), step_samples)]
        for s in rng.permutation(len(steps)):
            step = steps[int(s)]
            for m in range(0, step_samples, micro_batch_size):
                plan.append([int(i) for i in step[m : m + micro_batch_size]])
    return plan


def cut_micro_batches(
    indices: Sequence[int], lengths: Sequence[int], micro_batch_size: int, max_tokens: int
) -> list[list[int]]:
    """Cut `indices` (in order) greedily into micro batches under a padded-token budget.

    A micro batch takes the next sample while it has fewer than `micro_batch_size` samples
    and (samples + 1) x (longest length with the new one) <= `max_tokens`; the first sample
    of a micro batch always goes in, so a sample longer than `max_tokens` is a micro batch
    of its own (`count_over_budget` counts them).
    """
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in indices:
        n = int(lengths[i])
        top = max(longest, n)
        if cur and (len(cur) < micro_batch_size and (len(cur) + 1) * top <= max_tokens):
            cur.append(int(i))
            longest = top
            continue
        if cur:
            out.append(cur)
        cur, longest = [int(i)], n
    if cur:
        out.append(cur)
    return out


def count_over_budget(
    plan: Sequence[Sequence[int]], lengths: Sequence[int], max_tokens: int
) -> int:
    """Micro batches of `plan` over `max_tokens`: each is one sample longer than the budget."""
    return sum(1 for mb in plan if len(mb) * max(int(lengths[i]) for i in mb) > max_tokens)


def _plan_token_budget(
    order: list[int],
    lengths: Sequence[int],
    rng: np.random.Generator,
    *,
    micro_batch_size: int,
    step_micro: int,
    group_steps: int,
    max_tokens: int,
) -> list[list[int]]:
    """`plan_epoch` with a token budget per micro batch (module docstring, "Token budget")."""
    window = micro_batch_size * step_micro * max(group_steps, 1)  # samples per window
    plan: list[list[int]] = []
    carry: list[int] = []
    pos = 0
    while pos < len(order) or carry:
        chunk = np.asarray(carry + order[pos : pos + window], dtype=np.int64)
        pos += window
        chunk = _mix_window(chunk, lengths, rng, group_steps)
        micro = cut_micro_batches(chunk.tolist(), lengths, micro_batch_size, max_tokens)
        whole = len(micro) // step_micro * step_micro
        last = pos >= len(order)
        carry = [] if last else [i for mb in micro[whole:] for i in mb]  # the shortest ones
        steps = [micro[s : s + step_micro] for s in range(0, whole, step_micro)]
        for s in rng.permutation(len(steps)):
            plan.extend(steps[int(s)])
        if last:
            plan.extend(micro[whole:])
            carry = []
    _pad_with_head(plan, step_micro)
    return plan


def _mix_window(
    chunk: np.ndarray, lengths: Sequence[int], rng: np.random.Generator, group_steps: int
) -> np.ndarray:
    """One window of dataset indices shuffled, then (length grouping on) sorted longest first."""
    chunk = chunk[rng.permutation(len(chunk))]
    if group_steps > 1:
        lens = np.asarray([lengths[i] for i in chunk])
        chunk = chunk[np.argsort(-lens, kind="stable")]
    return chunk


def _pad_with_head(items: list[Any], multiple: int) -> None:
    """Extend `items` to a multiple of `multiple` by repeating its first items (in place)."""
    pad = (-len(items)) % multiple
    while pad:  # a tiny data set may need more than one pass of repeats
        take = items[: min(pad, len(items))]
        items.extend(take)
        pad -= len(take)


def micro_batch_index(step_in_epoch: int, accum: int, rank: int, world: int, grad_accum: int):
    """Index in the epoch plan of the micro batch rank `rank` reads at accumulation step `accum`."""
    return step_in_epoch * world * grad_accum + accum * world + rank


def collate(samples: Sequence[Sample], hidden_dtype: torch.dtype) -> CollatedBatch:
    """Right-pad samples into a batch (tokens 0, masks 0, hidden states 0).

    Returns input_ids / attention_mask / loss_mask [B, T] int64 and, when the samples carry
    hidden states, aux_hidden [B, T, A*H] and last_hidden [B, T, H] in `hidden_dtype`.
    """
    b = len(samples)
    t = max(s.input_ids.numel() for s in samples)
    input_ids = torch.zeros(b, t, dtype=torch.long)
    attention = torch.zeros(b, t, dtype=torch.long)
    loss_mask = torch.zeros(b, t, dtype=torch.long)
    has_hidden = samples[0].aux_hidden is not None
    aux = last = None
    if has_hidden:
        aux = torch.zeros(b, t, samples[0].aux_hidden.shape[-1], dtype=hidden_dtype)
        last = torch.zeros(b, t, samples[0].last_hidden.shape[-1], dtype=hidden_dtype)
    for i, s in enumerate(samples):
        n = s.input_ids.numel()
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = 1
        loss_mask[i, :n] = s.loss_mask
        if has_hidden:
            aux[i, :n] = s.aux_hidden.to(hidden_dtype)  # [n, A*H]
            last[i, :n] = s.last_hidden.to(hidden_dtype)  # [n, H]
    return CollatedBatch(
        sample_ids=[s.sample_id for s in samples],
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        aux_hidden=aux,
        last_hidden=last,
    )


class BatchPrefetcher:
    """Reads and collates the micro batches of a plan in a background thread, ahead of the step.

    While the training step runs (torch kernels release the GIL), the next micro batch is read
    from its shard (a row-group cache miss decodes a whole row group), decoded and padded, so
    that work overlaps the step instead of adding to it. Batches come out in the order given,
    each equal to `collate([dataset[i] for i in idx], hidden_dtype)`; an error reading a batch
    (DataError naming the sample) is raised by the `next()` that would have returned it.
    While the prefetcher is open only its thread may read `dataset` (the row-group cache is
    not thread-safe).

    Args:
        dataset: the samples.
        batches: micro batches (dataset indices) in consumption order.
        hidden_dtype: dtype of the collated hidden states.
        depth: micro batches read ahead; 0 reads each in the caller's thread on `next()`.
        pin_memory: return batches in page-locked memory (for async copies to a GPU).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batches: Sequence[Sequence[int]],
        hidden_dtype: torch.dtype,
        *,
        depth: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth {depth} is negative")
        self.dataset, self.hidden_dtype = dataset, hidden_dtype
        self.depth, self.pin_memory = depth, pin_memory
        self._todo: Iterator[Sequence[int]] = iter(list(batches))
        self._ahead: deque[Future[CollatedBatch]] = deque()
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
            if depth > 0
            else None
        )
        self._fill()

    def _load(self, idx: Sequence[int]) -> CollatedBatch:
        batch = collate([self.dataset[i] for i in idx], self.hidden_dtype)
        return batch.pin_memory() if self.pin_memory else batch

    def _fill(self) -> None:
        while self._pool is not None and len(self._ahead) < self.depth:
            idx = next(self._todo, None)
            if idx is None:
                return
            self._ahead.append(self._pool.submit(self._load, idx))

    def __iter__(self) -> BatchPrefetcher:
        return self

    def __next__(self) -> CollatedBatch:
        if self._pool is None:
            return self._load(next(self._todo))
        if not self._ahead:
            raise StopIteration
        fut = self._ahead.popleft()
        self._fill()  # queue the next read before waiting: the thread never idles
        return fut.result()

    def close(self) -> None:
        """Drop the batches read ahead and stop the thread (waits for a read in progress)."""
        for fut in self._ahead:
            fut.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._todo = iter(())  # closed: next() raises StopIteration

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
