"""Parquet (default) and `.pt` shards, with tensors stored bit-exact.

Tensor encoding in Parquet: a tensor column holds, per row, the tensor's raw bytes
(little-endian, C order) in a `large_binary` cell. bf16 is stored as its 16-bit words, so
NaN payloads, infinities and subnormals come back bit for bit, and a bf16 hidden state costs
exactly 2 bytes per element. The schema metadata key `eagle.tensors` holds, per tensor column,
`{"dtype": "bfloat16", "inner_shape": [3H]}`; a row's shape is `[rows, *inner_shape]` where
rows = nbytes / (itemsize * prod(inner_shape)).
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.errors import ArtifactError
from storage.store import ArtifactStore, ArtifactWriter, StageRef

TENSOR_META_KEY = b"eagle.tensors"
# Row groups of about this many uncompressed bytes: small enough that a reader streams a shard
# of multi-MB hidden-state rows, large enough that token shards (KB rows) decode at full speed
# (64-row groups made the vocab scan 5x slower).
ROW_GROUP_BYTES = 32 << 20

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# numpy has no bf16: move bf16 through numpy as the same-width integer words
_WORDS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    inner_shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ArtifactError(f"dtype {dtype} cannot be stored", fix=f"use one of {sorted(_DTYPES)}")


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in _WORDS:
        t = t.view(_WORDS[t.dtype])
    return t.numpy().tobytes()


def bytes_to_tensor(data: bytes | memoryview, spec: TensorSpec) -> torch.Tensor:
    dtype = spec.torch_dtype
    np_dtype = torch.empty(0, dtype=_WORDS.get(dtype, dtype)).numpy().dtype
    arr = np.frombuffer(data, dtype=np_dtype).copy()  # copy: writable, owns its memory
    t = torch.from_numpy(arr)
    if dtype in _WORDS:
        t = t.view(dtype)
    per_row = math.prod(spec.inner_shape)
    if per_row == 0:
        return t.reshape(0, *spec.inner_shape)  # rows of zero-size tensors: row count is lost
    if t.numel() % per_row:
        raise ArtifactError(
            f"{t.numel()} values do not fill rows of inner shape {spec.inner_shape}",
            fix="the shard is corrupt: delete its manifest and re-run the stage",
        )
    return t.reshape(-1, *spec.inner_shape)


def build_table(
    columns: Mapping[str, Sequence[Any] | pa.Array | pa.ChunkedArray],
    tensors: Mapping[str, Sequence[torch.Tensor]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """A table from plain columns plus tensor columns (one tensor per row, any leading size).

    Args:
        columns: plain columns, python lists or Arrow arrays.
        tensors: tensors[name][i] has shape [rows_i, *inner_shape]; all rows of a column share
            dtype and inner_shape (e.g. aux_hidden rows [T_i, 3H] bf16).
        metadata: JSON-able dict stored in the schema metadata under `eagle.meta`.
        schema: declared Arrow types of the plain columns (e.g. `input_ids: list<int32>`);
            a column it lists is built with that type (ArtifactError if a value does not fit).
            Without it, types are inferred (python ints become int64).
    """
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {}
    for k, v in columns.items():
        declared = schema.field(k).type if schema is not None and k in schema.names else None
        try:
            if isinstance(v, pa.Array | pa.ChunkedArray):
                arrays[k] = v.cast(declared) if declared is not None else v
            else:
                arrays[k] = pa.array(v, type=declared)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise ArtifactError(
                f"column {k!r} does not fit its declared type {declared} ({exc})",
                fix="fix the values, or the schema passed to build_table",
            ) from exc
    specs: dict[str, dict[str, Any]] = {}
    for name, rows in (tensors or {}).items():
        if not rows:
            raise ArtifactError(f"tensor column {name!r} is empty", fix="write at least one row")
        first = rows[0]
        if first.dim() == 0:
            raise ArtifactError(
                f"tensor column {name!r}: row 0 is a 0-d tensor",
                fix="store per-row scalars as a plain column, or reshape them to [1]",
            )
        spec = TensorSpec(dtype_name(first.dtype), tuple(first.shape[1:]))
        for i, t in enumerate(rows):
            if t.dim() == 0 or t.dtype != first.dtype or tuple(t.shape[1:]) != spec.inner_shape:
                raise ArtifactError(
                    f"tensor column {name!r} row {i}: {t.dtype} {tuple(t.shape)} differs from "
                    f"row 0 ({first.dtype}, inner shape {spec.inner_shape})",
                    fix="give every row of a tensor column the same dtype and trailing shape",
                )
        arrays[name] = pa.array([tensor_bytes(t) for t in rows], type=pa.large_binary())
        specs[name] = {"dtype": spec.dtype, "inner_shape": list(spec.inner_shape)}
    lengths = {k: len(a) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ArtifactError(
            f"columns have different row counts: {lengths}",
            fix="give every column (plain and tensor) one entry per row",
        )
    table = pa.table(arrays)
    meta = {TENSOR_META_KEY: json.dumps(specs).encode()}
    if metadata:
        meta[b"eagle.meta"] = json.dumps(metadata, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)


def write_parquet(
    writer: ArtifactWriter,
    name: str,
    table: pa.Table,
    journal: bool = True,
    file_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one shard (zstd); journaled so a crashed stage resumes after it.

    Args:
        file_metadata: key-value pairs for the Parquet footer only (not the Arrow schema:
            a table read back, filtered and written again does not carry them along). They
            are written in the same file write as the rows, so they exist exactly when the
            shard does. Read them with `read_footer` (no column is decoded).
    """
    tensor_cols = set(tensor_specs(table.schema))
    # Parquet names the leaves of nested columns by path (`input_ids.list.element`): a list of
    # top-level names would silently leave every list column without dictionary encoding and
    # statistics (a plain int32 per loss_mask value: 30x the bytes to decode)
    plain = [p for p in parquet_leaf_paths(table.schema) if p not in tensor_cols]
    options: dict[str, Any] = {
        "compression": "zstd",
        # min/max statistics of multi-MB binary cells would duplicate the data
        "write_statistics": plain,
        "use_dictionary": plain,
    }

    def _write(path: str) -> None:
        if not file_metadata:
            pq.write_table(table, path, row_group_size=_row_group_rows(table), **options)
            return
        # what pq.write_table does, plus footer key-values
        with pq.ParquetWriter(path, table.schema, **options) as pw:
            pw.write_table(table, row_group_size=_row_group_rows(table))
            pw.add_key_value_metadata(dict(file_metadata))

    writer.write_file(name, _write, journal=journal)


