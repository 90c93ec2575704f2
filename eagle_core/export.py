"""The export stage: a trained draft -> a serving directory SGLang / vLLM / EAGLE load unchanged.

Notation: H draft hidden size (= target hidden size), I intermediate size, Hq/Hkv query/kv
heads, D head dim, V target vocab, Vd draft vocab, N target decoder layers.

Three layouts (FORMATS.md is the contract; a test pins every key, shape and dtype):

- `eagle3` (default; SGLang `LlamaForCausalLMEagle3`, vLLM `Eagle3LlamaForCausalLM`):
  `fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t` (int64), `t2d` (bool),
  `embed_tokens.weight` only on request.
- `speculators` (vLLM `Eagle3Speculator`): the same tensors with `layers.0.*` for `midlayer.*`.
- `eagle1` (reference EAGLE layout): `fc.weight` [H, 2H] (+ `fc.bias`), `layers.0.*`; no
  `lm_head` / `embed_tokens` (both come from the target).

Aux layer ids in the written configs (engines disagree; checked in their sources):
- our convention (eagle_core.capture): decoder-layer index whose OUTPUT is captured;
  the default is (1, N//2-1, N-4).
- SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids` as that same convention and
  adds 1 internally (`layers_to_capture = [i + 1 for i in ids]`, then it takes the residual
  stream ENTERING that layer). We write our ids there unchanged.
- vLLM reads the TOP-LEVEL `eagle_aux_hidden_state_layer_ids` (also the speculators field)
  as the index of the layer whose INPUT is taken (= `output_hidden_states` index), with no
  offset; its default is (2, N//2, N-3). We write our ids + 1 there, so both engines capture
  the same tensors the draft was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from eagle_core.errors import ArtifactError, ConfigError, ModelMismatchError
from storage import ArtifactStore, StageRef

log = logging.getLogger(__name__)

CODE_VERSION = "1"
# speculators 2: verifier.name_or_path is the target's model dir (an artifact root has no
# config.json, so engines and speculators could not load the verifier from it). Per layout,
# so the eagle3 / eagle1 exports (and the evaluations built on them) keep their keys.
_CODE_VERSIONS = {"eagle3": CODE_VERSION, "eagle1": CODE_VERSION, "speculators": "2"}
STAGE = "export"
FORMAT_VERSION = 1  # of the `eagle_pipeline` block we add to config.json (our own loader reads it)

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
# buffers that are index maps, never cast to the weight dtype (engines read them as such)
_INDEX_DTYPES: dict[str, torch.dtype] = {"d2t": torch.int64, "t2d": torch.bool}
_EAGLE3_ARCH = "LlamaForCausalLMEagle3"
_SPECULATORS_ARCH = "Eagle3Speculator"
_EAGLE1_ARCH = "LlamaForCausalLM"


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What to export and how.

    Attributes:
        format: serving layout; "eagle3" is what SGLang and vLLM load as EAGLE-3 drafts.
        dtype: weight dtype; d2t stays int64 and t2d bool whatever is chosen.
        include_embeddings: also write `embed_tokens.weight` [V, H] (a copy of the target's).
            None (default) means per layout: yes for speculators (speculators' own
            `SpeculatorModel.from_pretrained` has no other source for them; vLLM loads them
            and, when equal to the target's, serves the target's tensor instead: vLLM
            llama_eagle3.py `Eagle3LlamaForCausalLM.load_weights`, then
            `SpecDecodeBaseProposer._maybe_share_embeddings`), no for eagle3 / eagle1
            (SGLang and vLLM take the target's). Resolved
            to a bool on construction, so `dataclasses.replace(cfg, format=...)` keeps the
            resolved value: pass include_embeddings=None again to re-resolve.
        target: the target model reference (Hub name or path); written as the verifier name
            and into the model card, and used to load the target config for `eagle1`.
        checkpoint: "final" (the trained weights in `final/`), or a DeepSpeed tag
            `step-XXXXXXXX` under `checkpoints/`.
        speculative_tokens: written into the speculators proposal method (vLLM's default
            number of draft tokens); unused by the other formats.
        acceptance_length: a measured τ to state in the model card (None: not measured yet).
    """

    format: Literal["eagle3", "speculators", "eagle1"] = "eagle3"  # the layout engines load
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # serving dtype of EAGLE drafts
    include_embeddings: bool | None = None  # None: per layout (speculators only; V*H copy)
    target: str = ""  # the verifier; "" = taken from the training run's manifest
    checkpoint: str = "final"  # the finished run; a step tag exports an intermediate one
    speculative_tokens: int = 5  # chain length of the EAGLE-3 chain decoding reference numbers
    acceptance_length: float | None = None  # measured τ for the model card, if known

    def __post_init__(self) -> None:
        if self.format not in ("eagle3", "speculators", "eagle1"):
            raise ConfigError(
                f"export.format={self.format!r} is not one of eagle3, speculators, eagle1",
                fix="use eagle3 (SGLang/vLLM), speculators (vLLM Eagle3Speculator) or eagle1",
            )
        if self.include_embeddings is None:  # a bool in the key: eagle3/eagle1 keys unchanged
            object.__setattr__(self, "include_embeddings", self.format == "speculators")
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"export.dtype={self.dtype!r} is not one of {sorted(_DTYPES)}",
                fix="use bfloat16 (default), float16 or float32",
            )
        if self.checkpoint != "final" and not self.checkpoint.startswith("step-"):
            raise ConfigError(
                f"export.checkpoint={self.checkpoint!r} is neither 'final' nor 'step-XXXXXXXX'",
                fix="use 'final' or a tag listed under the training run's checkpoints/",
            )
        if self.speculative_tokens < 1:
            raise ConfigError(
                f"export.speculative_tokens={self.speculative_tokens} < 1", fix="use e.g. 5"
            )


