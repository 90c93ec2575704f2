"""Capture the target's hidden states that EAGLE drafts read, with forward hooks.

Notation: B batch, T tokens (of this forward), H target hidden size, A captured layers,
N decoder layers, V target vocab.

Layer-id convention (written once, used everywhere): an aux layer id `i` is a DECODER-LAYER
INDEX whose OUTPUT is captured. The output of decoder layer `i` is
`output_hidden_states[i + 1]` (index 0 there is the embedding output), so the default ids
`(1, N//2 - 1, N - 4)` equal `output_hidden_states` indices `(2, N//2, N - 3)`.

`last` is the target's final-normed last hidden state: exactly what the lm_head sees, so
`last @ lm_head.weight.T` are the target's logits. It is captured by a hook on the final norm
(or, when a model has no recognisable final norm, a pre-hook on the lm_head).

Why hooks and not `output_hidden_states=True`: that keeps all N+1 layer outputs alive at
once; hooks keep the A + 1 that are needed. They work for any `*ForCausalLM` whose decoder
layers are a `ModuleList` (Llama, Qwen2/3, Mistral, Gemma...), with or without a KV cache:
`states()` returns the states of the most recent forward only ([B, S_new, ...]).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from eagle_core.errors import ConfigError, ModelMismatchError

log = logging.getLogger(__name__)

# attribute paths, tried in order, where transformers keeps the decoder layers / final norm
_LAYER_PATHS = (
    "model.layers",
    "layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """The EAGLE-3 default: outputs of decoder layers (1, N//2 - 1, N - 4).

    Raises:
        ConfigError: if N is too small for three distinct layers (N < 7).
    """
    ids = (1, num_layers // 2 - 1, num_layers - 4)
    if num_layers < 7:
        raise ConfigError(
            f"a {num_layers}-layer target has no three distinct default aux layers "
            f"(1, N//2-1, N-4) = {ids}",
            fix="pass aux_layer_ids explicitly (distinct decoder-layer indices in [0, N))",
        )
    return ids


def validate_layer_ids(layer_ids: tuple[int, ...] | list[int], num_layers: int) -> tuple[int, ...]:
    """Check that ids are distinct decoder-layer indices in [0, N); returns them as a tuple."""
    ids = tuple(int(i) for i in layer_ids)
    if not ids:
        raise ConfigError("aux_layer_ids is empty", fix="pass at least one decoder-layer index")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"aux_layer_ids {ids}: {bad} out of range for a {num_layers}-layer target",
            fix=f"use decoder-layer indices in [0, {num_layers}) (outputs of those layers)",
        )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"aux_layer_ids {ids} repeat a layer", fix="use distinct layer ids")
    return ids


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `ModuleList` of decoder layers of a transformers causal LM.

    Tries the usual attribute paths first, then the largest `ModuleList` whose length equals
    `config.num_hidden_layers`.

    Raises:
        ModelMismatchError: no such list exists.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and (n is None or len(layers) == n):
            return layers
    candidates = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and (n is None or len(m) == n)
    ]
    if candidates:
        return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))
    raise ModelMismatchError(
        f"{type(model).__name__} has no ModuleList of {n} decoder layers",
        fix="use a transformers *ForCausalLM whose decoder layers are a ModuleList "
        "(Llama, Qwen2/3, Mistral, Gemma, ...)",
    )


def _base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return base if isinstance(base, nn.Module) else model


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of the decoder stack (its output is what lm_head sees), or None."""
    for holder in (_base_model(model), model):
        for name in _NORM_NAMES:
            m = getattr(holder, name, None)
            if isinstance(m, nn.Module):
                return m
    return None


def target_head_weight(model: nn.Module) -> Tensor:
    """The target's lm_head weight [V, H] (`model.get_output_embeddings().weight`)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ModelMismatchError(
            f"{type(model).__name__} has no output embeddings (lm_head)",
            fix="load the target with AutoModelForCausalLM",
        )
    return head.weight


@dataclass
class TargetStates:
    """Hidden states of one target forward.

    Attributes:
        aux: [B, T, A*H] outputs of the aux decoder layers, concatenated in layer-id order.
        last: [B, T, H] final-normed last hidden state (the lm_head's input).
    """

    aux: Tensor
    last: Tensor

    def slice(self, start: int, stop: int) -> TargetStates:
        """States of token positions [start, stop) (along T)."""
        return TargetStates(aux=self.aux[:, start:stop], last=self.last[:, start:stop])


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class HiddenCapture:
    """Context manager: hooks on the aux decoder layers and on the final norm.

    Example:
        with HiddenCapture(model, (1, 3, 4)) as cap:
            model(input_ids)
            states = cap.states()   # aux [B, T, 3H], last [B, T, H]
    """

    def __init__(self, model: nn.Module, layer_ids: tuple[int, ...] | list[int] | None = None):
        self.model = model
        self.layers = find_decoder_layers(model)
        n = len(self.layers)
        self.layer_ids = validate_layer_ids(
            default_aux_layer_ids(n) if layer_ids is None else layer_ids, n
        )
        self.norm = find_final_norm(model)
        self._outs: dict[int, Tensor] = {}
        self._last: Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> HiddenCapture:
        for i in self.layer_ids:
            self._handles.append(self.layers[i].register_forward_hook(self._layer_hook(i)))
        if self.norm is not None:
            self._handles.append(self.norm.register_forward_hook(self._norm_hook))
        else:
            head = self.model.get_output_embeddings()
            if head is None:
                raise ModelMismatchError(
                    f"{type(self.model).__name__} has neither a final norm nor an lm_head",
                    fix="use a transformers *ForCausalLM",
                )
            log.warning("no final norm found on %s; capturing the lm_head input", type(self.model))
            self._handles.append(head.register_forward_pre_hook(self._head_pre_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _layer_hook(self, i: int):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            self._outs[i] = _first(out)

        return hook

    def _norm_hook(self, _m: nn.Module, _inp: Any, out: Any) -> None:
        self._last = _first(out)

    def _head_pre_hook(self, _m: nn.Module, inp: Any) -> None:
        self._last = _first(inp)

    def states(self) -> TargetStates:
        """States of the most recent forward: aux [B, S, A*H], last [B, S, H]."""
        missing = [i for i in self.layer_ids if i not in self._outs]
        if missing or self._last is None:
            raise ModelMismatchError(
                f"hooks on decoder layers {missing} or the final norm did not fire",
                fix="run a forward of the target inside the HiddenCapture block",
            )
        shapes = {tuple(self._outs[i].shape[:2]) for i in self.layer_ids}
        shapes.add(tuple(self._last.shape[:2]))
        if len(shapes) != 1:  # a hook did not fire in the latest forward: stale states
            raise ModelMismatchError(
                f"captured states of different forwards (shapes {sorted(shapes)})",
                fix="run one complete forward of the target per states() call",
            )
        aux = torch.cat([self._outs[i] for i in self.layer_ids], dim=-1)  # [B, S, A*H]
        return TargetStates(aux=aux, last=self._last)


@torch.no_grad()
def capture_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    layer_ids: tuple[int, ...] | list[int] | None = None,
) -> TargetStates:
    """One no-grad target forward; returns aux [B, T, A*H] and last [B, T, H].

    Runs the decoder stack only (the lm_head is skipped: no [B, T, V] logits) when the
    final norm is found; otherwise the whole model with a pre-hook on the lm_head.
    """
    with HiddenCapture(model, layer_ids) as cap:
        runner = _base_model(model) if cap.norm is not None else model
        runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return cap.states()
