"""Token budget per micro batch (TrainConfig.max_tokens): greedy cuts, coverage and padding,
world-size invariance, steps over epochs, config/form/CLI plumbing, and a real run that
stops, resumes and trains exactly the predicted micro batches."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError
from train_helpers import make_samples, make_tiny_target, publish_tokens, train_config

from eagle_core.errors import ConfigError
from eagle_core.metrics import read_metrics
from eagle_core.train import TrainConfig, _epoch_steps_total, _plan, train_main
from eagle_core.train_data import (
    ShardDataset,
    count_over_budget,
    cut_micro_batches,
    micro_batch_index,
    plan_epoch,
)
from storage import ArtifactStore


def _blocks(n: int, per_block: int = 8) -> list[list[int]]:
    return [list(range(i, min(i + per_block, n))) for i in range(0, n, per_block)]


def _lengths(n: int, seed: int, lo: int = 4, hi: int = 300) -> list[int]:
    # long-tailed, like real data: mostly short, some long
    rng = np.random.default_rng(seed)
    return np.minimum(hi, lo + rng.lognormal(3.0, 1.0, size=n).astype(int)).tolist()


def _plan_kw(**kw) -> dict:
    base = dict(
        epoch=0,
        seed=1,
        micro_batch_size=6,
        world_size=2,
        grad_accum=2,
        group_steps=4,
        max_tokens=256,
    )
    base.update(kw)
    return base


def _split_padding(plan: list[list[int]], n: int) -> int:
    """How many micro batches of `plan` hold the epoch's n samples before the padding."""
    seen = 0
    for k, mb in enumerate(plan):
        seen += len(mb)
        if seen >= n:
            return k + 1
    raise AssertionError(f"plan holds {seen} samples < {n}")


# ---- the greedy cut -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mbs,budget", [(1, 64), (4, 64), (8, 300), (16, 1000)])
def test_greedy_cut_respects_both_limits_and_is_maximal(seed: int, mbs: int, budget: int):
    lengths = _lengths(200, seed)
    order = np.random.default_rng(seed + 10).permutation(200).tolist()
    micro = cut_micro_batches(order, lengths, mbs, budget)
    assert [i for mb in micro for i in mb] == order  # order kept, nothing lost or repeated
    for mb in micro:
        padded = len(mb) * max(lengths[i] for i in mb)
        assert 1 <= len(mb) <= mbs
        assert padded <= budget or len(mb) == 1  # only a lone too-long sample goes over
    for mb, nxt in zip(micro, micro[1:], strict=False):
        # greedy: the next micro batch's first sample would have broken a limit
        grown = mb + [nxt[0]]
        assert len(grown) > mbs or len(grown) * max(lengths[i] for i in grown) > budget
    over = sum(1 for i in order if lengths[i] > budget)
    assert count_over_budget(micro, lengths, budget) == over


def test_plan_micro_batches_respect_the_budget_and_group_lengths():
    n = 300
    lengths = _lengths(n, 3)
    kw = _plan_kw(max_tokens=200)
    plan = plan_epoch(_blocks(n), lengths, **kw)
    for mb in plan:
        assert 1 <= len(mb) <= kw["micro_batch_size"]
        assert len(mb) * max(lengths[i] for i in mb) <= 200 or len(mb) == 1
    assert count_over_budget(plan, lengths, 200) >= sum(1 for x in lengths if x > 200)
    # grouping: padding is a small share of the budgeted tokens
    padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
    real = sum(lengths[i] for mb in plan for i in mb)
    assert padded - real < 0.2 * padded
    # and steps are shuffled: lengths do not simply decrease through the epoch
    longest = [max(lengths[i] for i in mb) for mb in plan]
    assert longest != sorted(longest, reverse=True)


# ---- coverage, padding, determinism ---------------------------------------------------------
@pytest.mark.parametrize(
    "n,mbs,world,accum,group,budget",
    [
        (37, 2, 1, 1, 4, 64),
        (37, 3, 2, 1, 4, 128),
        (200, 6, 2, 2, 4, 256),
        (200, 6, 3, 1, 1, 256),  # no length grouping
        (5, 4, 4, 2, 16, 10_000),  # fewer samples than one step: padding repeats several times
        (150, 8, 2, 1, 2, 16),  # a budget below most samples: one sample per micro batch
    ],
)
def test_every_sample_once_and_only_padding_repeats(n, mbs, world, accum, group, budget):
    lengths = _lengths(n, n + mbs)
    plan = plan_epoch(
        _blocks(n),
        lengths,
        **_plan_kw(
            micro_batch_size=mbs,
            world_size=world,
            grad_accum=accum,
            group_steps=group,
            max_tokens=budget,
        ),
    )
    step = world * accum
    assert len(plan) % step == 0
    k = _split_padding(plan, n)
    assert sorted(i for mb in plan[:k] for i in mb) == list(range(n))  # each sample once
    pad = len(plan) - k
    assert pad < step
    assert plan[k:] == [plan[j % k] for j in range(pad)]  # padding: the first micro batches
    counts = collections.Counter(i for mb in plan for i in mb)
    assert min(counts.values()) >= 1


