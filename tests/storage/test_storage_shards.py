"""Tensors survive Parquet and .pt shards bit for bit; shards stream in batches."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage import ArtifactError, ArtifactStore
from storage.shards import (
    TENSOR_META_KEY,
    batch_tensors,
    build_table,
    iter_batches,
    read_pt,
    read_table,
    shard_metadata,
    tensor_specs,
    write_parquet,
    write_pt,
)

_WORD = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# bit patterns every float format must keep: signed zeros, infinities, NaNs with different
# payloads and signs (quiet and signalling), the smallest and largest subnormals
_SPECIAL_BITS = {
    torch.bfloat16: [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x7FFF, 0x0001,
                     0x807F, 0x007F, 0x3F80],
    torch.float16: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x7FFF, 0x0001,
                    0x83FF, 0x03FF, 0x3C00],
    torch.float32: [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00123,
                    0x7F800001, 0x7FFFFFFF, 0x00000001, 0x807FFFFF, 0x007FFFFF, 0x3F800000],
}  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_WORD[t.dtype])


def _random_rows(dtype: torch.dtype, seed: int, inner: int = 24) -> list[torch.Tensor]:
    """Rows [T_i, inner] of uniformly random bit patterns plus every special value."""
    g = torch.Generator().manual_seed(seed)
    word = _WORD[dtype]
    info = torch.iinfo(word)
    rows = []
    for t in (5, 1, 17, 3):
        w = torch.randint(info.min, info.max, (t, inner), generator=g, dtype=torch.int64)
        rows.append(w.to(word).view(dtype))  # every exponent class occurs, NaNs included
    specials = torch.tensor(_SPECIAL_BITS[dtype], dtype=torch.int64)
    specials = torch.where(specials > info.max, specials - (1 << (8 * word.itemsize)), specials)
    row = torch.zeros(2, inner, dtype=word)
    row.view(-1)[: len(specials)] = specials.to(word)
    rows.append(row.view(dtype))
    return rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_round_trip_bit_exact(store: ArtifactStore, dtype: torch.dtype) -> None:
    rows = _random_rows(dtype, seed=7)
    normal = [torch.randn(len(r), 8).to(dtype) for r in rows]  # a second column, ordinary
    assert any(torch.isnan(r).any() for r in rows) and any(torch.isinf(r).any() for r in rows)
    table = build_table(
        {"sample_id": [f"s{i}" for i in range(len(rows))]},
        {"aux_hidden": rows, "last_hidden": normal},
        metadata={"layer_ids": [1, 2]},
    )
    with store.publish("extract_hidden", "k") as w:
        write_parquet(w, "shard-00000.parquet", table)
    ref = store.ref("extract_hidden", "k")

    got_rows, got_normal, ids = [], [], []
    for batch in iter_batches(store, ref, batch_size=2):
        got_rows += batch_tensors(batch, "aux_hidden")
        got_normal += batch_tensors(batch, "last_hidden")
        ids += batch.column("sample_id").to_pylist()
    assert ids == [f"s{i}" for i in range(len(rows))]
    for want, got in zip(rows + normal, got_rows + got_normal, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(_bits(got), _bits(want))  # bits, so NaN payloads and -0.0 count

    # the stored form: raw words in large_binary cells, exactly itemsize bytes per element
    whole = read_table(store, ref, "shard-00000.parquet")
    assert whole.schema.field("aux_hidden").type == pa.large_binary()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    cells = whole.column("aux_hidden").to_pylist()
    assert [len(c) for c in cells] == [r.numel() * itemsize for r in rows]
    spec = json.loads(whole.schema.metadata[TENSOR_META_KEY])["aux_hidden"]
    assert spec == {"dtype": str(dtype).removeprefix("torch."), "inner_shape": [24]}
    assert shard_metadata(whole.schema) == {"layer_ids": [1, 2]}


def test_integer_and_bool_tensor_columns(store: ArtifactStore) -> None:
    cols = {
        "ids": [torch.tensor([1, -(2**62), 2**62], dtype=torch.int64)],
        "mask": [torch.tensor([[True, False], [False, True]])],
        "small": [torch.tensor([-128, 127], dtype=torch.int8)],
    }
    with store.publish("s", "k") as w:
        write_parquet(w, "shard-00000.parquet", build_table({"n": [0]}, cols))
    (batch,) = list(iter_batches(store, store.ref("s", "k")))
    for name, (want,) in cols.items():
        (got,) = batch_tensors(batch, name)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_streaming_yields_several_batches(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # row groups are sized in bytes: 16 bytes of tensor + 8 of "i" per row, 64 rows a group
    monkeypatch.setattr("storage.shards.ROW_GROUP_BYTES", 64 * 24)
    n = 3 * 64 + 5
    rows = [torch.full((2, 4), float(i), dtype=torch.bfloat16) for i in range(n)]
    with store.publish("s", "k") as w:
        write_parquet(w, "shard-00000.parquet", build_table({"i": list(range(n))}, {"h": rows}))
    ref = store.ref("s", "k")
    with store.open(ref, "shard-00000.parquet") as fh:
        assert pq.ParquetFile(fh).num_row_groups >= 4  # small row groups: readable piecewise
    batches = list(iter_batches(store, ref, batch_size=16, columns=["i", "h"]))
    assert len(batches) >= n // 16
    assert all(b.num_rows <= 16 for b in batches)
    assert [i for b in batches for i in b.column("i").to_pylist()] == list(range(n))
    assert batch_tensors(batches[-1], "h")[-1][0, 0].item() == float(n - 1)
    # a column subset streams without the tensor column
    (first, *_) = iter_batches(store, ref, batch_size=16, columns=["i"])
    assert first.schema.names == ["i"]


def test_several_shards_stream_in_name_order(store: ArtifactStore) -> None:
    with store.publish("s", "k") as w:
        for i in (2, 0, 1):
            table = build_table({"shard": [i, i]}, {"h": [torch.ones(1, 2) * i] * 2})
            write_parquet(w, f"shard-{i:05d}.parquet", table)
        w.write_json("stats.json", {})  # not a shard: skipped by iter_batches
    ref = store.ref("s", "k")
    got = [v for b in iter_batches(store, ref) for v in b.column("shard").to_pylist()]
    assert got == [0, 0, 1, 1, 2, 2]
    only = [v for b in iter_batches(store, ref, names=["shard-00001.parquet"]) for v in
            b.column("shard").to_pylist()]  # fmt: skip
    assert only == [1, 1]


def test_declared_schema(store: ArtifactStore) -> None:
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8()))])
    table = build_table({"input_ids": [[1, 2, 3]], "loss_mask": [[0, 1, 1]]}, schema=schema)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    with store.publish("s", "k") as w:
        write_parquet(w, "shard-00000.parquet", table)
    back = read_table(store, store.ref("s", "k"), "shard-00000.parquet")
    assert back.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert back.column("input_ids").to_pylist() == [[1, 2, 3]]
    with pytest.raises(ArtifactError, match="'loss_mask'"):
        build_table({"loss_mask": [[1000]]}, schema=schema)


def test_build_table_rejects_bad_tensor_columns() -> None:
    with pytest.raises(ArtifactError, match="row 1"):
        build_table({}, {"h": [torch.zeros(2, 4), torch.zeros(2, 5)]})
    with pytest.raises(ArtifactError, match="row 1"):
        build_table({}, {"h": [torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16)]})
    with pytest.raises(ArtifactError, match="empty"):
        build_table({}, {"h": []})
    with pytest.raises(ArtifactError, match="0-d"):
        build_table({}, {"h": [torch.tensor(1.0)]})
    with pytest.raises(ArtifactError, match="cannot be stored"):
        build_table({}, {"h": [torch.zeros(2, dtype=torch.complex64)]})
    with pytest.raises(ArtifactError, match="row counts"):
        build_table({"id": ["a", "b"]}, {"h": [torch.zeros(2, 4)]})
    with pytest.raises(ArtifactError, match="not a tensor column"):
        batch_tensors(build_table({"id": ["a"]}).to_batches()[0], "id")


def test_tensor_specs_survive_non_contiguous_input() -> None:
    t = torch.randn(4, 6).to(torch.bfloat16).t()  # [6, 4], not contiguous
    table = build_table({}, {"h": [t]})
    assert tensor_specs(table.schema)["h"].inner_shape == (4,)
    (got,) = batch_tensors(table.to_batches()[0], "h")
    assert torch.equal(_bits(got), _bits(t.contiguous()))


def test_pt_shard_round_trip(store: ArtifactStore) -> None:
    rows = _random_rows(torch.bfloat16, seed=3)
    obj = {"hidden": rows[0], "ids": torch.arange(5), "names": ["a", "b"]}
    with store.publish("s", "k") as w:
        write_pt(w, "shard-00000.pt", obj)
        assert store.fs.exists(store.path("s", "k", "_journal/shard-00000.pt.json"))
    ref = store.ref("s", "k")
    store.verify(ref)
    got = read_pt(store, ref, "shard-00000.pt")
    assert torch.equal(_bits(got["hidden"]), _bits(rows[0]))
    assert torch.equal(got["ids"], obj["ids"]) and got["names"] == ["a", "b"]
