"""speculators' own loader and forward on one of our `speculators` exports.

Runs INSIDE the speculators venv (`.ci/engine-venv speculators`: speculators 0.9.0, its
transformers <= 5.19, torch 2.13.0), as a separate program: it imports nothing of this
project. tests/eagle_core/test_speculators_peer.py drives it.

    python speculators_forward.py EXPORT_DIR INPUTS.safetensors OUT.safetensors

EXPORT_DIR is loaded with `SpeculatorModel.from_pretrained(EXPORT_DIR)` and nothing else:
the verifier (whose lm_head / norm / layer count speculators reads) comes from the export's
own `speculators_config.verifier.name_or_path`.

INPUTS holds `aux` [1, T, A*H] float32 (the target's aux-layer states), `input_ids` [1, T]
int64 (the token after each state) and `position_ids` [1, T] int64. OUT receives `logits`
[1, T, Vd] (the first TTT step's lm_head output, draft vocab), `draft_tokens` [1, T] (its
argmax, as speculators returns it) and `embed_tokens` [V, H] (as loaded). The last stdout
line is a JSON summary.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def main(export_dir: str, inputs_path: str, out_path: str) -> None:
    from importlib.metadata import version

    from speculators import SpeculatorModel

    x = load_file(inputs_path)
    model = SpeculatorModel.from_pretrained(export_dir).float().eval()
    logits: list[torch.Tensor] = []
    # the forward returns argmax tokens only; the logits are the lm_head's output
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    with torch.no_grad():
        tokens = model(
            hidden_states=x["aux"],
            input_ids=x["input_ids"],
            document_ids=torch.zeros_like(x["input_ids"]),  # one document: plain causal
            position_ids=x["position_ids"],
            ttt_steps=1,
        )
    hook.remove()
    save_file(
        {
            "logits": logits[0].float().contiguous(),
            "draft_tokens": tokens[0].contiguous(),
            "embed_tokens": model.embed_tokens.weight.detach().float().contiguous(),
        },
        out_path,
    )
    print(
        json.dumps(
            {
                "speculators": version("speculators"),
                "class": type(model).__name__,
                "verifier": model.config.speculators_config.verifier.name_or_path,
                "attn_implementation": model._attn_impl,  # noqa: SLF001
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