# ---------------------------------------------------------------------------------------------
# key layouts


def _layer_keys(prefix: str, cfg: Mapping[str, Any], in_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one Llama-style decoder layer's weights whose q/k/v take `in_dim` inputs."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg["head_dim"]
    hq, hkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.self_attn.q_proj.weight": (hq, in_dim),
        f"{prefix}.self_attn.k_proj.weight": (hkv, in_dim),
        f"{prefix}.self_attn.v_proj.weight": (hkv, in_dim),
        f"{prefix}.self_attn.o_proj.weight": (h, hq),
        f"{prefix}.mlp.gate_proj.weight": (i, h),
        f"{prefix}.mlp.up_proj.weight": (i, h),
        f"{prefix}.mlp.down_proj.weight": (h, i),
    }
    if cfg.get("attention_bias"):
        for name, rows in (("q", hq), ("k", hkv), ("v", hkv), ("o", h)):
            out[f"{prefix}.self_attn.{name}_proj.bias"] = (rows,)
    if cfg.get("mlp_bias"):
        for name, rows in (("gate", i), ("up", i), ("down", h)):
            out[f"{prefix}.mlp.{name}_proj.bias"] = (rows,)
    return out


def expected_layout(
    draft_cfg: Mapping[str, Any], fmt: str, include_embeddings: bool = False
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the exported `model.safetensors` (FORMATS.md), for a DraftConfig dict.

    `fmt` is "eagle3", "speculators" or "eagle1". Names for "internal" (our module's own
    state_dict keys) equal the eagle3 names: attribute names are the exported keys.
    """
    h, v, vd = draft_cfg["hidden_size"], draft_cfg["vocab_size"], draft_cfg["draft_vocab_size"]
    if fmt in ("eagle3", "speculators"):
        n_aux = len(draft_cfg["aux_layer_ids"])
        prefix = "midlayer" if fmt == "eagle3" else "layers.0"
        keys: dict[str, tuple[int, ...]] = {"fc.weight": (h, n_aux * h)}
        keys.update(_layer_keys(prefix, draft_cfg, 2 * h))
        keys[f"{prefix}.hidden_norm.weight"] = (h,)
        keys.update({"norm.weight": (h,), "lm_head.weight": (vd, h), "d2t": (vd,), "t2d": (v,)})
    elif fmt == "eagle1":
        keys = {"fc.weight": (h, 2 * h), "fc.bias": (h,)}
        keys.update(_layer_keys("layers.0", draft_cfg, h))
        # the reference EAGLE-1 layer 0 has no input norm (cnets.py skips it for index 0) and
        # vLLM replaces it by an Identity: a stray weight there is an unexpected key to it
        del keys["layers.0.input_layernorm.weight"]
    else:
        raise ConfigError(f"unknown export format {fmt!r}", fix="use eagle3, speculators, eagle1")
    if include_embeddings:
        keys["embed_tokens.weight"] = (v, h)
    return keys


def _rename(key: str, fmt: str) -> str:
    """Our module key -> the exported key of `fmt` (speculators: midlayer.* -> layers.0.*)."""
    if fmt == "speculators" and key.startswith("midlayer."):
        return "layers.0." + key[len("midlayer.") :]
    return key


def _unrename(key: str, fmt: str) -> str:
    if fmt == "speculators" and key.startswith("layers.0."):
        return "midlayer." + key[len("layers.0.") :]
    return key


def _as_dict(obj: Any) -> dict[str, Any]:
    """A DraftConfig, a dict, or a transformers config -> a plain dict."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    raise ConfigError(f"cannot read a config from {type(obj).__name__}", fix="pass a dict")


# ---------------------------------------------------------------------------------------------
# configs


def _llama_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The Llama config fields shared by every layout (from a DraftConfig dict)."""
    out = {
        "model_type": "llama",
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"],
        "num_hidden_layers": 1,
        "hidden_act": d.get("hidden_act", "silu"),
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": d["rope_theta"],
        "max_position_embeddings": d["max_position_embeddings"],
        "vocab_size": d["vocab_size"],  # the TARGET vocab (embeddings, t2d)
        "tie_word_embeddings": False,
        "attention_bias": bool(d.get("attention_bias", False)),
        "mlp_bias": bool(d.get("mlp_bias", False)),
    }
    if d.get("rope_scaling"):
        out["rope_scaling"] = dict(d["rope_scaling"])
    return out


def _our_block(d: Mapping[str, Any], fmt: str, target: str) -> dict[str, Any]:
    """What our own loader needs beyond the engine fields (the full DraftConfig)."""
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "draft_config": dict(d),
        "target": target,
    }


def build_config(
    draft_cfg: Mapping[str, Any],
    cfg: ExportConfig,
    target_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `config.json` of the chosen layout (a plain JSON-able dict)."""
    d = dict(draft_cfg)
    ids = [int(i) for i in d["aux_layer_ids"]]
    hidden_state_ids = [i + 1 for i in ids]  # vLLM convention: the layer whose INPUT is taken
    target = cfg.target or str(d.get("target", ""))
    if cfg.format == "eagle3":
        out = {"architectures": [_EAGLE3_ARCH], **_llama_fields(d)}
        out.update(
            draft_vocab_size=d["draft_vocab_size"],
            torch_dtype=cfg.dtype,
            target_hidden_size=d.get("target_hidden_size", d["hidden_size"]),
            # SGLang: decoder-layer OUTPUT ids (it adds 1 itself)
            eagle_config={"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
            # vLLM: input-of-layer ids, no offset (see the module docstring)
            eagle_aux_hidden_state_layer_ids=hidden_state_ids,
        )
    elif cfg.format == "speculators":
        layer_cfg = {"architectures": ["LlamaForCausalLM"], **_llama_fields(d)}
        layer_cfg["torch_dtype"] = cfg.dtype
        verifier_arch = list((target_config or {}).get("architectures") or ["LlamaForCausalLM"])
        out = {
            "architectures": [_SPECULATORS_ARCH],
            "speculators_model_type": "eagle3",
            "speculators_version": "0.1.0",
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [
                    {
                        "proposal_type": "greedy",
                        "speculative_tokens": cfg.speculative_tokens,
                        "verifier_accept_k": 1,
                        "accept_tolerance": 0.0,
                    }
                ],
                "default_proposal_method": "greedy",
                "verifier": {
                    "name_or_path": verifier_path(target),
                    "architectures": verifier_arch,
                },
            },
            "transformer_layer_config": layer_cfg,
            "draft_vocab_size": d["draft_vocab_size"],
            "target_hidden_size": d.get("target_hidden_size", d["hidden_size"]),
            # vLLM copies this into the draft config and uses it with no offset: input-of-layer
            "eagle_aux_hidden_state_layer_ids": hidden_state_ids,
            # Our midlayer (eagle_core.draft): residual = the UN-normed fused hidden h, and
            # attention reads cat(input_layernorm(emb), hidden_norm(h)). In vLLM's Eagle3 layer
            # norm_before_residual=true would make the residual hidden_norm(h): wrong for us,
            # and vLLM's speculators reader defaults it to true, hence explicit false.
            "norm_before_residual": False,
            # no RMSNorm on the concatenated aux states before fc (we feed fc(aux) directly)
            "norm_before_fc": False,
            # no per-aux-layer norms (`fc_norm.*` weights) before fc
            "fc_norm": False,
            # the layer's PRE-norm output is fed back as the next step's hidden (EAGLE-3);
            # norm_output=true (EAGLE-3.1) would feed back norm(h) and skip the norm at lm_head
            "norm_output": False,
            "torch_dtype": cfg.dtype,
        }
    else:  # eagle1: the target's own Llama config with one layer
        if not target_config:
            raise ConfigError(
                "eagle1 export needs the target's config (config.json of the target model)",
                fix="set export.target to the target model dir / name",
            )
        out = {k: v for k, v in dict(target_config).items() if not k.startswith("_")}
        out.update(
            architectures=[_EAGLE1_ARCH],
            num_hidden_layers=1,
            torch_dtype=cfg.dtype,
            bias=True,  # reference EAGLE: fc = Linear(2H, H, bias=True)
        )
        for k in ("dtype", "transformers_version", "auto_map", "layer_types"):
            out.pop(k, None)
    out["eagle_pipeline"] = _our_block(d, cfg.format, target)
    return out


def verifier_path(target: str) -> str:
    """The verifier reference written into a speculators config: the target's MODEL
    directory (the one holding config.json), which vLLM (`LLM(model=<export>)`) and
    speculators' `SpeculatorModel.from_pretrained` load the verifier from.

    A demo-target artifact URL or artifact dir becomes its absolute `model/` path (a remote
    store's artifact: `<url>/model`, which the engine's machine must copy locally); a local
    model dir becomes absolute; a Hub name stays as it is. A target that does not resolve
    (not built yet, a path from another machine) is written unchanged, with a warning.
    """
    from eagle_core.models import is_artifact_url, resolve_model_dir

    if not target:
        return target
    try:
        if is_artifact_url(target):
            store, _, _ = ArtifactStore.for_url(target.rstrip("/"))
            if not store.is_local:
                return target.rstrip("/") + "/model"
        return resolve_model_dir(target, sub="model")
    except (ConfigError, ArtifactError) as exc:
        log.warning(
            "export: verifier %s does not resolve to a model dir here (%s); written as given",
            target,
            exc,
        )
        return target


# ---------------------------------------------------------------------------------------------
# writing


def _check_state(
    state: Mapping[str, Tensor], layout: Mapping[str, tuple[int, ...]], fmt: str
) -> None:
    internal = {_unrename(k, fmt) for k in layout}
    missing = sorted(internal - set(state))
    if missing:
        raise ModelMismatchError(
            f"draft state_dict lacks {missing} needed by the {fmt} layout",
            fix="export a checkpoint of the matching draft kind (eagle3 vs eagle1)",
        )
    for key, shape in layout.items():
        got = tuple(state[_unrename(key, fmt)].shape)
        if got != tuple(shape):
            raise ModelMismatchError(
                f"draft tensor {_unrename(key, fmt)} has shape {list(got)}, the {fmt} layout "
                f"expects {list(shape)} for {key}",
                fix="check that the draft config matches the checkpoint",
            )


def export_tensors(
    draft_state: Mapping[str, Tensor],
    draft_cfg: Any,
    cfg: ExportConfig,
) -> dict[str, Tensor]:
    """The exported tensors, named and typed for `cfg.format` (contiguous, on CPU).

    Keys not in the layout (e.g. `embed_tokens.weight` without include_embeddings, the
    eagle1 frozen `lm_head.weight`, rotary buffers) are left out; a missing or misshapen
    tensor raises ModelMismatchError.
    """
    d = _as_dict(draft_cfg)
    kind = d.get("kind", "eagle3")
    want_kind = "eagle1" if cfg.format == "eagle1" else "eagle3"
    if kind != want_kind:
        raise ConfigError(
            f"export.format={cfg.format} needs an {want_kind} draft, this checkpoint is {kind}",
            fix=f"use format={'eagle1' if kind == 'eagle1' else 'eagle3'}",
        )
    layout = expected_layout(d, cfg.format, cfg.include_embeddings)
    _check_state(draft_state, layout, cfg.format)
    dtype = _DTYPES[cfg.dtype]
    out: dict[str, Tensor] = {}
    for key in sorted(layout):
        t = draft_state[_unrename(key, cfg.format)].detach().to("cpu")
        t = t.to(_INDEX_DTYPES.get(key, dtype))
        out[key] = t.contiguous().clone()
    return out


def _model_card(d: Mapping[str, Any], cfg: ExportConfig, extra: Mapping[str, Any]) -> str:
    ids = list(d["aux_layer_ids"])
    lines = [
        f"# EAGLE draft for `{cfg.target or extra.get('target', '?')}`",
        "",
        f"- format: `{cfg.format}` (dtype {cfg.dtype})",
        f"- draft kind: `{d.get('kind', 'eagle3')}`, hidden size {d['hidden_size']}, "
        f"target vocab {d['vocab_size']}, draft vocab {d['draft_vocab_size']}",
    ]
    if cfg.format != "eagle1":
        lines += [
            f"- aux layers (decoder-layer indices whose OUTPUT is captured): {ids}",
            "  - `eagle_config.eagle_aux_hidden_state_layer_ids` holds these ids (SGLang "
            "adds 1 itself)",
            f"  - top-level `eagle_aux_hidden_state_layer_ids` = {[i + 1 for i in ids]} "
            "(vLLM: index of the layer whose input is taken, no offset)",
        ]
    for name, value in sorted(extra.items()):
        if name != "target" and value not in (None, "", [], {}):
            lines.append(f"- {name.replace('_', ' ')}: {value}")
    tau = cfg.acceptance_length
    lines.append(
        f"- measured acceptance length τ: {tau:.3f}"
        if tau is not None
        else "- measured acceptance length τ: not measured (run the evaluate stage)"
    )
    lines += [
        "",
        "Load with SGLang: `--speculative-algorithm EAGLE3 --speculative-draft-model-path <dir>`;",
        'vLLM: `speculative_config={"method": "eagle3", "model": "<dir>"}`.',
        "",
    ]
    return "\n".join(lines)


def export_state_dict(
    draft_state: Mapping[str, Tensor],
    draft_cfg: Any,
    target_config: Any,
    cfg: ExportConfig,
    out_dir: str,
    card: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write `config.json`, `model.safetensors`, `README.md` of `cfg.format` into out_dir.

    Args:
        draft_state: the draft's state_dict (our module names: `midlayer.*`, `d2t`, `t2d`...).
        draft_cfg: DraftConfig or its `to_dict()`.
        target_config: the target's config (dict or transformers config); needed for eagle1
            and for the speculators verifier architectures, optional otherwise.
        cfg: the export settings.
        out_dir: a local directory (created).
        card: extra facts for the model card (data refs, vocab coverage...).

    Returns:
        file name -> sha256. Same inputs give the same bytes (sorted keys, no timestamps).
    """
    d = _as_dict(draft_cfg)
    tensors = export_tensors(draft_state, d, cfg)
    config = build_config(d, cfg, _as_dict(target_config) or None)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(out_dir, "README.md"), "w") as fh:
        fh.write(_model_card(d, cfg, dict(card or {})))
    digests = {}
    for name in ("config.json", "model.safetensors", "README.md"):
        with open(os.path.join(out_dir, name), "rb") as fh:
            digests[name] = hashlib.sha256(fh.read()).hexdigest()
    log.info("exported %s draft (%d tensors) to %s", cfg.format, len(tensors), out_dir)
    return digests


# ---------------------------------------------------------------------------------------------
# reading a training run


def read_training_checkpoint(
    store: ArtifactStore, train_ref: StageRef, checkpoint: str = "final", tmp_dir: str = ""
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(draft state_dict, DraftConfig dict) of a finished training run.

    "final" reads `final/draft.safetensors` + `final/draft_config.json`; a `step-XXXXXXXX`
    tag reads that DeepSpeed checkpoint (fp32 master weights when it has ZeRO shards,
    else its module states) with the run's `final/draft_config.json` or the step's own.

    Raises:
        ArtifactError: the run has no manifest, or lacks the files named above.
    """
    if not store.is_done(train_ref.stage, train_ref.key):
        raise ArtifactError(
            f"training run {train_ref.url} is not finished (no manifest.json)",
            fix="finish (or resume) the train stage before exporting",
        )
    files = set(store.list_files(train_ref))
    cfg_names = ["final/draft_config.json", f"checkpoints/{checkpoint}/draft_config.json"]
    cfg_name = next((n for n in cfg_names if n in files), None)
    if cfg_name is None:
        raise ArtifactError(
            f"training run {train_ref.url} has no final/draft_config.json",
            fix="re-run the train stage (the run is incomplete)",
        )
    draft_cfg = store.read_json(train_ref, cfg_name)
    if checkpoint == "final":
        name = "final/draft.safetensors"
        if name not in files:
            raise ArtifactError(
                f"training run {train_ref.url} lists no {name}",
                fix="re-run the train stage (the run is incomplete)",
            )
        path = store.local_copy(train_ref, name, tmp_dir or tempfile.mkdtemp())
        state: dict[str, Tensor] = {}
        with safe_open(path, framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                state[k] = fh.get_tensor(k)
        return state, draft_cfg
    prefix = f"checkpoints/{checkpoint}/"
    step_files = [n for n in files if n.startswith(prefix)]
    if not step_files:
        raise ArtifactError(
            f"training run {train_ref.url} has no DeepSpeed checkpoint {checkpoint}",
            fix="pick a tag listed under its checkpoints/ (or 'final')",
        )
    local = store.local_dir(train_ref, tmp_dir or tempfile.mkdtemp())
    return _read_deepspeed(os.path.join(local, "checkpoints"), checkpoint), draft_cfg


def _read_deepspeed(ckpt_root: str, tag: str) -> dict[str, Tensor]:
    """Full-precision weights of one DeepSpeed checkpoint tag (ZeRO shards merged)."""
    step_dir = os.path.join(ckpt_root, tag)
    names = sorted(os.listdir(step_dir))
    if any("optim_states" in n for n in names) and any(
        n.startswith("zero") or "zero_pp" in n for n in names
    ):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return _draft_keys(dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)))
    model_files = [n for n in names if n.endswith("model_states.pt")]
    if not model_files:
        raise ArtifactError(
            f"DeepSpeed checkpoint {step_dir} has no *model_states.pt",
            fix="pick another checkpoint tag, or 'final'",
        )
    sd = torch.load(os.path.join(step_dir, model_files[0]), map_location="cpu", weights_only=False)
    module = sd.get("module", sd)
    return _draft_keys({k: v for k, v in module.items() if isinstance(v, Tensor)})


def _draft_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The draft's own keys of a training-wrapper state_dict (`module.` / `draft.` prefixes:
    DeepSpeed wraps the trainer module, whose draft lives under `draft`)."""
    for prefix in ("module.", "draft."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _target_config_dict(target: str) -> dict[str, Any]:
    """The target's config.json as a dict (local dir, artifact URL or Hub name)."""
    from transformers import AutoConfig

    from eagle_core.models import resolve_model_dir

    return AutoConfig.from_pretrained(resolve_model_dir(target, sub="model")).to_dict()


