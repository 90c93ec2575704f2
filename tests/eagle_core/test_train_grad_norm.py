"""The logged `grad_norm` is the global gradient norm before clipping: read from DeepSpeed
(get_global_grad_norm) where it reports one (ZeRO 1-3, bf16), computed by the loop where it
does not (fp32 ZeRO 0). Checked against a plain PyTorch loop on the same batches."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import plain_torch_loop, train_config, train_inputs

from storage import ArtifactStore


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_inputs(tmp_path_factory.mktemp("grad-norm"))


@pytest.mark.slow  # an inline DeepSpeed run per case (~6 s each on 2 busy cores)
@pytest.mark.parametrize(
    "zero_stage,grad_accum",
    [(0, 2), (1, 1)],
    ids=["zero0-own-norm-accum2", "zero1-deepspeed-norm"],
)
def test_logged_grad_norm_is_the_pre_clip_norm(data: dict, tmp_path, zero_stage, grad_accum):
    from eagle_core import train as T
    from eagle_core.metrics import read_metrics

    cfg = train_config(
        data,
        str(tmp_path / "out"),
        steps=3,
        zero_stage=zero_stage,
        grad_accum=grad_accum,
        lr=2e-2,
        grad_clip=0.2,  # small enough to clip: the logged norm must be the one before
        heldout_fraction=0.0,
        ttt_steps=2,
    )
    store = ArtifactStore(cfg.store)
    ref = T.run_training(store, cfg)
    records = [r for r in read_metrics(os.path.join(ref.url, "metrics.jsonl"))]
    real_sd = load_file(os.path.join(ref.url, T.FINAL_WEIGHTS))
    losses, norms, bare_sd = plain_torch_loop(store, cfg)

    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-5)
    assert min(norms) > cfg.grad_clip  # every step clipped: a post-clip norm would be 0.2
    assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-5)
    for k, v in bare_sd.items():
        torch.testing.assert_close(real_sd[k], v.float() if v.is_floating_point() else v)
