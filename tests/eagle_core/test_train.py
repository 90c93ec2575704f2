"""Training: config checks, DeepSpeed config merge/validation, online == offline loss, inline
DeepSpeed runs that lower the loss, NaN stops, and a SIGKILLed run resuming to the same weights.

Multi-process runs are in test_launch.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, make_samples, publish_corrupt_hidden, train_config, train_inputs

from eagle_core import checkpoint as ckpt
from eagle_core.errors import ConfigError, TrainingError
from eagle_core.metrics import read_metrics
from eagle_core.train import (
    FINAL_CONFIG,
    FINAL_WEIGHTS,
    TrainConfig,
    build_deepspeed_config,
    lr_lambda,
    run_directory,
    run_training,
    train_key,
)
from storage import ArtifactStore


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny target, its token shards, real extract_hidden shards (48 samples), a vocab map."""
    base = tmp_path_factory.mktemp("train")
    inputs = train_inputs(base)
    from eagle_core.vocab import VocabConfig, scan_vocab

    vocab_cfg = VocabConfig(draft_vocab_size=40, target_vocab_size=96)
    return {
        **inputs,
        "base": base,
        "vocab": scan_vocab(inputs["store"], inputs["tokens"], vocab_cfg),
    }


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(lr=0.0), "train.lr"),
        (dict(data=()), "train.data"),
        (dict(kind="eagle2"), "train.kind"),
        (dict(kind="eagle1", vocab_map="/x/scan_vocab/k"), "train.vocab_map"),
        (dict(zero_stage=4), "train.zero_stage"),
        (dict(batch_size=0), "train.batch_size"),
        (dict(heldout_fraction=1.0), "train.heldout_fraction"),
        (dict(deepspeed_config="/no/such/ds.json"), "train.deepspeed_config"),
    ],
)
def test_config_errors_name_the_field(kw: dict, field: str):
    base = dict(target="t", data=("/r/extract_hidden/k",))
    base.update(kw)
    with pytest.raises(ConfigError, match=re.escape(field)):
        TrainConfig(**base)


def test_config_json_round_trip_and_unknown_fields():
    cfg = TrainConfig(target="t", data=["/r/extract_hidden/k"], aux_layer_ids=[1, 3, 4])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown fields.*'lr_typo'"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr_typo": 1})


def test_key_ignores_how_a_run_is_observed(data: dict, tmp_path):
    store = ArtifactStore(str(tmp_path))
    cfg = train_config(data, str(tmp_path))
    same = dataclasses.replace(cfg, checkpoint_every=3, eval_every=2, log_every=5, store="/x")
    assert train_key(store, cfg) == train_key(store, same)
    assert train_key(store, cfg) != train_key(store, dataclasses.replace(cfg, lr=2e-2))
    assert train_key(store, cfg) != train_key(store, dataclasses.replace(cfg, seed=4))


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(target="t", data=("/r/s/k",), warmup_steps=4, min_lr_ratio=0.1)
    fn = lr_lambda(cfg, total_steps=20)
    warm = [fn(s) for s in range(5)]
    assert warm == sorted(warm) and warm[0] > 0 and fn(4) == pytest.approx(1.0)
    assert fn(12) < fn(8) and fn(20) == pytest.approx(0.1)