def export(
    store: ArtifactStore, train_ref: StageRef, cfg: ExportConfig, force: bool = False
) -> StageRef:
    """The export stage: a training run -> `<root>/export/<key>/{config.json, model.safetensors,
    README.md}`.

    Raises:
        ArtifactError: the training run is incomplete.
        ModelMismatchError: checkpoint tensors disagree with the draft config.
    """
    key = store.key(STAGE, cfg, inputs=[train_ref], code=_CODE_VERSIONS[cfg.format])
    if store.is_done(STAGE, key) and not force:
        log.info("export %s: cached", key)
        return store.ref(STAGE, key)
    log.info("export %s: %s from %s", key, cfg.format, train_ref.url)
    done = store.is_done(train_ref.stage, train_ref.key)
    manifest = store.manifest(train_ref.stage, train_ref.key) if done else None
    meta = manifest.meta if manifest is not None else {}
    data_refs, coverage = _training_inputs(store, manifest.inputs if manifest else [])
    with tempfile.TemporaryDirectory() as tmp:
        state, draft_cfg = read_training_checkpoint(store, train_ref, cfg.checkpoint, tmp)
        target = cfg.target or str(meta.get("target", ""))
        target_config: dict[str, Any] | None = None
        if target and cfg.format == "eagle1":
            target_config = _target_config_dict(target)
        elif target and cfg.format == "speculators":
            try:  # only the verifier's architectures are read from it
                target_config = _target_config_dict(target)
            except (OSError, ValueError) as exc:
                log.warning(
                    "export: target config of %s unreadable (%s); verifier "
                    "architectures default to LlamaForCausalLM",
                    target,
                    exc,
                )
        elif cfg.format == "eagle1":
            raise ConfigError(
                "eagle1 export needs the target model (its config becomes config.json)",
                fix="set export.target",
            )
        _check_fits_target_config(draft_cfg, target_config, cfg.target, train_ref.url)
        card = {
            "target": target,
            "training run": train_ref.url,
            "checkpoint": cfg.checkpoint,
            "training data": ", ".join(data_refs) or None,
            "vocab coverage (share of loss-masked training tokens in the draft vocab)": coverage,
            "training steps": manifest.counts.get("steps") if manifest else None,
            "training held-out step accuracy": manifest.counts.get("heldout_step_acc")
            if manifest
            else None,
        }
        cfg_eff = cfg if cfg.target or not target else _with_target(cfg, target)
        out_dir = os.path.join(tmp, "out")
        digests = export_state_dict(state, draft_cfg, target_config, cfg_eff, out_dir, card)
        with store.publish(STAGE, key, params=cfg, inputs=[train_ref], force=force) as w:
            w.add_dir(out_dir)
            w.counts.update(tensors=len(load_safetensors_keys(out_dir)))
            w.meta.update(
                format=cfg.format,
                dtype=cfg.dtype,
                target=target,
                aux_layer_ids=list(draft_cfg.get("aux_layer_ids", [])),
                draft_vocab_size=draft_cfg.get("draft_vocab_size"),
                sha256=digests,
                # provenance: the target and data the draft was trained from (upstream
                # manifests); not in the key, the train key already holds them
                fingerprints=store.lineage_fingerprints([train_ref]),
            )
    return store.ref(STAGE, key)


