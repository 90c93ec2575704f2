"""Feature noise (TrainConfig.feature_noise): the reference EAGLE-1 formula, config checks and
keys, noise on the draft's inputs only (never on the targets), and inline runs showing it acts
in training forwards and never in held-out evaluation."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from tiny_llama import tiny_llama_config
from train_helpers import train_config, train_inputs
from transformers import LlamaForCausalLM

from eagle_core.capture import capture_states, target_head_weight
from eagle_core.draft import DraftConfig, build_draft
from eagle_core.errors import ConfigError
from eagle_core.loss import DraftBatch, TTTConfig, compute_loss
from eagle_core.train import (
    REFERENCE_FEATURE_NOISE,
    TrainConfig,
    add_feature_noise,
    uniform_feature_noise,
)

V, T = 64, 12


def _reference_uniform_noise(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """SafeAILab/EAGLE eagle/train/main.py AddUniformNoise.__call__ on one [1, len, H] sample
    (the test oracle, written out as the reference has it)."""
    return (torch.rand_like(tensor) - 0.5) * std * 512 / tensor.shape[1]


# ---- config and key ------------------------------------------------------------------------
def test_default_is_the_reference_value_of_each_kind():
    assert REFERENCE_FEATURE_NOISE == {"eagle1": 0.2, "eagle3": 0.0}
    assert TrainConfig(target="t", data=("d",), kind="eagle1").noise_scale() == 0.2
    assert TrainConfig(target="t", data=("d",), kind="eagle3").noise_scale() == 0.0
    cfg = TrainConfig(target="t", data=("d",), kind="eagle3", feature_noise=0.05)
    assert cfg.noise_scale() == 0.05
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip keeps it


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.2", True])
def test_bad_feature_noise_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ConfigError, match=r"train\.feature_noise") as exc:
        TrainConfig(target="t", data=("d",), kind="eagle1", feature_noise=bad)
    assert exc.value.fix and "0.2" in exc.value.fix


def test_key_holds_the_noise_the_run_uses():
    def params(**kw) -> dict:
        return TrainConfig(target="t", data=("d",), **kw).key_params()

    # what is computed decides: None == the kind's reference value; no noise -> no entry
    assert params(kind="eagle1") == params(kind="eagle1", feature_noise=0.2)
    assert params(kind="eagle1")["feature_noise"] == 0.2
    assert params(kind="eagle1", feature_noise=0.3) != params(kind="eagle1")
    assert "feature_noise" not in params(kind="eagle1", feature_noise=0)
    assert "feature_noise" not in params(kind="eagle3")  # eagle3 keys are what they were
    assert params(kind="eagle3") == params(kind="eagle3", feature_noise=0.0)
    assert params(kind="eagle3", feature_noise=0.1)["feature_noise"] == 0.1


def test_run_form_and_cli_pass_it_to_the_train_config():
    import argparse

    from pydantic import ValidationError

    from flows.cli import _add_section_options, _section
    from flows.params import TrainParams

    def convert(p: TrainParams) -> TrainConfig:
        return p.train_config(store_url="/s", target="/t", data=["/d"], vocab_map=None)

    assert convert(TrainParams(precision="fp32")).feature_noise is None  # the core's default
    parser = argparse.ArgumentParser()
    _add_section_options(parser, TrainParams)
    ns = parser.parse_args(["--draft-kind", "eagle1", "--feature-noise", "0.05"])
    cfg = convert(_section(TrainParams, ns))
    assert (cfg.kind, cfg.feature_noise, cfg.noise_scale()) == ("eagle1", 0.05, 0.05)
    with pytest.raises(ValidationError, match="feature_noise"):
        TrainParams(feature_noise=-1.0)


# ---- the formula ---------------------------------------------------------------------------
def test_noise_is_the_reference_formula_per_sample():
    lengths, width, t_max = [4, 50, 0], 300, 60
    noise = uniform_feature_noise(lengths, (3, t_max, width), 0.2, [11, 12, 13], "cpu")
    assert noise.shape == (3, t_max, width) and noise.dtype == torch.float32
    for i, n in enumerate(lengths[:2]):
        torch.manual_seed(11 + i)  # the reference draws from the global generator
        want = _reference_uniform_noise(torch.zeros(1, n, width), 0.2)[0]
        torch.testing.assert_close(noise[i, :n], want, rtol=1e-6, atol=1e-7)
        half = 0.2 * 256 / n  # the half-width: wider on short samples
        assert noise[i, :n].abs().max() <= half
        assert noise[i, :n].abs().max() > 0.98 * half  # n * 300 draws fill the interval
        assert noise[i, :n].std() == pytest.approx(half / math.sqrt(3), rel=0.1)
        assert not noise[i, n:].any()  # padding gets none
    assert not noise[2].any()


def test_noise_depends_on_seed_epoch_and_sample_only():
    torch.manual_seed(0)
    last = torch.randn(2, T, 8)
    att = torch.ones(2, T, dtype=torch.long)
    att[1, 7:] = 0
    batch = DraftBatch(input_ids=att * 3, attention_mask=att, loss_mask=att, last_hidden=last)

    def noisy(ids, seed=0, epoch=0):
        return add_feature_noise(batch, ids, 0.2, seed=seed, epoch=epoch).input_last_hidden

    a = noisy(["x", "y"])
    assert torch.equal(a, noisy(["x", "y"]))  # deterministic
    assert not torch.equal(a, noisy(["x", "y"], seed=1))
    assert not torch.equal(a, noisy(["x", "y"], epoch=1))  # fresh noise every epoch
    # a sample's noise does not depend on its batch neighbour
    assert torch.equal(a[0], noisy(["x", "z"])[0]) and not torch.equal(a[1], noisy(["x", "z"])[1])
    assert torch.equal(a[1, 7:], last[1, 7:])  # padding untouched
    assert add_feature_noise(batch, ["x", "y"], 0.0, seed=0, epoch=0) is batch


# ---- inputs only, never targets ------------------------------------------------------------
@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(V, initializer_range=0.2)).eval()


def _batch(target: LlamaForCausalLM, kind: str) -> DraftBatch:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2, T), generator=g)
    att = torch.ones(2, T, dtype=torch.long)
    att[1, 8:] = 0
    st = capture_states(target, x * att, att)
    return DraftBatch(
        input_ids=x * att,
        attention_mask=att,
        loss_mask=att.clone(),
        last_hidden=st.last,
        aux_hidden=st.aux if kind == "eagle3" else None,
    )


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_noise_reaches_the_draft_inputs_and_never_the_targets(target, kind: str):
    vd = V if kind == "eagle1" else 32
    vmap = None
    if kind == "eagle3":
        ids = torch.arange(0, V, 2)
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[ids] = True
        vmap = type("Map", (), {"d2t": ids - torch.arange(vd), "t2d": t2d})
    cfg = DraftConfig.from_target_config(target.config, kind=kind, draft_vocab_size=vd)
    torch.manual_seed(2)
    draft = build_draft(cfg, target_model=target, vocab_map=vmap).train()
    head = target_head_weight(target)
    ttt = TTTConfig(steps=2)
    clean = _batch(target, kind)
    noisy = add_feature_noise(clean, ["a", "b"], 0.2, seed=0, epoch=0)
    # the clean states stay in place: they are the target distribution (and EAGLE-1's
    # regression targets); only what feeds the draft changed
    assert noisy.last_hidden is clean.last_hidden
    fed = noisy.aux_hidden if kind == "eagle3" else noisy.input_last_hidden
    was = clean.aux_hidden if kind == "eagle3" else clean.last_hidden
    assert (fed - was).abs().max() > 0.5  # 0.2 * 256 / 12 = 4.3 half-width
    if kind == "eagle1":
        assert noisy.aux_hidden is None
    else:
        assert noisy.input_last_hidden is None

    out_clean = compute_loss(draft, clean, head, ttt)
    out_noisy = compute_loss(draft, noisy, head, ttt)
    assert float(out_noisy.loss.detach()) != pytest.approx(float(out_clean.loss.detach()), rel=1e-3)
    assert out_noisy.step_count == out_clean.step_count  # same targets, same weights
    # feeding the clean states explicitly is the clean forward, bit for bit
    same = dataclasses.replace(clean, input_last_hidden=clean.last_hidden)
    assert torch.equal(compute_loss(draft, same, head, ttt).loss, out_clean.loss)
    if kind == "eagle1":
        # noisy targets too (what must not happen) would be another loss again
        all_noisy = dataclasses.replace(clean, last_hidden=noisy.input_last_hidden)
        out_all = compute_loss(draft, all_noisy, head, ttt)
        assert float(out_all.loss.detach()) != pytest.approx(
            float(out_noisy.loss.detach()), rel=1e-3
        )


# ---- inline runs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_inputs(tmp_path_factory.mktemp("noise"))


@pytest.mark.slow  # two 8-step inline DeepSpeed runs (~20 s on 2 busy cores)
def test_eagle1_trains_with_noise_and_evaluation_sees_none(data: dict, tmp_path):
    from eagle_core.metrics import read_metrics
    from eagle_core.train import run_training
    from storage import ArtifactStore

    def run(**kw):
        cfg = train_config(data, str(tmp_path), kind="eagle1", steps=8, eval_every=4, lr=1e-2, **kw)
        ref = run_training(ArtifactStore(str(tmp_path)), cfg)
        recs = read_metrics(os.path.join(ref.url, "metrics.jsonl"))
        return (
            ref,
            [r for r in recs if r["kind"] == "train"],
            [r for r in recs if r["kind"] == "eval"],
        )

    ref_noisy, train_noisy, eval_noisy = run()  # the eagle1 default: the reference's 0.2
    ref_clean, train_clean, eval_clean = run(feature_noise=0.0)
    assert ref_noisy.key != ref_clean.key
    # same seed, same initial draft: the untrained held-out evaluation is identical (no noise
    # there), the first training step's loss is not (noise in the training forward)
    assert eval_noisy[0]["step"] == eval_clean[0]["step"] == 0
    assert eval_noisy[0]["loss"] == eval_clean[0]["loss"]
    assert eval_noisy[0]["step_acc"] == eval_clean[0]["step_acc"]
    assert train_noisy[0]["loss"] != pytest.approx(train_clean[0]["loss"], rel=1e-4)
    # and the noisy run still learns
    losses = [r["loss"] for r in eval_noisy]
    assert [r["step"] for r in eval_noisy] == [0, 4, 8]
    assert losses[-1] < 0.99 * losses[0], losses