@pytest.mark.slow  # imports DeepSpeed's config parser (~10 s)
def test_deepspeed_config_merge_and_validation(tmp_path):
    def cfg_with(doc: object | str) -> TrainConfig:
        p = tmp_path / "ds.json"
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return TrainConfig(target="t", data=("/r/s/k",), deepspeed_config=str(p), batch_size=2)

    conf = build_deepspeed_config(
        cfg_with({"zero_optimization": {"overlap_comm": False}, "train_batch_size": "auto"}), 2
    )
    assert conf["train_micro_batch_size_per_gpu"] == 2 and conf["gradient_clipping"] == 0.5
    assert conf["zero_optimization"] == {"overlap_comm": False, "stage": 0}
    assert conf["optimizer"]["params"]["torch_adam"] is True  # no fused-Adam JIT build
    assert conf["optimizer"]["params"]["betas"] == [0.9, 0.95]

    with pytest.raises(ConfigError, match=r"unknown keys \['zero_optimisation'\]"):
        build_deepspeed_config(cfg_with({"zero_optimisation": {"stage": 2}}), 1)
    with pytest.raises(ConfigError, match="rejected by DeepSpeed.*stagee"):
        build_deepspeed_config(cfg_with({"zero_optimization": {"stagee": 2}}), 1)
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        build_deepspeed_config(cfg_with('{"bf16": {"enabled": true},}'), 1)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 conflicts"):
        build_deepspeed_config(cfg_with({"train_micro_batch_size_per_gpu": 8}), 1)
    with pytest.raises(ConfigError, match="train_batch_size=3"):
        build_deepspeed_config(cfg_with({"train_batch_size": 3}), 2)
    with pytest.raises(ConfigError, match="fp16"):
        build_deepspeed_config(cfg_with({"fp16": {"enabled": True}}), 1)


# ---- online == offline ----------------------------------------------------------------------
def test_online_and_offline_give_the_same_loss(data: dict):
    """The same batch: states read from extract_hidden shards vs the target run in the step."""
    from eagle_core.loss import compute_loss
    from eagle_core.train import build_models, resolve_inputs, to_draft_batch
    from eagle_core.train_data import ShardDataset, collate

    store = data["store"]
    offline = train_config(data, store.root)
    online = dataclasses.replace(offline, mode="online", data=(data["tokens"].url,))
    dev = torch.device("cpu")
    set_off = build_models(store, offline, resolve_inputs(store, offline), dev)
    set_on = build_models(store, online, resolve_inputs(store, online), dev)
    assert set_off.target is None and set_on.target is not None  # offline frees the target
    hid = ShardDataset(store, [data["hidden"]], hidden=True)
    tok = ShardDataset(store, [data["tokens"]], hidden=False)
    pos = {sid: i for i, sid in enumerate(tok.sample_ids)}
    idx = [0, 5, 9, 17]  # different lengths: padding is exercised
    b_off = collate([hid[i] for i in idx], torch.float32)
    b_on = collate([tok[pos[hid.sample_ids[i]]] for i in idx], torch.float32)
    assert b_off.aux_hidden is not None and b_on.aux_hidden is None
    d_off = to_draft_batch(b_off, set_off, offline, dev, torch.float32)
    d_on = to_draft_batch(b_on, set_on, online, dev, torch.float32)
    real = d_off.attention_mask.bool()
    diff = (d_off.aux_hidden - d_on.aux_hidden)[real].abs()
    # both are the target's states rounded to bf16: equal up to a rare last-bit flip
    assert (diff > 0).float().mean() < 0.01
    torch.manual_seed(0)
    draft = set_off.draft  # one draft for both (same seed built set_on.draft equal anyway)
    for p, q in zip(set_off.draft.parameters(), set_on.draft.parameters(), strict=True):
        assert torch.equal(p, q)
    ttt = offline.ttt()
    l_off = compute_loss(draft, d_off, set_off.head, ttt)
    l_on = compute_loss(draft, d_on, set_on.head, ttt)
    assert float(l_off.loss.detach()) == pytest.approx(float(l_on.loss.detach()), rel=1e-3)
    assert l_off.step_count == l_on.step_count