def _check_fits_target_config(
    draft_cfg: Mapping[str, Any],
    target_config: Mapping[str, Any] | None,
    explicit_target: str,
    where: str,
) -> None:
    """ModelMismatchError when the export's verifier is not the target the draft was trained
    for (hidden size, vocab, layers). Uses the loaded target config, else the config.json of
    an explicitly given local target dir; nothing is checked when neither is at hand."""
    tc = dict(target_config) if target_config is not None else None
    local = os.path.join(explicit_target, "config.json") if explicit_target else ""
    if tc is None and local and os.path.isfile(local):
        tc = _target_config_dict(explicit_target)
    if tc is None:
        return
    tc = dict(tc.get("text_config") or tc)
    if "hidden_size" not in tc or "vocab_size" not in tc:
        return
    from types import SimpleNamespace

    tc.setdefault("_name_or_path", explicit_target)
    check_target_match(draft_cfg, SimpleNamespace(config=SimpleNamespace(**tc)), where)


def _training_inputs(
    store: ArtifactStore, inputs: list[dict[str, str]]
) -> tuple[list[str], float | None]:
    """(URLs of the training run's input artifacts, draft-vocab coverage from scan_vocab)."""
    urls = [i.get("url", "") for i in inputs if i.get("url")]
    coverage = None
    for i in inputs:
        if i.get("stage") == "scan_vocab" and store.is_done("scan_vocab", i["key"]):
            coverage = store.manifest("scan_vocab", i["key"]).counts.get("coverage")
    return urls, coverage


