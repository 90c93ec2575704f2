"""Launching: command lines, hostfiles, failing-rank errors, config errors before any process
starts, and real 2-process DeepSpeed runs (deepspeed launcher and torchrun) on gloo/CPU."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_samples, publish_corrupt_hidden, train_config, train_inputs

from eagle_core import launch
from eagle_core.errors import ConfigError, TrainingError
from eagle_core.launch import build_command, hostfile_slots, launch_training, run_command
from eagle_core.metrics import read_metrics
from eagle_core.train import FINAL_WEIGHTS
from storage import ArtifactStore


def test_deepspeed_and_torchrun_command_lines(tmp_path):
    ds = build_command("/c.json", 4, "deepspeed", master_port=29123, python="py")
    assert ds == [
        "py",
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "4",
        "--master_port",
        "29123",
        "--module",
        "eagle_core.train",
        "--config",
        "/c.json",
    ]
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    multi = build_command("/c.json", 8, "deepspeed", hostfile=str(hf), python="py")
    assert multi[3:5] == ["--hostfile", str(hf)] and "--num_gpus" not in multi
    assert hostfile_slots(str(hf)) == 16
    tr = build_command("/c.json", 2, "torchrun", python="py")
    assert tr == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "eagle_core.train",
        "--config",
        "/c.json",
    ]
    with pytest.raises(ConfigError, match="hostfile was given with launcher='torchrun'"):
        build_command("/c.json", 2, "torchrun", hostfile=str(hf))
    with pytest.raises(ConfigError, match="launcher='mpirun' is unknown"):
        build_command("/c.json", 2, "mpirun")  # type: ignore[arg-type]
    hf.write_text("node-a slots=eight\n")
    with pytest.raises(ConfigError, match=r"hosts:1: 'node-a slots=eight'"):
        hostfile_slots(str(hf))


def test_failure_names_the_rank_that_failed_first(tmp_path):
    script = tmp_path / "fake_ranks.py"
    script.write_text(
        "import sys\n"
        "print('[rank 0] 12:00:00 INFO eagle_core.train: step 1')\n"
        "print('[rank 1] 12:00:01 ERROR eagle_core.train: FAILED (caused by another rank)')\n"
        "print('[rank 1] eagle_core.train.PeerFailure: non-finite loss on another rank')\n"
        "for i in range(30):\n"
        "    print(f'[rank 0] filler {i}')\n"
        "print('[rank 0] 12:00:01 ERROR __main__: FAILED')\n"
        "print('[rank 0] Traceback (most recent call last):')\n"
        "print(\"[rank 0] eagle_core.errors.TrainingError: non-finite loss on samples ['x']\")\n"
        "print('launcher: exiting')\n"
        "sys.exit(3)\n"
    )
    with pytest.raises(TrainingError) as exc:
        run_command([sys.executable, str(script)], launcher="torchrun", nproc=2)
    msg = str(exc.value)
    assert "exited with code 3" in msg and "rank 0 failed (then ranks [1])" in msg
    assert "samples ['x']" in msg and "filler 29" in msg
    assert "filler 10" not in msg  # only the last 20 lines of that rank
    assert "PeerFailure" not in msg


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_inputs(tmp_path_factory.mktemp("launch"))


_cfg = functools.partial(train_config, steps=6, seed=5)  # the launch runs: 6 steps, seed 5


def _no_process(*_a, **_k):
    raise AssertionError("a training process was started")


@pytest.mark.slow  # imports DeepSpeed's config parser
def test_broken_deepspeed_config_fails_before_any_process(data: dict, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_command", _no_process)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_clipp": 1.0}))
    cfg = _cfg(data, str(tmp_path), deepspeed_config=str(bad))
    with pytest.raises(ConfigError, match=r"unknown keys \['gradient_clipp'\]"):
        launch_training(cfg, nproc=2, launcher="deepspeed")
    bad.write_text('{"zero_optimization": {"stage": 0}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        launch_training(cfg, nproc=2, launcher="torchrun")
    unfinished = dataclasses.replace(
        cfg, deepspeed_config=None, data=(str(tmp_path / "x" / "extract_hidden" / "k"),)
    )
    with pytest.raises(ConfigError, match="has no manifest"):
        launch_training(unfinished, nproc=2, launcher="deepspeed")


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
    data: dict, tmp_path, monkeypatch
):
    root = str(tmp_path)
    two = _cfg(data, root, zero_stage=1, eval_every=3)  # 2 ranks x 2 samples, ZeRO-1
    one = dataclasses.replace(two, grad_accum=2, zero_stage=0)  # 1 rank x 2 x 2 accumulated
    ref2 = launch_training(two, nproc=2, launcher="deepspeed")
    ref1 = launch_training(one, nproc=1, launcher="inline")
    assert ref2.key != ref1.key
    assert ref2.counts["samples_seen"] == ref1.counts["samples_seen"] == 24
    assert ArtifactStore(root).manifest("train", ref2.key).meta["world_size"] == 2
    w2 = load_file(os.path.join(ref2.url, FINAL_WEIGHTS))
    w1 = load_file(os.path.join(ref1.url, FINAL_WEIGHTS))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    for ref in (ref1, ref2):
        evals = [
            r["loss"]
            for r in read_metrics(os.path.join(ref.url, "metrics.jsonl"))
            if r["kind"] == "eval"
        ]
        assert len(evals) == 3 and evals[-1] < evals[0], evals
    monkeypatch.setattr(launch, "run_command", _no_process)
    assert launch_training(two, nproc=2, launcher="deepspeed").key == ref2.key  # cached


@pytest.mark.slow
def test_torchrun_failure_reports_the_failing_rank(data: dict, tmp_path):
    bad = make_samples(48, seed=7)[3]["sample_id"]
    corrupt = publish_corrupt_hidden(data["store"], data["hidden"], bad)
    cfg = _cfg(data, str(tmp_path), data=(corrupt.url,), heldout_fraction=0.0, steps=24)
    with pytest.raises(TrainingError) as exc:
        launch_training(cfg, nproc=2, launcher="torchrun")
    msg = str(exc.value)
    assert "torchrun on 2 process(es) exited with code" in msg
    assert bad in msg and "non-finite loss" in msg
    assert "rank 0 failed" in msg or "rank 1 failed" in msg
