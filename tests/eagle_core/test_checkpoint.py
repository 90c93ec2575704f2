"""Checkpoints: completion markers, latest-complete selection, pruning, a real DeepSpeed
save/load round trip (weights, optimizer, scheduler, RNG), and remote upload/download."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import train_helpers  # noqa: F401  (TORCH_EXTENSIONS_DIR: the shm op is built once)

from eagle_core import checkpoint as ckpt
from eagle_core.errors import TrainingError
from storage import ArtifactStore


def _fake_checkpoint(run_dir: str, step: int, complete: bool = True) -> str:
    path = os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.checkpoint_tag(step))
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as fh:
        fh.write(os.urandom(64))
    with open(os.path.join(path, ckpt.TRAINER_STATE), "w") as fh:
        json.dump({"step": step}, fh)
    if complete:
        files = [
            {"name": n, "size": os.path.getsize(os.path.join(path, n))}
            for n in sorted(os.listdir(path))
        ]
        with open(os.path.join(path, ckpt.COMPLETE), "w") as fh:
            json.dump({"step": step, "files": files}, fh)
    return path


def test_only_complete_checkpoints_count(tmp_path):
    run = str(tmp_path)
    assert ckpt.find_latest_complete(run) is None
    p2 = _fake_checkpoint(run, 2)
    p4 = _fake_checkpoint(run, 4)
    _fake_checkpoint(run, 6, complete=False)  # killed while saving
    assert ckpt.is_complete(p2) and ckpt.is_complete(p4)
    assert ckpt.find_latest_complete(run) == p4
    with open(os.path.join(p4, "weights.bin"), "ab") as fh:  # size differs from the marker
        fh.write(b"x")
    assert not ckpt.is_complete(p4)
    assert ckpt.find_latest_complete(run) == p2
    os.remove(os.path.join(p2, "weights.bin"))  # a listed file is gone
    assert ckpt.find_latest_complete(run) is None


def test_prune_keeps_newest_complete_and_in_progress(tmp_path):
    run = str(tmp_path)
    for s in (1, 2, 3):
        _fake_checkpoint(run, s)
    in_progress = _fake_checkpoint(run, 4, complete=False)
    removed = ckpt.prune_checkpoints(run, keep=2)
    assert [os.path.basename(p) for p in removed] == ["step-00000001"]
    left = [os.path.basename(p) for _s, p in ckpt.list_checkpoints(run)]
    assert left == ["step-00000002", "step-00000003", "step-00000004"]
    assert os.path.isdir(in_progress)


@pytest.fixture(scope="module")
def engine_factory():
    import deepspeed

    from eagle_core.train import init_distributed

    init_distributed()

    def make(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        conf = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.5,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=conf,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)),
        )
        return engine

    return make


def _train(engine, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(2, 6)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()


@pytest.mark.slow  # DeepSpeed import + engine
def test_deepspeed_round_trip_restores_everything(tmp_path, engine_factory):
    run = str(tmp_path)
    a = engine_factory(seed=0)
    torch.manual_seed(5)
    _train(a, 3)
    state = ckpt.TrainerState(step=3, epoch=1, micro_offset=6, samples_seen=6, tokens_seen=60)
    random.seed(11)
    np.random.seed(11)
    path = ckpt.save_checkpoint(a, run, state)
    assert ckpt.is_complete(path)
    marker = json.load(open(os.path.join(path, ckpt.COMPLETE)))
    names = {f["name"] for f in marker["files"]}
    assert {"rng_rank0.pt", ckpt.TRAINER_STATE} <= names
    assert any(n.endswith("model_states.pt") for n in names)
    saved_torch_rng = torch.get_rng_state()
    expect_rng = (random.random(), float(np.random.rand()), torch.rand(1).item())
    torch.set_rng_state(saved_torch_rng)
    _train(a, 2)  # the uninterrupted continuation
    want = [p.detach().clone() for p in a.module.parameters()]

    b = engine_factory(seed=1)  # different init: everything must come from the checkpoint
    random.seed(0)
    got_state = ckpt.load_checkpoint(b, ckpt.find_latest_complete(run))
    assert got_state == state
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expect_rng
    assert b.lr_scheduler.last_epoch == a.lr_scheduler.last_epoch - 2
    torch.set_rng_state(saved_torch_rng)
    _train(b, 2)
    for p, q in zip(b.module.parameters(), want, strict=True):
        assert torch.equal(p.detach(), q)  # optimizer moments and lr schedule restored

    os.remove(os.path.join(path, ckpt.COMPLETE))
    with pytest.raises(TrainingError, match="incomplete"):
        ckpt.load_checkpoint(b, path)


def test_remote_upload_then_download(tmp_path):
    store = ArtifactStore("memory://ckpt-test/root")
    local = str(tmp_path / "a")
    p3 = _fake_checkpoint(local, 3)
    ckpt.upload_checkpoint(store, "train", "k1", p3)
    p5 = _fake_checkpoint(local, 5)
    ckpt.upload_checkpoint(store, "train", "k1", p5)
    # a remote checkpoint without its marker (upload killed) is never picked
    store.fs.rm(store.path("train", "k1", f"{ckpt.CHECKPOINTS}/step-00000005/{ckpt.COMPLETE}"))
    fresh = str(tmp_path / "b")
    got = ckpt.download_latest_checkpoint(store, "train", "k1", fresh)
    assert got is not None and os.path.basename(got) == "step-00000003"
    assert ckpt.is_complete(got)
    with (
        open(os.path.join(got, "weights.bin"), "rb") as f1,
        open(os.path.join(p3, "weights.bin"), "rb") as f2,
    ):
        assert f1.read() == f2.read()
    assert ckpt.download_latest_checkpoint(store, "train", "nothing", fresh) is not None