def _with_target(cfg: ExportConfig, target: str) -> ExportConfig:
    from dataclasses import replace

    return replace(cfg, target=target)


def load_safetensors_keys(out_dir: str) -> list[str]:
    with safe_open(os.path.join(out_dir, "model.safetensors"), framework="pt") as fh:
        return sorted(fh.keys())


# ---------------------------------------------------------------------------------------------
# loading our exports (the evaluate stage uses this)


def _draft_cfg_from_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(format, DraftConfig dict) of an exported config.json."""
    ours = config.get("eagle_pipeline")
    if isinstance(ours, Mapping) and "draft_config" in ours:
        return str(ours["format"]), dict(ours["draft_config"])
    arch = (config.get("architectures") or [""])[0]
    if arch == _SPECULATORS_ARCH:
        base = dict(config["transformer_layer_config"])
        ids = [i - 1 for i in config["eagle_aux_hidden_state_layer_ids"]]
        fmt = "speculators"
        base.update(draft_vocab_size=config["draft_vocab_size"])
    elif arch == _EAGLE3_ARCH:
        base = dict(config)
        ids = list(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        fmt = "eagle3"
    else:
        raise ModelMismatchError(
            f"config.json architectures {config.get('architectures')} is not an EAGLE-3 export "
            "this loader knows",
            fix="load exports of this pipeline, or LlamaForCausalLMEagle3 / Eagle3Speculator",
        )
    h = base["hidden_size"]
    d = {
        "kind": "eagle3",
        "hidden_size": h,
        "intermediate_size": base["intermediate_size"],
        "num_attention_heads": base["num_attention_heads"],
        "num_key_value_heads": base.get("num_key_value_heads", base["num_attention_heads"]),
        "head_dim": base.get("head_dim") or h // base["num_attention_heads"],
        "rms_norm_eps": base["rms_norm_eps"],
        "rope_theta": base.get("rope_theta", 10000.0),
        "rope_scaling": base.get("rope_scaling"),
        "max_position_embeddings": base["max_position_embeddings"],
        "hidden_act": base.get("hidden_act", "silu"),
        "vocab_size": base["vocab_size"],
        "draft_vocab_size": base.get("draft_vocab_size", base["vocab_size"]),
        "aux_layer_ids": tuple(ids),
        "target_num_layers": None,
        "attention_bias": bool(base.get("attention_bias", False)),
        "mlp_bias": bool(base.get("mlp_bias", False)),
    }
    return fmt, d


def check_target_match(d: Mapping[str, Any], target_model: nn.Module, where: str) -> None:
    """ModelMismatchError unless the target's hidden size, vocab and layer count fit the draft."""
    tcfg = target_model.config
    problems = []
    if tcfg.hidden_size != d["hidden_size"]:
        problems.append(f"hidden size {d['hidden_size']} vs target {tcfg.hidden_size}")
    if tcfg.vocab_size != d["vocab_size"]:
        problems.append(f"vocab size {d['vocab_size']} vs target {tcfg.vocab_size}")
    n = getattr(tcfg, "num_hidden_layers", None)
    ids = list(d.get("aux_layer_ids") or [])
    if d.get("kind", "eagle3") == "eagle3" and n is not None and ids and max(ids) >= n:
        problems.append(f"aux layers {ids} vs a {n}-layer target")
    if d.get("target_num_layers") and n is not None and d["target_num_layers"] != n:
        problems.append(f"trained on a {d['target_num_layers']}-layer target, this one has {n}")
    if problems:
        raise ModelMismatchError(
            f"draft {where} does not fit target {getattr(tcfg, '_name_or_path', '?')}: "
            + "; ".join(problems),
            fix="evaluate the draft with the target it was trained for",
        )