# ---- inline DeepSpeed runs ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind,mode", [("eagle3", "offline"), ("eagle1", "online")])
def test_inline_run_lowers_the_loss_and_publishes(data: dict, tmp_path, kind: str, mode: str):
    src = data["hidden"] if mode == "offline" else data["tokens"]
    vocab = data["vocab"].url if kind == "eagle3" else None  # a real scan_vocab map (Vd=40)
    cfg = train_config(
        data,
        str(tmp_path),
        vocab_map=vocab,
        lr=3e-2 if kind == "eagle3" else 1e-2,  # the 40-token head learns slower
        kind=kind,
        mode=mode,
        data=(src.url,),
        steps=16,
        eval_every=8,
        checkpoint_every=8,
    )
    store = ArtifactStore(str(tmp_path))
    ref = run_training(store, cfg)
    files = store.list_files(ref)
    for name in (
        FINAL_WEIGHTS,
        FINAL_CONFIG,
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
        "checkpoints/step-00000016/complete.json",
    ):
        assert name in files
    evals = [r for r in read_metrics(os.path.join(ref.url, "metrics.jsonl")) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16]
    losses = [r["loss"] for r in evals]
    assert losses[2] < losses[1] < losses[0] and losses[2] < 0.99 * losses[0], losses
    assert len(evals[-1]["step_acc"]) == 3
    assert ref.counts["steps"] == 16 and ref.counts["heldout_loss"] == evals[-1]["loss"]
    train = [
        r for r in read_metrics(os.path.join(ref.url, "metrics.jsonl")) if r["kind"] == "train"
    ]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in train)
    sd = load_file(os.path.join(ref.url, FINAL_WEIGHTS))
    assert all(v.dtype == torch.float32 for k, v in sd.items() if k not in ("d2t", "t2d"))
    if kind == "eagle3":
        assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "d2t", "t2d"} <= set(sd)
        from eagle_core.vocab import load_vocab_map

        vmap = load_vocab_map(data["vocab"].url, str(tmp_path / "vm"))
        assert torch.equal(sd["d2t"], torch.as_tensor(vmap.d2t).long())
        assert torch.equal(sd["t2d"], torch.as_tensor(vmap.t2d).bool())
        assert sd["lm_head.weight"].shape == (40, 32)
    draft_cfg = json.loads(open(os.path.join(ref.url, FINAL_CONFIG)).read())
    assert draft_cfg["kind"] == kind
    meta = store.manifest("train", ref.key).meta
    assert meta["mode"] == mode and meta["kind"] == kind
    assert run_training(store, cfg).key == ref.key  # cached: returns without training


@pytest.mark.slow
def test_nan_loss_stops_naming_the_samples_and_keeps_the_last_checkpoint(data: dict, tmp_path):
    from eagle_core.train_data import ShardDataset, plan_epoch

    store = data["store"]
    cfg = train_config(data, str(tmp_path), heldout_fraction=0.0, steps=24, checkpoint_every=1)
    # corrupting a sample changes values, not the layout: find the sample read at step 5
    probe = publish_corrupt_hidden(store, data["hidden"], make_samples(48, seed=7)[0]["sample_id"])
    ds = ShardDataset(store, [probe], hidden=False)
    plan = plan_epoch(
        ds.blocks,
        ds.lengths,
        epoch=0,
        seed=cfg.seed,
        micro_batch_size=2,
        world_size=1,
        grad_accum=1,
        group_steps=cfg.group_steps,
    )
    bad = ds.sample_ids[plan[4][1]]
    corrupt = publish_corrupt_hidden(store, data["hidden"], bad)
    cfg = dataclasses.replace(cfg, data=(corrupt.url,))
    with pytest.raises(TrainingError, match=re.escape(bad)) as exc:
        run_training(ArtifactStore(str(tmp_path)), cfg)
    assert "at step 5 " in str(exc.value)
    store2 = ArtifactStore(str(tmp_path))
    key = train_key(store2, cfg)
    assert not store2.is_done("train", key)
    latest = ckpt.find_latest_complete(run_directory(store2, key))
    assert latest is not None and latest.endswith(ckpt.checkpoint_tag(4))


