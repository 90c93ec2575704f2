"""The batch prefetcher (order, equality with plain collation, errors, closing) and a training
run fed by it computing what a plain PyTorch loop computes on the same batches."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    make_samples,
    make_tiny_target,
    plain_torch_loop,
    publish_hidden,
    publish_tokens,
)

from eagle_core.errors import DataError
from eagle_core.train_data import BatchPrefetcher, CollatedBatch, ShardDataset, collate
from storage import ArtifactStore
from storage.shards import build_table, write_parquet


@pytest.fixture(scope="module")
def hidden_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("prefetch")
    target = make_tiny_target(str(base / "target"))
    store = ArtifactStore(str(base / "store"))
    tokens = publish_tokens(store, make_samples(24, seed=5), shard_rows=5)
    return {"store": store, "hidden": publish_hidden(store, tokens, target), "target": target}


def _same(a: CollatedBatch, b: CollatedBatch) -> bool:
    return (
        a.sample_ids == b.sample_ids
        and torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.attention_mask, b.attention_mask)
        and torch.equal(a.loss_mask, b.loss_mask)
        and torch.equal(a.aux_hidden, b.aux_hidden)
        and torch.equal(a.last_hidden, b.last_hidden)
    )


class _Recording(ShardDataset):
    """A real ShardDataset that notes which thread read which sample."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.reads: list[tuple[int, str]] = []
        self.read_event: dict[int, threading.Event] = {}

    def __getitem__(self, index: int):
        sample = super().__getitem__(index)
        self.reads.append((index, threading.current_thread().name))
        self.read_event.setdefault(index, threading.Event()).set()
        return sample


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_equal_plain_collation_in_order(hidden_data: dict, depth: int):
    ds = ShardDataset(hidden_data["store"], [hidden_data["hidden"]], hidden=True)
    # across row groups (5 rows each) and back, with a repeated sample
    plan = [[0, 7], [12, 3], [23, 22], [5, 0], [18, 9]]
    want = [collate([ds[i] for i in idx], torch.float32) for idx in plan]
    with BatchPrefetcher(ds, plan, torch.float32, depth=depth) as batches:
        got = list(batches)
    assert len(got) == len(plan)
    assert all(_same(g, w) for g, w in zip(got, want, strict=True))
    assert got[0].aux_hidden.dtype == torch.float32


def test_next_batch_is_read_in_the_background_while_the_step_runs(hidden_data: dict):
    ds = _Recording(hidden_data["store"], [hidden_data["hidden"]], hidden=True)
    plan = [[0, 1], [10, 11], [20, 21]]
    with BatchPrefetcher(ds, plan, torch.float32, depth=1) as batches:
        first = next(batches)
        assert first.sample_ids == [ds.sample_ids[0], ds.sample_ids[1]]
        # the consumer "trains" on batch 0; batch 1 arrives without another next() call
        assert ds.read_event.setdefault(11, threading.Event()).wait(timeout=30)
        assert 21 not in [i for i, _ in ds.reads]  # only one batch ahead
        assert list(batches)[-1].sample_ids == [ds.sample_ids[20], ds.sample_ids[21]]
    threads = {name for _, name in ds.reads}
    assert threads and all(name.startswith("batch-prefetch") for name in threads)


def test_a_bad_sample_fails_at_its_own_batch_naming_it(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    key = store.key("tokenize", {"bad-mask": 1})
    with store.publish("tokenize", key) as w:
        write_parquet(
            w,
            "shard-00000.parquet",
            build_table(
                {
                    "sample_id": ["ok-1", "ok-2", "torn"],
                    "source": ["x", "x", "x"],
                    "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]],
                    "loss_mask": [[0, 1, 1], [1, 1], [1, 1]],  # "torn": 2 mask values, 3 ids
                }
            ),
        )
    ds = ShardDataset(store, [store.ref("tokenize", key)], hidden=False)
    with BatchPrefetcher(ds, [[0], [1], [2], [0]], torch.float32, depth=2) as batches:
        assert next(batches).sample_ids == ["ok-1"]
        assert next(batches).sample_ids == ["ok-2"]
        with pytest.raises(DataError, match="'torn'.*loss_mask has 2 values"):
            next(batches)


def test_close_stops_reading_and_ends_iteration(hidden_data: dict):
    ds = ShardDataset(hidden_data["store"], [hidden_data["hidden"]], hidden=True)
    batches = BatchPrefetcher(ds, [[i] for i in range(10)], torch.float32, depth=2)
    assert next(batches).sample_ids == [ds.sample_ids[0]]
    batches.close()
    assert not any(t.name.startswith("batch-prefetch") for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()  # twice is fine
    with pytest.raises(ValueError, match="negative"):
        BatchPrefetcher(ds, [[0]], torch.float32, depth=-1)


def test_pinned_copy_keeps_the_values(hidden_data: dict):
    if not torch.cuda.is_available():
        pytest.skip("pinning needs a CUDA runtime")
    ds = ShardDataset(hidden_data["store"], [hidden_data["hidden"]], hidden=True)
    batch = collate([ds[0], ds[1]], torch.float32)
    pinned = batch.pin_memory()
    assert pinned.aux_hidden.is_pinned() and _same(pinned, batch)


@pytest.mark.slow  # DeepSpeed import + a 6-step inline run (~15 s on 2 busy cores)
def test_loop_trains_like_a_plain_torch_loop_on_the_same_batches(hidden_data: dict, tmp_path):
    """The DeepSpeed loop (prefetched data, 1-rank all-reduce skipped, fp32 ZeRO-0 grad norm
    taken before engine.step()) gives the weights, losses and grad norms of compute_loss +
    backward + clip + AdamW with the same schedule: the bare side of
    benchmarks/bench_train_step.py does the same math as the loop it is compared with."""
    from eagle_core import train as T
    from eagle_core.metrics import read_metrics

    cfg = T.TrainConfig(
        store=str(tmp_path / "out"),
        target=hidden_data["target"],
        data=(hidden_data["hidden"].url,),
        steps=6,
        batch_size=3,
        lr=2e-2,
        grad_clip=0.2,  # small enough to clip: the clip path is compared too
        ttt_steps=3,
        heldout_fraction=0.0,
        log_every=1,
        seed=2,
    )
    store = ArtifactStore(cfg.store)
    ref = T.run_training(store, cfg)
    records = [r for r in read_metrics(os.path.join(ref.url, "metrics.jsonl"))]
    real_sd = load_file(os.path.join(ref.url, T.FINAL_WEIGHTS))

    losses, norms, bare_sd = plain_torch_loop(store, cfg)

    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-5)
    assert max(norms) > cfg.grad_clip  # clipping did act
    assert set(bare_sd) == set(real_sd)
    for k, v in bare_sd.items():
        torch.testing.assert_close(real_sd[k], v.float() if v.is_floating_point() else v)