def test_large_budget_gives_full_micro_batches():
    n = 101
    lengths = _lengths(n, 7)
    plan = plan_epoch(_blocks(n), lengths, **_plan_kw(max_tokens=10**9, world_size=1))
    k = _split_padding(plan, n)
    assert [len(mb) for mb in plan[: k - 1]] == [6] * (k - 1)  # only the last one is partial
    assert k == -(-n // 6)


def test_plan_is_deterministic_per_seed_and_epoch():
    lengths = _lengths(150, 5)
    a = plan_epoch(_blocks(150), lengths, **_plan_kw())
    assert a == plan_epoch(_blocks(150), lengths, **_plan_kw())
    assert a != plan_epoch(_blocks(150), lengths, **_plan_kw(epoch=1))
    assert a != plan_epoch(_blocks(150), lengths, **_plan_kw(seed=2))


# ---- world size -----------------------------------------------------------------------------
@pytest.mark.parametrize("layouts", [((2, 1), (1, 2)), ((4, 1), (2, 2), (1, 4))])
def test_ranks_see_the_micro_batches_of_one_rank_with_more_accumulation(layouts):
    """The plan depends on W and G only through W x G: W ranks with G accumulation steps
    read, step by step, the micro batches one rank reads with W x G accumulation steps."""
    n = 230
    lengths = _lengths(n, 11)
    plans = [
        plan_epoch(_blocks(n), lengths, **_plan_kw(world_size=w, grad_accum=g)) for w, g in layouts
    ]
    assert all(p == plans[0] for p in plans)
    one_w, one_g = layouts[-1]  # world 1
    for w, g in layouts[:-1]:
        per_step = w * g
        assert len(plans[0]) % per_step == 0
        for s in range(len(plans[0]) // per_step):
            ranks = sorted(
                tuple(plans[0][micro_batch_index(s, a, r, w, g)])
                for r in range(w)
                for a in range(g)
            )
            single = sorted(
                tuple(plans[0][micro_batch_index(s, a, 0, one_w, one_g)]) for a in range(one_g)
            )
            assert ranks == single


# ---- steps over epochs, resume position -----------------------------------------------------
def test_total_steps_sum_each_epochs_own_plan():
    n = 120
    data = SimpleNamespace(blocks=_blocks(n), lengths=_lengths(n, 13))
    cfg = TrainConfig(target="t", data=("d",), epochs=3, batch_size=6, group_steps=4, seed=1)
    budgeted = dataclasses.replace(cfg, max_tokens=200)
    per_epoch = [len(_plan(data, budgeted, e, 2)) // 2 for e in range(3)]
    assert per_epoch == [17, 18, 18]  # the budget makes epochs differ in length
    assert _epoch_steps_total(data, budgeted, 2, _plan(data, budgeted, 0, 2)) == 53
    fixed = len(_plan(data, cfg, 0, 2)) // 2
    assert fixed == 10  # 120 samples / (6 x 2 ranks)
    assert _epoch_steps_total(data, cfg, 2, _plan(data, cfg, 0, 2)) == 3 * fixed


def test_resume_position_gives_the_same_remaining_micro_batches():
    """A checkpoint stores (epoch, micro batches consumed); a new process replans that epoch
    and continues from there: the rest is what the uninterrupted run would have read."""
    n = 120
    data = SimpleNamespace(blocks=_blocks(n), lengths=_lengths(n, 17))
    cfg = TrainConfig(target="t", data=("d",), batch_size=6, grad_accum=2, max_tokens=200)
    world, per_step = 2, 4

    def read(epoch: int, micro_offset: int, steps: int) -> list[list[int]]:
        out: list[list[int]] = []
        while steps:
            plan = _plan(data, cfg, epoch, world)
            for s in range(micro_offset // per_step, len(plan) // per_step):
                out.extend(plan[s * per_step : (s + 1) * per_step])
                steps -= 1
                if not steps:
                    return out
            epoch, micro_offset = epoch + 1, 0
        return out

    steps0 = len(_plan(data, cfg, 0, world)) // per_step
    whole = read(0, 0, steps0 + 5)
    for stop in (3, steps0, steps0 + 2):  # mid epoch 0, at its end, inside epoch 1
        epoch, offset = (0, stop * per_step) if stop < steps0 else (1, (stop - steps0) * per_step)
        assert read(epoch, offset, steps0 + 5 - stop) == whole[stop * per_step :]


# ---- config, form, CLI ----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "512"])
def test_bad_max_tokens_is_a_config_error_with_a_fix(bad):
    with pytest.raises(ConfigError, match=r"train\.max_tokens") as exc:
        TrainConfig(target="t", data=("d",), batch_size=4, max_tokens=bad)
    assert exc.value.fix


def test_max_tokens_with_one_sample_per_micro_batch_is_a_config_error():
    with pytest.raises(ConfigError, match=r"max_tokens=4096 has no effect with batch_size=1"):
        TrainConfig(target="t", data=("d",), max_tokens=4096)


def test_key_params_gain_max_tokens_only_when_set():
    cfg = TrainConfig(target="t", data=("d",), batch_size=4)
    assert "max_tokens" not in cfg.key_params()  # existing runs keep their keys
    assert cfg.key_params()["batch_size"] == 4
    budgeted = dataclasses.replace(cfg, max_tokens=4096)
    assert budgeted.key_params() == {**cfg.key_params(), "max_tokens": 4096}
    assert TrainConfig.from_dict(budgeted.to_dict()) == budgeted


def test_form_and_cli_reach_the_config():
    from flows.cli import _section, build_parser
    from flows.params import TrainParams

    def convert(p: TrainParams) -> TrainConfig:
        return p.train_config(store_url="/s", target="/t", data=["/d"], vocab_map=None)

    assert convert(TrainParams(precision="fp32")).max_tokens is None  # the core's default
    assert convert(TrainParams(max_tokens=8192, batch_size=16)).max_tokens == 8192
    with pytest.raises(ValidationError, match="max_tokens"):
        TrainParams(max_tokens=0)
    ns = build_parser().parse_args(
        ["train", "--data", "/d", "--target", "/t", "--max-tokens", "2048", "--batch-size", "8"]
    )
    cfg = convert(_section(TrainParams, ns))
    assert (cfg.max_tokens, cfg.batch_size) == (2048, 8)


# ---- a real run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny target and the token shards of 48 samples (online training: no extraction)."""
    base = tmp_path_factory.mktemp("max_tokens")
    store = ArtifactStore(str(base / "inputs"))
    return {
        "target": make_tiny_target(str(base / "target")),
        "store": store,
        "tokens": publish_tokens(store, make_samples(48, seed=7)),
    }


@pytest.mark.slow
def test_budgeted_run_stops_resumes_and_trains_the_predicted_micro_batches(
    data: dict, tmp_path, caplog
):
    budget = 22  # samples are 8-24 tokens: up to 2 short ones, and lone 23/24-token ones
    cfg = train_config(
        {**data, "hidden": data["tokens"]},  # train_config's default data: set again below
        str(tmp_path),
        mode="online",
        data=(data["tokens"].url,),
        steps=None,
        epochs=2,
        batch_size=3,
        group_steps=3,
        max_tokens=budget,
        heldout_fraction=0.0,
        checkpoint_every=48,
    )
    ds = ShardDataset(data["store"], [data["tokens"]], hidden=False)
    plans = [_plan(ds, cfg, e, 1) for e in range(2)]
    expected = [mb for plan in plans for mb in plan]
    over = count_over_budget(plans[0], ds.lengths, budget)
    assert over == 8 and [len(p) for p in plans] == [45, 44]  # epochs differ in length

    # "crash" in epoch 1, after a checkpoint, then resume to the end
    stop = 48  # the one checkpoint before the end: inside epoch 1
    assert len(plans[0]) < stop < len(expected)
    assert train_main(cfg, stop_after_step=stop) is None
    caplog.set_level(logging.INFO, logger="eagle_core")
    store = ArtifactStore(str(tmp_path))
    ref = train_main(cfg)
    assert ref is not None
    assert f"{len(expected)} steps (starting at {stop})" in caplog.text
    assert f"({over} of them one sample longer than max_tokens)" in caplog.text
    assert any(
        r.levelno == logging.WARNING and "max_tokens" in r.getMessage() for r in caplog.records
    )
    assert ref.counts["steps"] == len(expected)
    train = [
        r for r in read_metrics(os.path.join(ref.url, "metrics.jsonl")) if r["kind"] == "train"
    ]
    assert [r["step"] for r in train] == list(range(1, len(expected) + 1))
    # every step, before and after the resume, trained exactly its planned micro batch
    assert [r["samples"] for r in train] == [len(mb) for mb in expected]
    assert [r["tokens"] for r in train] == [sum(ds.lengths[i] for i in mb) for mb in expected]
    assert [r["epoch"] for r in train] == [0] * len(plans[0]) + [1] * len(plans[1])
    assert store.is_done("train", ref.key)