def parquet_leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet leaf column paths of an Arrow schema, e.g. `input_ids.list.element`."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buf)
    md = pq.read_metadata(pa.BufferReader(buf.getvalue()))
    return [md.schema.column(i).path for i in range(len(md.schema))]


def _row_group_rows(table: pa.Table) -> int:
    per_row = table.nbytes / max(table.num_rows, 1)
    return int(min(max(ROW_GROUP_BYTES // max(per_row, 1), 1), 1 << 16))


def write_pt(writer: ArtifactWriter, name: str, obj: Mapping[str, Any], journal: bool = True):
    """A `.pt` shard (torch.save of a dict of tensors/lists), for users who ask for it."""
    writer.write_file(name, lambda path: torch.save(dict(obj), path), journal=journal)


def read_pt(store: ArtifactStore, ref: StageRef, name: str) -> dict[str, Any]:
    with store.open(ref, name) as fh:
        return torch.load(fh, weights_only=True)


def tensor_specs(schema: pa.Schema) -> dict[str, TensorSpec]:
    raw = (schema.metadata or {}).get(TENSOR_META_KEY)
    if not raw:
        return {}
    return {k: TensorSpec(v["dtype"], tuple(v["inner_shape"])) for k, v in json.loads(raw).items()}


def shard_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"eagle.meta")
    return json.loads(raw) if raw else {}


@dataclass(frozen=True)
class ParquetFooter:
    """What a Parquet shard's footer says, read without decoding any column."""

    name: str  # file name inside the artifact
    num_rows: int
    key_values: dict[str, bytes]  # the file's key-value metadata (ARROW:schema included)
    # leaf column path (e.g. `input_ids.list.element`) -> Parquet's num_values summed over the
    # row groups: one per list item, plus one per empty or null list
    leaf_values: dict[str, int]


def read_footer(store: ArtifactStore, ref: StageRef, name: str) -> ParquetFooter:
    """The footer of one Parquet shard (local: memory-mapped; remote: a few range reads).

    Raises:
        ArtifactError: the file is not readable Parquet.
    """
    try:
        with _parquet_file(store, ref, name) as pf:
            md = pf.metadata
            leaves = [md.schema.column(i).path for i in range(md.num_columns)]
            values = dict.fromkeys(leaves, 0)
            for rg in range(md.num_row_groups):
                group = md.row_group(rg)
                for i, leaf in enumerate(leaves):
                    values[leaf] += group.column(i).num_values
            kv = {k.decode(errors="replace"): v for k, v in (md.metadata or {}).items()}
            return ParquetFooter(name=name, num_rows=md.num_rows, key_values=kv, leaf_values=values)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(
            f"{ref.url}/{name}: unreadable Parquet footer ({exc})",
            fix="the shard is corrupt: delete its manifest and re-run the stage",
        ) from exc


def iter_batches(
    store: ArtifactStore,
    ref: StageRef,
    names: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from the Parquet shards of an artifact, in name order."""
    names = list(names) if names is not None else store.list_files(ref, suffix=".parquet")
    for name in names:
        # local roots: let Arrow memory-map the file (its native reader is ~5x faster than
        # reading through a Python file object)
        source = store.path(ref.stage, ref.key, name) if store.is_local else None
        with contextlib.nullcontext(source) if source else store.open(ref, name) as fh:
            pf = pq.ParquetFile(fh, memory_map=source is not None)
            specs = tensor_specs(pf.schema_arrow)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                # keep the tensor specs on every batch so callers can decode
                yield batch.replace_schema_metadata(
                    {
                        **(batch.schema.metadata or {}),
                        TENSOR_META_KEY: json.dumps(
                            {
                                k: {"dtype": s.dtype, "inner_shape": list(s.inner_shape)}
                                for k, s in specs.items()
                            }
                        ).encode(),
                    }
                )


@dataclass(frozen=True)
class FlatLists:
    """Row-aligned list columns of one row group, flattened to numpy without a copy.

    Row r of every column is `values[name][offsets[r]:offsets[r + 1]]`.
    """

    shard: str  # file name inside the artifact
    row_group: int
    offsets: np.ndarray  # int64 [rows + 1], offsets[0] == 0, shared by all columns
    values: dict[str, np.ndarray]  # name -> [offsets[-1]] flattened list values

    @property
    def rows(self) -> int:
        return int(self.offsets.shape[0] - 1)


def iter_flat_lists(
    store: ArtifactStore,
    ref: StageRef,
    columns: Sequence[str],
    names: Sequence[str] | None = None,
    prefetch: bool = True,
) -> Iterator[FlatLists]:
    """Stream row-aligned list columns (e.g. `input_ids` + `loss_mask`) as flat numpy arrays.

    The fast path for whole-column numeric scans: only the named columns are decoded, one
    row group at a time (Arrow decodes the columns in parallel and releases the GIL), local
    files are memory-mapped, remote ones are read with coalesced range requests, and the
    next row group is decoded in a background thread while the caller works on this one.
    No per-row Python objects are made.

    Raises:
        ArtifactError: a column is missing, is not a list column, holds nulls, or its rows
            have other lengths than the first column's (they must be row-aligned).
    """
    if not columns:
        raise ArtifactError("iter_flat_lists got no columns", fix="name the list columns")
    names = list(names) if names is not None else store.list_files(ref, suffix=".parquet")
    parts = _flat_parts(store, ref, names, list(columns))
    yield from _prefetched(parts) if prefetch else parts


_END = object()


def _prefetched(items: Iterator[Any]) -> Iterator[Any]:
    """Iterate `items` one step ahead in a background thread (exceptions are re-raised here;
    an abandoned iteration stops the thread at its next step)."""
    q: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            put((_END, exc))

    worker = threading.Thread(target=produce, name="flat-lists", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        worker.join()


@contextlib.contextmanager
def _parquet_file(store: ArtifactStore, ref: StageRef, name: str) -> Iterator[pq.ParquetFile]:
    if store.is_local:
        # memory-mapped: Arrow's native reader, no Python file object in the loop
        yield pq.ParquetFile(store.path(ref.stage, ref.key, name), memory_map=True)
        return
    with store.open(ref, name) as fh:
        # pre_buffer: fetch the wanted column chunks in a few coalesced range requests
        yield pq.ParquetFile(fh, pre_buffer=True)


def _flat_parts(
    store: ArtifactStore, ref: StageRef, names: list[str], columns: list[str]
) -> Iterator[FlatLists]:
    for name in names:
        where = f"{ref.url}/{name}"
        with _parquet_file(store, ref, name) as pf:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ArtifactError(
                    f"{where} has no column(s) {missing} (it has {pf.schema_arrow.names})",
                    fix="read an artifact of the stage that writes these columns",
                )
            for rg in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(rg, columns=columns, use_threads=True)
                yield flatten_lists(table, columns, name, rg, where)


def flatten_lists(
    table: pa.Table, columns: Sequence[str], name: str, rg: int, where: str
) -> FlatLists:
    """Row-aligned list columns of an in-memory table (one row group of shard `name`) as
    flat numpy, zero-copy where Arrow allows.

    Raises:
        ArtifactError: a column is not a list column, holds nulls, or its rows have other
            lengths than the first column's (`where` names the table in the message).
    """
    offsets: np.ndarray | None = None
    values: dict[str, np.ndarray] = {}
    for c in columns:
        col = table.column(c)
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise ArtifactError(
                f"{where}: column {c!r} is {col.type}, not a list column",
                fix="read it with iter_batches",
            )
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        offs = arr.offsets.to_numpy().astype(np.int64, copy=False)  # sliced-aware [rows+1]
        flat = arr.values.slice(int(offs[0]), int(offs[-1] - offs[0]))
        if arr.null_count or flat.null_count:
            raise ArtifactError(
                f"{where}: column {c!r} holds nulls (row group {rg})",
                fix="the shard is corrupt: delete its manifest and re-run the stage",
            )
        offs = offs - offs[0] if offs[0] else offs
        if offsets is None:
            offsets = offs
        elif not np.array_equal(offsets, offs):
            bad = int(np.flatnonzero(np.diff(offsets) != np.diff(offs))[0])
            raise ArtifactError(
                f"{where}: row {bad} of row group {rg} has lists of different lengths in "
                f"{columns[0]!r} and {c!r}",
                fix="the columns must be row-aligned; re-run the stage that wrote them",
            )
        values[c] = flat.to_numpy(zero_copy_only=False)
    assert offsets is not None
    return FlatLists(shard=name, row_group=rg, offsets=offsets, values=values)


def batch_tensors(batch: pa.RecordBatch, column: str) -> list[torch.Tensor]:
    """Decode one tensor column of a record batch into a list of tensors (one per row)."""
    specs = tensor_specs(batch.schema)
    if column not in specs:
        raise ArtifactError(
            f"column {column!r} is not a tensor column (tensor columns: {sorted(specs)})",
            fix="read it with batch.column(name).to_pylist()",
        )
    spec = specs[column]
    return [bytes_to_tensor(cell.as_buffer(), spec) for cell in batch.column(column)]


def read_table(store: ArtifactStore, ref: StageRef, name: str) -> pa.Table:
    """Read one whole shard (small shards only; use iter_batches to stream)."""
    with store.open(ref, name) as fh:
        return pq.read_table(fh)
