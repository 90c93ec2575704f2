"""scan_vocab's fast artifact scan: equal to a Counter over the rows, over several shards and
row groups, empty masks, a local root and S3; bad shards are clear errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle_core.errors import DataError
from eagle_core.vocab import (
    VOCAB_FILE,
    VocabConfig,
    VocabMap,
    count_artifact_tokens,
    count_masked_tokens,
    scan_vocab,
)
from storage import ArtifactStore, StageRef
from storage.shards import build_table, iter_batches, write_parquet


def reference(seqs, n, v):
    """The plain definition: Counter over masked tokens, top n by (-count, id), smallest
    unseen ids as filler, ascending."""
    c = Counter(t for ids, mask in seqs for t, m in zip(ids, mask, strict=True) if m)
    top = sorted(c, key=lambda t: (-c[t], t))[:n]
    filler = [t for t in range(v) if t not in c][: n - len(top)]
    return sorted(top + filler), c


SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
    ]
)
V = 300


def _tokens(
    store: ArtifactStore, shards: list[list[tuple[list[int], list[int]]]], key: str = "k"
) -> StageRef:
    """A tokenize artifact with these shards (rows of (ids, mask)), 3-row row groups."""
    with store.publish("tokenize", key) as w:
        for s, rows in enumerate(shards):
            table = build_table(
                {
                    "sample_id": [f"{s}-{i}" for i in range(len(rows))],
                    "source": ["t"] * len(rows),
                    "input_ids": [ids for ids, _ in rows],
                    "loss_mask": [mask for _, mask in rows],
                },
                schema=SCHEMA,
            )
            w.write_file(
                f"shard-{s:05d}.parquet",
                lambda p, t=table: pq.write_table(t, p, row_group_size=3),
            )
        w.meta.update(vocab_size=V, tokenizer_hash="h")
    return store.ref("tokenize", key)


def _random_shards(seed: int) -> list[list[tuple[list[int], list[int]]]]:
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(4):
        rows = []
        for _ in range(int(rng.integers(1, 9))):
            n = int(rng.integers(0, 30))
            ids = ((rng.zipf(1.3, size=n) - 1) % V).tolist()
            p = 0.0 if s == 2 else 0.5  # shard 2: every mask empty
            rows.append((ids, (rng.random(n) < p).astype(int).tolist()))
        shards.append(rows)
    shards[0].append(([], []))  # an empty row
    shards[1].append(([5, 6, 7], [0, 0, 0]))  # a row with nothing masked
    return shards


@pytest.mark.parametrize("where", ["local", "s3"])
def test_scan_equals_counter_over_shards(tmp_path, where, request):
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_root")
    store = ArtifactStore(root)
    shards = _random_shards(1)
    tok = _tokens(store, shards)
    seqs = [row for rows in shards for row in rows]
    counts = count_artifact_tokens(store, tok, V)
    want_ids, c = reference(seqs, 40, V)
    assert counts.tolist() == [c.get(t, 0) for t in range(V)]
    batches = iter_batches(store, tok, columns=["input_ids", "loss_mask"])
    assert counts.tolist() == count_masked_tokens(batches, V).tolist()  # the batch path agrees
    ref = scan_vocab(store, tok, VocabConfig(draft_vocab_size=40))
    m = VocabMap.load(store.local_copy(ref, VOCAB_FILE, str(tmp_path)))
    assert m.draft_ids.tolist() == want_ids
    assert ref.counts["masked_tokens"] == sum(c.values())
    assert ref.counts["distinct_seen"] == len(c)


def test_two_artifacts_add_up(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    a, b = _random_shards(2), _random_shards(3)
    ta, tb = _tokens(store, a, "a"), _tokens(store, b, "b")
    ref = scan_vocab(store, [ta, tb], VocabConfig(draft_vocab_size=25))
    want_ids, c = reference([r for rows in a + b for r in rows], 25, V)
    m = VocabMap.load(store.local_copy(ref, VOCAB_FILE, str(tmp_path)))
    assert m.draft_ids.tolist() == want_ids and ref.counts["masked_tokens"] == sum(c.values())


def test_nonzero_mask_values_count_as_masked(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    tok = _tokens(store, [[([3, 4, 5, 3], [2, 0, -1, 1])]])
    counts = count_artifact_tokens(store, tok, V)
    assert counts[3] == 2 and counts[5] == 1 and counts[4] == 0 and counts.sum() == 3


def test_nothing_masked_is_a_data_error(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    tok = _tokens(store, [[([1, 2], [0, 0]), ([], [])], [([7], [0])]])
    assert not count_artifact_tokens(store, tok, V).any()
    with pytest.raises(DataError, match="no loss-masked tokens") as exc:
        scan_vocab(store, tok, VocabConfig(draft_vocab_size=4))
    assert exc.value.fix


def test_out_of_vocab_id_names_the_shard(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    tok = _tokens(store, [[([1, 2], [1, 1])], [([1, V + 5], [0, 1])]])
    with pytest.raises(DataError, match=f"shard-00001.parquet: token id {V + 5} outside"):
        count_artifact_tokens(store, tok, V)
    neg = _tokens(store, [[([4, -3], [1, 1])]], key="neg")
    with pytest.raises(DataError, match="shard-00000.parquet: token id -3 outside"):
        count_artifact_tokens(store, neg, V)
    # an out-of-vocab id where the mask is 0 is not counted, so not an error
    ok = _tokens(store, [[([1, V + 5], [1, 0])]], key="ok")
    assert count_artifact_tokens(store, ok, V).sum() == 1


def test_tokenize_writer_shards_scan_like_counter(tmp_path):
    """Shards written by write_parquet (dictionary-encoded lists, one row group)."""
    rng = np.random.default_rng(4)
    ids = [((rng.zipf(1.2, size=int(n)) - 1) % V).tolist() for n in rng.integers(0, 200, 50)]
    mask = [(rng.random(len(x)) < 0.4).astype(int).tolist() for x in ids]
    store = ArtifactStore(str(tmp_path / "store"))
    with store.publish("tokenize", "w") as w:
        table = build_table(
            {"sample_id": [str(i) for i in range(50)], "source": ["t"] * 50,
             "input_ids": ids, "loss_mask": mask},
            schema=SCHEMA,
        )  # fmt: skip
        write_parquet(w, "shard-00000.parquet", table)
    c = Counter(t for x, m in zip(ids, mask, strict=True) for t, k in zip(x, m, strict=True) if k)
    got = count_artifact_tokens(store, store.ref("tokenize", "w"), V)
    assert got.tolist() == [c.get(t, 0) for t in range(V)]
