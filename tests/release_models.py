"""Targets and drafts whose speculative acceptance is known exactly (release tests).

`constant_target(c)`: the small test target edited so that greedy decoding emits token `c`
at every position. One residual dimension is set to a large constant in every embedding
and no layer writes to it (its rows of `o_proj` and `down_proj` are zero), so after the
final RMSNorm that dimension is ~sqrt(H) everywhere and the rest ~0; the LM head reads that
dimension only for `c`. `constant_draft(c)`: an exported EAGLE-3 draft whose LM head is
zero (argmax = draft row 0) and whose draft vocab starts at target id `c`, so it always
proposes `c`.

On `constant_target(c)`, `constant_draft(c)` accepts every proposal (τ = 1 + steps, a little
less for the round cut by max_new_tokens) and any other constant draft none (τ = 1.0):
"the old release's τ falls on a new target" and "a worse draft is kept out" are measured.
"""

from __future__ import annotations

import torch

from storage import ArtifactStore, StageRef

STEPS = 3  # draft tokens per round in the release tests' evaluations
_DIM = 0  # the residual dimension held constant


def constant_target(small_target_dir: str, out: str, token: int) -> str:
    """Save the edited target under `out` (an HF model dir); returns `out`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_target_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, _DIM] = 1e4  # dominates every RMSNorm
        for layer in model.model.layers:  # nothing writes into that dimension
            layer.self_attn.o_proj.weight[_DIM, :] = 0
            layer.mlp.down_proj.weight[_DIM, :] = 0
        model.lm_head.weight[:, _DIM] = 0
        model.lm_head.weight[token, _DIM] = 10.0  # ~8 * 10 for `token`, ~0 for the rest
    model.save_pretrained(out)
    return out


def constant_draft(store: ArtifactStore, target: str, token: int) -> StageRef:
    """Publish the draft as train artifact `const<token>` of `store` and export it."""
    from safetensors.torch import save_file

    from eagle_core.draft import DraftConfig, build_draft
    from eagle_core.export import ExportConfig, export
    from eagle_core.models import load_target

    model = load_target(target)
    cfg = DraftConfig.from_target_config(model.config, draft_vocab_size=512)
    draft = build_draft(cfg, target_model=model)
    t2d = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    t2d[token : token + 512] = True
    draft.set_vocab_map(torch.full((512,), token, dtype=torch.long), t2d)
    with torch.no_grad():
        draft.lm_head.weight.zero_()
    key = f"const{token}"
    with store.publish("train", key) as w:
        w.write_file("final/draft.safetensors", lambda p: save_file(dict(draft.state_dict()), p))
        w.write_json("final/draft_config.json", cfg.to_dict())
        w.meta.update(target=target)
        w.counts.update(final_step_acc=[0.5] * STEPS)  # what evaluate's consistency report reads
    return export(store, store.ref("train", key), ExportConfig(dtype="float32", target=target))