# ---- resume after SIGKILL -------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(data: dict, tmp_path, caplog, capsys):
    killed_root, clean_root = str(tmp_path / "killed"), str(tmp_path / "clean")
    cfg = train_config(
        data, killed_root, steps=8, checkpoint_every=2, heldout_fraction=0.0, keep_checkpoints=3
    )
    store = ArtifactStore(killed_root)
    key = train_key(store, cfg)
    run_dir = run_directory(store, key)
    cfg_path = str(tmp_path / "train.json")
    with open(cfg_path, "w") as fh:
        json.dump(cfg.to_dict(), fh)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eagle_core.train",
                "--config",
                cfg_path,
                "--step-delay-s",
                "1.0",
            ],
            cwd=REPO,
            env=env,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
        marker = os.path.join(run_dir, "checkpoints", "step-00000004", ckpt.COMPLETE)
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 4 within 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not store.is_done("train", key)
    # an incomplete newer checkpoint (killed mid-save) must be ignored
    latest = ckpt.find_latest_complete(run_dir)
    fake = os.path.join(run_dir, "checkpoints", "step-00000007")
    shutil.copytree(latest, fake)
    os.remove(os.path.join(fake, ckpt.COMPLETE))

    caplog.set_level("INFO", logger="eagle_core.checkpoint")
    resumed = run_training(store, cfg)
    assert f"resumed from {latest}" in caplog.text
    clean = run_training(ArtifactStore(clean_root), dataclasses.replace(cfg, store=clean_root))
    assert clean.key == resumed.key
    a = load_file(os.path.join(resumed.url, FINAL_WEIGHTS))
    b = load_file(os.path.join(clean.url, FINAL_WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = [
        r["step"]
        for r in read_metrics(os.path.join(resumed.url, "metrics.jsonl"))
        if r["kind"] == "train"
    ]
    assert steps == list(range(1, 9))  # the killed run's extra records were dropped

    from eagle_core.train import main

    capsys.readouterr()
    assert main(["--config", cfg_path]) == 0  # finished: the CLI prints the URL, cached
    assert capsys.readouterr().out.strip().splitlines()[-1] == resumed.url


# ---- remote store (S3 API on loopback) ------------------------------------------------------
@pytest.mark.slow
def test_s3_run_uploads_checkpoints_and_resumes_on_a_fresh_machine(
    data: dict, tmp_path, s3_root: str, monkeypatch, caplog
):
    from eagle_core.train import train_main

    monkeypatch.setenv("EAGLE_TRAIN_STAGING", str(tmp_path / "machine-1"))
    cfg = train_config(data, s3_root, steps=8, checkpoint_every=4, heldout_fraction=0.0)
    assert train_main(cfg, stop_after_step=4) is None  # "crashed" right after step 4
    store = ArtifactStore(s3_root)
    key = train_key(store, cfg)
    remote = store.path("train", key, f"checkpoints/step-00000004/{ckpt.COMPLETE}")
    assert store.fs.exists(remote) and not store.is_done("train", key)

    monkeypatch.setenv("EAGLE_TRAIN_STAGING", str(tmp_path / "machine-2"))  # empty disk
    caplog.set_level("INFO", logger="eagle_core.checkpoint")
    ref = run_training(store, cfg)
    assert "downloaded checkpoint step-00000004" in caplog.text
    assert "resumed from" in caplog.text
    files = store.list_files(ref)
    assert FINAL_WEIGHTS in files and "checkpoints/step-00000008/complete.json" in files
    assert not os.path.exists(run_directory(store, key))  # staging freed after publishing
    local_root = str(tmp_path / "local")
    clean = run_training(ArtifactStore(local_root), dataclasses.replace(cfg, store=local_root))
    with tempfile.TemporaryDirectory() as tmp:
        a = load_file(store.local_copy(ref, FINAL_WEIGHTS, tmp))
    b = load_file(os.path.join(clean.url, FINAL_WEIGHTS))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