def load_exported_draft(
    export_dir: str, target_model: nn.Module, dtype: torch.dtype | None = None
) -> nn.Module:
    """Our draft module from an exported directory, checked against `target_model`.

    Weights absent from the export (`embed_tokens`, and eagle1's `lm_head`) come from the
    target via `build_draft`. Returns the draft in eval mode, in `dtype` (default: the
    target's dtype), on the target's device.

    Raises:
        ArtifactError: config.json / model.safetensors missing.
        ModelMismatchError: hidden size / vocab size / layer count differ from the target.
    """
    from eagle_core.draft import DraftConfig, build_draft

    cfg_path = os.path.join(export_dir, "config.json")
    w_path = os.path.join(export_dir, "model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise ArtifactError(
                f"exported draft {export_dir} lacks {os.path.basename(p)}",
                fix="re-run the export stage",
            )
    with open(cfg_path) as fh:
        config = json.load(fh)
    fmt, d = _draft_cfg_from_config(config)
    check_target_match(d, target_model, export_dir)
    if d.get("target_num_layers") is None:
        d["target_num_layers"] = target_model.config.num_hidden_layers
    draft_cfg = DraftConfig.from_dict(d)
    state = {}
    with safe_open(w_path, framework="pt") as fh:
        for k in fh.keys():  # noqa: SIM118
            state[_unrename(k, fmt)] = fh.get_tensor(k)
    vocab_map = None
    if "d2t" in state and "t2d" in state:
        from eagle_core.vocab import VocabMap

        vocab_map = VocabMap(d2t=state["d2t"], t2d=state["t2d"])  # validated on construction
    draft = build_draft(draft_cfg, target_model=target_model, vocab_map=vocab_map)
    own = draft.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ModelMismatchError(
            f"{w_path} holds tensors {unknown[:5]} that a {d['kind']} draft does not have",
            fix="export with this pipeline's export stage",
        )
    missing = sorted(k for k in own if k not in state and not _from_target(k, d["kind"]))
    if missing:
        raise ModelMismatchError(
            f"{w_path} lacks tensors {missing[:5]}", fix="re-run the export stage"
        )
    for k, t in state.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise ModelMismatchError(
                f"{w_path}: {k} has shape {list(t.shape)}, the draft expects {list(own[k].shape)}",
                fix="re-run the export stage",
            )
    # exported weights in their own dtype (bf16 stays bf16-rounded, cast to the draft dtype)
    draft.load_state_dict({k: t.to(own[k].dtype) for k, t in state.items()}, strict=False)
    ref = next(target_model.parameters())
    draft = draft.to(device=ref.device)
    if dtype is not None or ref.dtype != torch.float32:
        _cast_floating(draft, dtype or ref.dtype)
    return draft.eval()


def _from_target(key: str, kind: str) -> bool:
    """Tensors the export leaves out: the engine takes them from the target, or (EAGLE-1
    layer 0 input norm) the draft never uses them (it stays at its frozen ones)."""
    if key == "embed_tokens.weight" or key.endswith("rotary_emb.inv_freq"):
        return True
    return kind == "eagle1" and key in ("lm_head.weight", "layers.0.input_layernorm.weight")


def _cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters/buffers only (d2t int64 / t2d bool stay as they are)."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, b in list(module.named_buffers()):
        if b.is_floating_point() and not name.endswith("inv_freq"):
            b.data = b.data.to(dtype)
