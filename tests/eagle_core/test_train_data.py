"""Training data: epoch plans (coverage, rank split, length grouping), shard reading, collation."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from train_helpers import make_samples, make_tiny_target, publish_hidden, publish_tokens

from eagle_core.errors import DataError
from eagle_core.train_data import (
    ShardDataset,
    collate,
    is_heldout,
    micro_batch_index,
    plan_epoch,
)
from storage import ArtifactStore
from storage.shards import build_table, write_parquet


def _blocks(n: int, per_block: int = 8) -> list[list[int]]:
    return [list(range(i, min(i + per_block, n))) for i in range(0, n, per_block)]


@pytest.mark.parametrize("n,mbs,world,accum", [(37, 2, 1, 1), (37, 2, 2, 1), (50, 3, 2, 2)])
def test_plan_covers_every_sample_in_whole_steps(n: int, mbs: int, world: int, accum: int):
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 100, size=n).tolist()
    plan = plan_epoch(
        _blocks(n),
        lengths,
        epoch=0,
        seed=1,
        micro_batch_size=mbs,
        world_size=world,
        grad_accum=accum,
        group_steps=4,
    )
    assert len(plan) % (world * accum) == 0
    assert all(len(mb) == mbs for mb in plan)
    counts = collections.Counter(i for mb in plan for i in mb)
    assert set(counts) == set(range(n))  # nothing dropped
    step = mbs * world * accum
    assert sum(counts.values()) == n + (-n) % step  # padding only to whole steps
    assert max(counts.values()) <= 2


def test_plan_is_deterministic_per_seed_and_epoch():
    lengths = list(range(5, 69))
    kw = dict(micro_batch_size=2, world_size=2, grad_accum=1, group_steps=4)
    a = plan_epoch(_blocks(64), lengths, epoch=0, seed=3, **kw)
    assert a == plan_epoch(_blocks(64), lengths, epoch=0, seed=3, **kw)
    assert a != plan_epoch(_blocks(64), lengths, epoch=1, seed=3, **kw)
    assert a != plan_epoch(_blocks(64), lengths, epoch=0, seed=4, **kw)


def test_two_ranks_see_the_samples_of_one_rank_with_double_accumulation():
    lengths = np.random.default_rng(1).integers(4, 50, size=40).tolist()
    one = plan_epoch(
        _blocks(40),
        lengths,
        epoch=0,
        seed=0,
        micro_batch_size=2,
        world_size=1,
        grad_accum=2,
        group_steps=4,
    )
    two = plan_epoch(
        _blocks(40),
        lengths,
        epoch=0,
        seed=0,
        micro_batch_size=2,
        world_size=2,
        grad_accum=1,
        group_steps=4,
    )
    assert one == two  # the plan is global: it does not depend on how steps are split
    for s in range(len(one) // 2):
        single = {i for a in range(2) for i in one[micro_batch_index(s, a, 0, 1, 2)]}
        ranks = {i for r in range(2) for i in two[micro_batch_index(s, 0, r, 2, 1)]}
        assert single == ranks


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(2).integers(4, 400, size=256).tolist()

    def padded(group_steps: int) -> int:
        plan = plan_epoch(
            _blocks(256, 64),
            lengths,
            epoch=0,
            seed=0,
            micro_batch_size=4,
            world_size=1,
            grad_accum=1,
            group_steps=group_steps,
        )
        return sum(
            max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for mb in plan
        )

    assert padded(16) < 0.25 * padded(1)


def test_plan_without_max_tokens_is_unchanged():
    """max_tokens=None (the default) gives exactly the plans of the code before the token
    budget existed (expected values computed with that code)."""
    lengths = np.random.default_rng(5).integers(3, 60, size=23).tolist()
    blocks = _blocks(23, 5)
    grouped = [[3, 1], [0, 12], [4, 13], [10, 2], [19, 22], [21, 11], [20, 18], [14, 15]]
    grouped += [[7, 9], [17, 16], [8, 3], [6, 5]]
    kw = dict(seed=2, world_size=2, grad_accum=1)
    for extra in ({}, {"max_tokens": None}):
        got = plan_epoch(blocks, lengths, epoch=1, micro_batch_size=2, group_steps=2, **kw, **extra)
        assert got == grouped
    plain = [[14, 10, 12], [11, 22, 13], [20, 21, 15], [19, 16, 18], [0, 3, 17], [2, 1, 4]]
    plain += [[9, 7, 8], [5, 12, 6]]
    kw = dict(seed=2, world_size=1, grad_accum=1)
    assert plan_epoch(blocks, lengths, epoch=0, micro_batch_size=3, group_steps=1, **kw) == plain


def test_heldout_split_is_by_id_and_stable():
    ids = [f"id-{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i, 0.1, seed=0)]
    assert 120 < len(held) < 280
    assert held == [i for i in ids if is_heldout(i, 0.1, seed=0)]
    assert not any(is_heldout(i, 0.0, seed=0) for i in ids)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_target(str(tmp_path_factory.mktemp("target")))


def test_reads_tokens_and_hidden_shards_exactly(tmp_path, tiny_target: str):
    store = ArtifactStore(str(tmp_path / "store"))
    samples = make_samples(20, seed=4)
    tokens = publish_tokens(store, samples, shard_rows=7)
    hidden = publish_hidden(store, tokens, tiny_target)

    tok_ds = ShardDataset(store, [tokens], hidden=False)
    assert len(tok_ds) == 20 and len(tok_ds.blocks) == 3  # 3 shards x 1 row group
    by_id = {s["sample_id"]: s for s in samples}
    for i in range(len(tok_ds)):
        s = tok_ds[i]
        assert s.input_ids.tolist() == by_id[s.sample_id]["input_ids"]
        assert s.loss_mask.tolist() == by_id[s.sample_id]["loss_mask"]
        assert tok_ds.lengths[i] == len(by_id[s.sample_id]["input_ids"])

    hid_ds = ShardDataset(store, [hidden], hidden=True)
    assert hid_ds.hidden_spec() == {"aux_hidden": (96,), "last_hidden": (32,)}
    from eagle_core.extract import iter_hidden_samples

    ref_rows = {r["sample_id"]: r for r in iter_hidden_samples(store, hidden)}
    for i in range(len(hid_ds)):
        s = hid_ds[i]
        assert s.aux_hidden.dtype == torch.bfloat16
        assert torch.equal(
            s.aux_hidden.view(torch.int16), ref_rows[s.sample_id]["aux_hidden"].view(torch.int16)
        )
        assert torch.equal(
            s.last_hidden.view(torch.int16), ref_rows[s.sample_id]["last_hidden"].view(torch.int16)
        )

    with pytest.raises(DataError, match="lacks columns.*aux_hidden"):
        ShardDataset(store, [tokens], hidden=True)

    train = ShardDataset(
        store, [tokens, hidden], hidden=False, split="train", heldout_fraction=0.3, seed=1
    )
    held = ShardDataset(
        store, [tokens, hidden], hidden=False, split="heldout", heldout_fraction=0.3, seed=1
    )
    assert len(train) + len(held) == 40
    assert not set(train.sample_ids) & set(held.sample_ids)


def test_empty_sample_is_an_error_naming_it(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    key = store.key("tokenize", {"bad": 1})
    with store.publish("tokenize", key) as w:
        write_parquet(
            w,
            "shard-00000.parquet",
            build_table(
                {
                    "sample_id": ["ok", "empty"],
                    "source": ["x", "x"],
                    "input_ids": [[1, 2, 3], []],
                    "loss_mask": [[0, 1, 1], []],
                }
            ),
        )
    with pytest.raises(DataError, match="'empty'.*no tokens"):
        ShardDataset(store, [store.ref("tokenize", key)], hidden=False)


def test_collate_pads_right():
    from eagle_core.train_data import Sample

    a = Sample(
        "a",
        torch.tensor([1, 2, 3]),
        torch.tensor([0, 1, 1]),
        torch.ones(3, 6, dtype=torch.bfloat16),
        torch.ones(3, 2, dtype=torch.bfloat16),
    )
    b = Sample(
        "b",
        torch.tensor([4]),
        torch.tensor([1]),
        torch.full((1, 6), 2.0, dtype=torch.bfloat16),
        torch.full((1, 2), 2.0, dtype=torch.bfloat16),
    )
    batch = collate([a, b], torch.float32)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch.aux_hidden.shape == (2, 3, 6) and batch.aux_hidden.dtype == torch.float32
    assert batch.aux_hidden[1, 1:].abs().sum() == 0 and batch.last_hidden[1, 0, 0] == 2.0
    assert batch.num_tokens == 4 and batch.sample_ids == ["a", "b"]
