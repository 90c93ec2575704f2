"""iter_flat_lists: row-aligned list columns as flat numpy, equal to the row-by-row reading;
write_parquet dictionary-encodes list columns. Every test runs on a local root and on S3."""

from __future__ import annotations

import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage import ArtifactError, ArtifactStore
from storage.shards import (
    build_table,
    iter_batches,
    iter_flat_lists,
    parquet_leaf_paths,
    write_parquet,
)

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8()))])


def _rows(rng: np.random.Generator, n: int) -> tuple[list[list[int]], list[list[int]]]:
    lengths = rng.integers(0, 9, size=n)  # empty rows included
    ids = [rng.integers(0, 1000, size=k).tolist() for k in lengths]
    mask = [rng.integers(0, 2, size=k).tolist() for k in lengths]
    return ids, mask


def _publish_raw(store: ArtifactStore, tables: dict[str, pa.Table], rg_rows: int) -> None:
    """Shards written with small row groups (several per shard) straight through pyarrow."""
    with store.publish("tokenize", "k") as w:
        for name, table in tables.items():
            w.write_file(name, lambda p, t=table: pq.write_table(t, p, row_group_size=rg_rows))


def test_flat_lists_equal_row_reading_over_shards_and_row_groups(store: ArtifactStore) -> None:
    rng = np.random.default_rng(0)
    tables = {}
    for i in (1, 0, 2):
        ids, mask = _rows(rng, 11)
        tables[f"shard-{i:05d}.parquet"] = pa.table(
            {"sample_id": [f"{i}-{r}" for r in range(11)], "input_ids": ids, "loss_mask": mask},
            schema=pa.schema([("sample_id", pa.string()), *SCHEMA]),
        )
    _publish_raw(store, tables, rg_rows=4)  # 3 row groups per shard
    ref = store.ref("tokenize", "k")
    for prefetch in (True, False):
        parts = list(iter_flat_lists(store, ref, ["input_ids", "loss_mask"], prefetch=prefetch))
        assert [(p.shard, p.row_group) for p in parts] == [
            (f"shard-{i:05d}.parquet", rg) for i in range(3) for rg in range(3)
        ]
        assert sum(p.rows for p in parts) == 33
        got = [
            (p.values["input_ids"][a:b].tolist(), p.values["loss_mask"][a:b].tolist())
            for p in parts
            for a, b in zip(p.offsets[:-1], p.offsets[1:], strict=True)
        ]
        want = [
            (r["input_ids"], r["loss_mask"])
            for b in iter_batches(store, ref, columns=["input_ids", "loss_mask"])
            for r in b.to_pylist()
        ]
        assert got == want and any(not ids for ids, _ in got)  # empty rows kept in place
        assert parts[0].values["input_ids"].dtype == np.int32
        assert parts[0].values["loss_mask"].dtype == np.int8
    only = list(iter_flat_lists(store, ref, ["loss_mask"], names=["shard-00002.parquet"]))
    assert len(only) == 3 and list(only[0].values) == ["loss_mask"]


def test_flat_lists_of_large_lists_and_all_empty_rows(store: ArtifactStore) -> None:
    schema = pa.schema([("a", pa.large_list(pa.int64())), ("b", pa.large_list(pa.bool_()))])
    tables = {
        "shard-00000.parquet": pa.table({"a": [[5, 6], [], [7]], "b": [[True, False], [], [True]]},
                                        schema=schema),
        "shard-00001.parquet": pa.table({"a": [[], []], "b": [[], []]}, schema=schema),
    }  # fmt: skip
    _publish_raw(store, tables, rg_rows=10)
    parts = list(iter_flat_lists(store, store.ref("tokenize", "k"), ["a", "b"]))
    assert parts[0].offsets.tolist() == [0, 2, 2, 3]
    assert parts[0].values["a"].tolist() == [5, 6, 7]
    assert parts[0].values["b"].tolist() == [True, False, True]
    assert parts[1].offsets.tolist() == [0, 0, 0] and parts[1].values["a"].size == 0


@pytest.mark.parametrize(
    "table,columns,needle",
    [
        (pa.table({"a": [[1, 2], [3]], "b": [[1], [0, 1]]}), ["a", "b"], "row 0"),
        (pa.table({"a": [[1, None]], "b": [[1, 1]]}), ["a", "b"], "holds nulls"),
        (pa.table({"a": [[1], None], "b": [[1], []]}), ["a", "b"], "holds nulls"),
        (pa.table({"a": [[1]], "n": [3]}), ["a", "n"], "not a list column"),
        (pa.table({"a": [[1]]}), ["a", "missing"], "no column(s) ['missing']"),
    ],
)
def test_flat_lists_refuse_bad_shards(store: ArtifactStore, table, columns, needle) -> None:
    _publish_raw(store, {"shard-00000.parquet": table}, rg_rows=10)
    with pytest.raises(ArtifactError, match=re.escape(needle)) as e:
        list(iter_flat_lists(store, store.ref("tokenize", "k"), columns))
    assert "shard-00000.parquet" in str(e.value) and e.value.fix


def test_write_parquet_dictionary_encodes_list_columns(store: ArtifactStore) -> None:
    table = build_table(
        {"sample_id": ["a", "b"], "input_ids": [[1, 2, 1], [2]], "loss_mask": [[0, 1, 1], [1]]},
        {"h": [torch.ones(3, 2), torch.zeros(1, 2)]},
        schema=SCHEMA,
    )
    assert parquet_leaf_paths(table.schema) == [
        "sample_id",
        "input_ids.list.element",
        "loss_mask.list.element",
        "h",
    ]
    with store.publish("s", "k") as w:
        write_parquet(w, "shard-00000.parquet", table)
    with store.open(store.ref("s", "k"), "shard-00000.parquet") as fh:
        rg = pq.ParquetFile(fh).metadata.row_group(0)
        cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
    for leaf in ("input_ids.list.element", "loss_mask.list.element"):
        assert "RLE_DICTIONARY" in cols[leaf].encodings  # was PLAIN: int32 per mask value
        assert cols[leaf].statistics is not None and cols[leaf].statistics.has_min_max
    assert cols["input_ids.list.element"].statistics.max == 2
    assert "RLE_DICTIONARY" not in cols["h"].encodings and cols["h"].statistics is None


def test_abandoned_prefetch_stops_its_thread(store: ArtifactStore) -> None:
    rng = np.random.default_rng(1)
    ids, mask = _rows(rng, 12)
    _publish_raw(store, {"shard-00000.parquet": pa.table({"input_ids": ids, "loss_mask": mask},
                                                         schema=SCHEMA)}, rg_rows=2)  # fmt: skip
    it = iter_flat_lists(store, store.ref("tokenize", "k"), ["input_ids", "loss_mask"])
    first = next(it)
    assert first.rows == 2 and first.values["input_ids"].tolist() == sum(ids[:2], [])
    it.close()  # the consumer stops early: the reader thread must not linger
    assert not [t for t in threading.enumerate() if t.name == "flat-lists"]
