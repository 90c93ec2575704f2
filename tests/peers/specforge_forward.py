"""SpecForge 0.2.0's own EAGLE-3 training step on given inputs; runs in the specforge venv.

    python tests/peers/specforge_forward.py WORK_DIR [TTT_STEPS]

WORK_DIR holds (written by tests/eagle_core/test_specforge_peer.py):
- draft/: our `eagle3` export (with embed_tokens), loaded the way SpecForge warm-starts a
  draft: AutoDraftModelConfig.from_file, AutoDraftModel.from_config, warm_start_draft_model
  (its `from_pretrained` alone leaves the RoPE `inv_freq` buffer uninitialised under
  transformers 5.8: it is not in the checkpoint);
- target/config.json: the target's config, for SpecForge's TargetHead;
- inputs.safetensors: per sample i `input_ids.i` [n], `loss_mask.i` [n], `hidden_state.i`
  [1, n, H] (the target's final-normed last hidden state), `aux_hidden_state.i` [1, n, 3H];
  and `target_head` [V, H] (the target's lm_head weight).

The samples go through SpecForge's offline path unchanged: `normalize_offline_sample`,
`DataCollatorWithPadding`, `Eagle3TrainStrategy.forward_loss` (TargetHead.preprocess shift,
OnlineEagle3Model TTT forward, 0.8^k step weights). One substitution: `LogSoftmaxLoss` is a
Triton kernel (GPU only); SpecForge's own plain formula of it (`specforge.core.loss.
_compute_loss`: -Σ position_mask·p·log q, `.mean()` over B·T) stands in. Their
`@torch.compile` decorators run eagerly (TORCHDYNAMO_DISABLE): the same functions, no compiler.

Writes WORK_DIR/out.safetensors (`logits` [K, B, T, Vd], `plosses` [K], `loss`,
`acc_corrects` [K], `acc_denoms` [K], `grad.<name>` after loss.backward()) and
WORK_DIR/loading.json (the warm start's report).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch is imported

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main(work: str, steps: int) -> None:
    import specforge.algorithms.eagle3.model as eagle3_model
    from specforge.algorithms.eagle3.data import normalize_offline_sample
    from specforge.core.loss import _compute_loss
    from specforge.data.utils import DataCollatorWithPadding
    from specforge.modeling.auto import AutoDraftModel, AutoDraftModelConfig
    from specforge.modeling.target.target_head import TargetHead
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.model_loading import warm_start_draft_model
    from specforge.training.strategies.base import Eagle3TrainStrategy

    class PlainLogSoftmaxLoss:
        """LogSoftmaxLoss.apply(logits, target_p, position_mask) by SpecForge's own formula."""

        apply = staticmethod(_compute_loss)

    eagle3_model.LogSoftmaxLoss = PlainLogSoftmaxLoss

    source = os.path.join(work, "draft")
    config = AutoDraftModelConfig.from_file(os.path.join(source, "config.json"))
    draft = AutoDraftModel.from_config(config, attention_backend="sdpa").float()
    report = warm_start_draft_model(draft, source, draft_config=config, strategy="eagle3")
    with open(os.path.join(work, "loading.json"), "w") as fh:
        json.dump(
            {
                "class": type(draft).__name__,
                "state_keys": sorted(draft.state_dict()),
                "loaded_keys": report.loaded_keys,
                "missing_keys": list(report.missing_keys),
                "loaded_embedding": report.loaded_embedding,
            },
            fh,
            indent=2,
        )
    logits: list[torch.Tensor] = []
    compute_logits = draft.compute_logits

    def recording_compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        out = compute_logits(hidden)
        logits.append(out.detach().clone())
        return out

    draft.compute_logits = recording_compute_logits

    inputs = load_file(os.path.join(work, "inputs.safetensors"))
    head = TargetHead(os.path.join(work, "target"))  # reads the target's config.json
    with torch.no_grad():  # (its load_weights wants a sharded checkpoint's index.json)
        head.fc.weight.copy_(inputs["target_head"])
    head.freeze_weights()
    head.eval()

    n = sum(1 for k in inputs if k.startswith("input_ids."))
    features = [
        normalize_offline_sample(
            {
                "input_ids": inputs[f"input_ids.{i}"],
                "loss_mask": inputs[f"loss_mask.{i}"],
                "hidden_state": inputs[f"hidden_state.{i}"],
                "aux_hidden_state": inputs[f"aux_hidden_state.{i}"],
            },
            max_len=4096,
        )
        for i in range(n)
    ]
    batch = DataCollatorWithPadding()(features)
    model = eagle3_model.OnlineEagle3Model(draft, length=steps, attention_backend="sdpa")
    strategy = Eagle3TrainStrategy(model, target_head=head, ploss_decay=0.8)
    out = strategy.forward_loss(
        TrainBatch(
            sample_ids=[str(i) for i in range(n)],
            strategy="eagle3",
            tensors=batch,
            metadata={"target_repr": "hidden_state"},
        )
    )
    out.loss.backward()
    m = out.metrics
    result = {
        "logits": torch.stack(logits),
        "plosses": torch.stack(m["plosses"]).float(),
        "loss": out.loss.detach().float().reshape(()),
        "acc_corrects": torch.stack([c.float() for c in m["acc_corrects"]]),
        "acc_denoms": torch.stack([d.float() for d in m["acc_denoms"]]),
    }
    for name, p in draft.named_parameters():
        if p.grad is not None:
            result[f"grad.{name}"] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(work, "out.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7)
