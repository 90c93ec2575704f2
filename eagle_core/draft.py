"""EAGLE-3 and EAGLE-1 draft models: one decoder layer each, serving and TTT forwards.

Notation: B batch, T tokens (training), S tokens of one serving step, H hidden size (= the
target's), A captured target layers, V target vocab, Vd draft vocab, K TTT steps,
Hq / Hkv query / key-value heads, D head dim, L entries in a draft KV cache.

EAGLE-3 (`Eagle3Draft`), for a token x[t+1] and a hidden state h[t]:

    h      = fc(cat(aux layers of the target at t))      [B, T, A*H] -> [B, T, H]   (step 0)
    x_attn = cat(input_layernorm(embed(x[t+1])), hidden_norm(h))    [B, T, 2H]  embeddings first
    h      = h + o_proj(attention(q/k/v_proj(x_attn)))               residual on the un-normed h
    h      = h + mlp(post_attention_layernorm(h))                    -> hidden_out (pre-norm)
    logits = lm_head(norm(hidden_out))                               [B, T, Vd]

EAGLE-1 (`Eagle1Draft`): `h = fc(cat(embed(x[t+1]), feature[t]))` (2H -> H, with bias,
embeddings first as in the reference `torch.cat((inputs_embeds, hidden_states), dim=-1)`),
one Llama decoder layer `layers.0`, `logits = lm_head(hidden_out)` with the target's frozen
lm_head; feature = the target's final-normed last hidden state, and hidden_out is the
predicted next feature. As in the reference EAGLE-1 code (and vLLM / SGLang, which make it
an identity), layer 0 does NOT apply an `input_layernorm`; the frozen all-ones weight exists
only for state_dict compatibility and is not part of the reference layout.

Attribute names are the exported checkpoint keys (FORMATS.md), so export is `state_dict()`.

Two forwards share one attention implementation (`DraftAttention`):
- `step()`: serving-style incremental drafting with a `DraftKVCache`; new entries attend
  causally to everything in the cache.
- `ttt_steps()`: the training-time-test unroll; see eagle_core/loss.py for the alignment
  picture. Step k at index t IS step k of a chain rooted at t (proven in
  tests/eagle_core/test_ttt_alignment.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from eagle_core.capture import TargetStates, default_aux_layer_ids, validate_layer_ids
from eagle_core.errors import ConfigError, ModelMismatchError

log = logging.getLogger(__name__)

DraftKind = Literal["eagle3", "eagle1"]


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DraftConfig:
    """Shape and settings of a draft model; derived from the target's config.

    `aux_layer_ids` are decoder-layer indices whose OUTPUT is captured (eagle_core/capture.py);
    empty for EAGLE-1, which reads the last hidden state only.
    """

    kind: DraftKind = "eagle3"  # EAGLE-3 is the default: better acceptance than EAGLE-1
    hidden_size: int  # = the target's H (embeddings are shared)
    intermediate_size: int  # MLP width; the target's by default
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # from the target config (Qwen3/Gemma set it apart from H / heads)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # the target's (llama3, yarn, linear, dynamic)
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    vocab_size: int  # target vocab V
    draft_vocab_size: int  # Vd; == V for EAGLE-1
    aux_layer_ids: tuple[int, ...] = ()
    target_num_layers: int
    attention_bias: bool = False  # Llama-style draft layer: no q/k/v/o bias unless the target has
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("eagle3", "eagle1"):
            raise ConfigError(f"draft.kind={self.kind!r} is unknown", fix="use eagle3 or eagle1")
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "draft_vocab_size",
            "target_num_layers",
        ):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(
                    f"draft.{name}={getattr(self, name)} must be > 0",
                    fix="derive the config with DraftConfig.from_target_config",
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"draft.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}",
                fix="use the target's head counts",
            )
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(
                f"draft.draft_vocab_size={self.draft_vocab_size} > vocab_size={self.vocab_size}",
                fix="choose a draft vocab no larger than the target's",
            )
        if self.kind == "eagle1" and self.draft_vocab_size != self.vocab_size:
            raise ConfigError(
                f"EAGLE-1 uses the target's lm_head, so draft_vocab_size={self.draft_vocab_size} "
                f"must equal vocab_size={self.vocab_size}",
                fix="set draft_vocab_size = vocab_size for kind=eagle1",
            )
        object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))
        if self.kind == "eagle3":
            validate_layer_ids(self.aux_layer_ids, self.target_num_layers)

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    @classmethod
    def from_target_config(
        cls,
        target_config: Any,
        *,
        kind: DraftKind = "eagle3",
        draft_vocab_size: int | None = None,
        aux_layer_ids: tuple[int, ...] | list[int] | None = None,
        **overrides: Any,
    ) -> DraftConfig:
        """A draft config matching a transformers target config (plus field overrides).

        draft_vocab_size defaults to the target vocab (EAGLE-1 requires that); aux_layer_ids
        default to `default_aux_layer_ids(N)` for EAGLE-3.
        """
        tc = (
            target_config.get_text_config()
            if hasattr(target_config, "get_text_config")
            else (target_config)
        )
        n_layers = int(tc.num_hidden_layers)
        heads = int(tc.num_attention_heads)
        theta, scaling = _rope_of(tc)
        if kind == "eagle3":
            ids = (
                tuple(aux_layer_ids)
                if aux_layer_ids is not None
                else (default_aux_layer_ids(n_layers))
            )
        else:
            ids = ()
        fields: dict[str, Any] = dict(
            kind=kind,
            hidden_size=int(tc.hidden_size),
            intermediate_size=int(tc.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(tc, "head_dim", None) or tc.hidden_size // heads),
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(getattr(tc, "max_position_embeddings", 2048)),
            hidden_act=str(getattr(tc, "hidden_act", None) or "silu"),
            vocab_size=int(tc.vocab_size),
            draft_vocab_size=int(draft_vocab_size or tc.vocab_size),
            aux_layer_ids=ids,
            target_num_layers=n_layers,
            attention_bias=bool(getattr(tc, "attention_bias", False)),
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown draft config overrides {sorted(unknown)}",
                fix=f"use fields of DraftConfig: {_field_names()}",
            )
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DraftConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"draft config has unknown fields {sorted(unknown)}",
                fix=f"use fields of DraftConfig: {_field_names()}",
            )
        return cls(**d)

    def to_llama_config(self) -> LlamaConfig:
        """The same shape as a 1-layer LlamaConfig (RoPE, MLP and norm come from transformers)."""
        rope = dict(self.rope_scaling or {"rope_type": "default"})
        if "type" in rope and "rope_type" not in rope:  # pre-4.45 configs spell it "type"
            rope["rope_type"] = rope.pop("type")
        rope["rope_theta"] = self.rope_theta
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            vocab_size=self.vocab_size,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            rope_parameters=rope,
        )


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DraftConfig)]


def _rope_of(tc: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from a transformers 4.x or 5.x config."""
    params = getattr(tc, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(getattr(tc, "rope_theta", 10000.0))
        scaling = dict(getattr(tc, "rope_scaling", None) or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (scaling if kind != "default" else None)


# ---------------------------------------------------------------------------------------
# attention: one implementation for serving (KV cache) and training (TTT unroll)
# ---------------------------------------------------------------------------------------
class DraftKVCache:
    """Keys/values of the draft's single layer, for serving-style incremental drafting.

    Entries are appended by `Draft.step()` (RoPE already applied). `crop(n)` keeps the first n
    entries: the rollback after the target rejects part of a chain.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None  # [B, Hkv, L, D]
        self.v: Tensor | None = None  # [B, Hkv, L, D]

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add [B, Hkv, S, D] entries; returns all keys and values [B, Hkv, L+S, D]."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ConfigError(
                f"DraftKVCache.crop({n}) with {self.length} entries",
                fix="crop to a length between 0 and the cache length",
            )
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]


@dataclass
class TTTState:
    """Keys/values kept across the steps of one TTT unroll (per batch, one layer).

    k0/v0: step-0 keys and values [B, Hq, T, D] (already repeated over the GQA groups).
    diag_k/diag_v: keys and values of steps 1..k, each [B, Hq, T, D]; entry t belongs to the
    chain rooted at t only (a "diagonal" key).
    """

    checkpoint: bool = False  # recompute the [T, T] scores of steps >= 1 in backward
    step: int = 0
    k0: Tensor | None = None
    v0: Tensor | None = None
    diag_k: list[Tensor] = field(default_factory=list)
    diag_v: list[Tensor] = field(default_factory=list)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*groups, S, D] (each kv head serves `groups` query heads)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class DraftAttention(nn.Module):
    """Llama attention whose input width is `in_dim` (2H for EAGLE-3, H for EAGLE-1)."""

    def __init__(self, cfg: DraftConfig, in_dim: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.groups = self.n_heads // self.n_kv
        self.scaling = self.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(in_dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: DraftKVCache | TTTState) -> Tensor:
        """x: [B, S, in_dim]; cos/sin: [B, S, D]. Returns [B, S, H]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B,Hq,S,D]
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # [B,Hkv,S,D]
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # [B,Hkv,S,D]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if isinstance(ctx, DraftKVCache):
            out = self._attend_cached(q, k, v, ctx)
        else:
            out = self._attend_ttt(q, k, v, ctx)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)  # [B, S, Hq*D]
        return self.o_proj(out)  # [B, S, H]

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: DraftKVCache) -> Tensor:
        """New entry i (of S) sees every cached entry and new entries <= i."""
        s, past = q.shape[2], cache.length
        k_all, v_all = cache.append(k, v)  # [B, Hkv, L, D]
        mask = None
        if s > 1:
            rows = torch.arange(s, device=q.device)[:, None] + past
            mask = torch.arange(past + s, device=q.device)[None, :] <= rows  # [S, L] bool
        return F.scaled_dot_product_attention(
            q,
            _repeat_kv(k_all, self.groups),
            _repeat_kv(v_all, self.groups),
            attn_mask=mask,
            scale=self.scaling,
        )  # [B, Hq, S, D]

    def _attend_ttt(self, q: Tensor, k: Tensor, v: Tensor, st: TTTState) -> Tensor:
        """Step st.step of the TTT unroll; q/k/v at all T indices at once.

        Step 0: plain causal attention (SDPA) over the step-0 keys. Step k >= 1: the query
        at index t scores the step-0 keys [T x T, causal: j <= t] and the k diagonal keys of
        steps 1..k at index t; one softmax over both. No T x KT mask.
        """
        k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)  # [B, Hq, T, D]
        if st.step == 0:
            st.k0, st.v0 = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        assert st.k0 is not None and st.v0 is not None, "TTT step 0 must run first"
        st.diag_k.append(k)
        st.diag_v.append(v)
        dk = torch.stack(st.diag_k, dim=-2)  # [B, Hq, T, k, D]
        dv = torch.stack(st.diag_v, dim=-2)  # [B, Hq, T, k, D]
        if st.checkpoint and torch.is_grad_enabled():
            # keeps only the inputs for backward, not the [B, Hq, T, T+k] scores and probs
            return checkpoint(self._mix, q, st.k0, st.v0, dk, dv, use_reentrant=False)
        return self._mix(q, st.k0, st.v0, dk, dv)

    def _mix(self, q: Tensor, k0: Tensor, v0: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
        """One softmax over the causal step-0 keys (j <= t) and the diagonal keys.

        q, k0, v0: [B, Hq, T, D]; dk, dv: [B, Hq, T, k, D]. Returns [B, Hq, T, D].
        """
        t = q.shape[2]
        visible = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [T, T]
        scores = (q @ k0.transpose(-1, -2)) * self.scaling  # [B, Hq, T, T]
        scores = scores.masked_fill(~visible, float("-inf"))
        diag = (q.unsqueeze(-2) * dk).sum(-1) * self.scaling  # [B, Hq, T, k]
        # a softmax in fp32 over the T causal columns and the k diagonal ones
        probs = torch.softmax(torch.cat([scores, diag], dim=-1).float(), dim=-1).to(q.dtype)
        out = probs[..., :t] @ v0  # [B, Hq, T, D]
        return out + (probs[..., t:, None] * dv).sum(-2)  # [B, Hq, T, D]


class Eagle3Layer(nn.Module):
    """The EAGLE-3 midlayer: attention over cat(norm(embed), norm(h)), residual on h."""

    def __init__(self, cfg: DraftConfig, llama_cfg: LlamaConfig):
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)  # on token embeddings
        self.hidden_norm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)  # on the fused hidden state
        self.self_attn = DraftAttention(cfg, in_dim=2 * h)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(llama_cfg)

    def forward(
        self, emb: Tensor, h: Tensor, cos: Tensor, sin: Tensor, ctx: DraftKVCache | TTTState
    ) -> Tensor:
        """emb, h: [B, S, H] (token embeddings, hidden state). Returns [B, S, H] pre-norm."""
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)  # [B, S, 2H]
        h = h + self.self_attn(x, cos, sin, ctx)  # residual: the un-normed h
        return h + self.mlp(self.post_attention_layernorm(h))  # [B, S, H]


class Eagle1Layer(nn.Module):
    """A Llama decoder layer whose input_layernorm is skipped (reference EAGLE-1, layer 0)."""

    def __init__(self, cfg: DraftConfig, llama_cfg: LlamaConfig):
        super().__init__()
        h = cfg.hidden_size
        # Reference EAGLE-1 (and vLLM/SGLang's EAGLE-1 layer 0) has no input norm: skipped in
        # forward, frozen (no unused trainable parameter for DDP/DeepSpeed), kept only so that
        # state_dicts of earlier runs load; export should leave it out.
        self.input_layernorm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.input_layernorm.weight.requires_grad_(False)
        self.self_attn = DraftAttention(cfg, in_dim=h)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(llama_cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: DraftKVCache | TTTState) -> Tensor:
        """x: [B, S, H] (fc output). Returns [B, S, H]."""
        x = x + self.self_attn(x, cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------
# the two drafts
# ---------------------------------------------------------------------------------------
class _Draft(nn.Module):
    """What both drafts share: RoPE, the serving step and the TTT unroll."""

    cfg: DraftConfig
    embed_tokens: nn.Embedding

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        self.llama_config = cfg.to_llama_config()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # copied from the target, frozen

    def _make_rotary(self) -> None:
        # Kept out of the module tree (a tuple is not registered): `.to(torch.bfloat16)` and
        # DeepSpeed's bf16 cast must not round the RoPE frequencies, which serving engines
        # compute in fp32. It follows the input's device on use; cos/sin come out in its dtype.
        self._rope = (LlamaRotaryEmbedding(self.llama_config),)

    @property
    def rotary_emb(self) -> LlamaRotaryEmbedding:
        """The target's RoPE (transformers' implementation: every rope_type), fp32 always."""
        return self._rope[0]

    @property
    def draft_target_ids(self) -> Tensor:
        """Target ids of the draft vocab rows, [Vd] int64 (row i -> target id i + d2t[i])."""
        return self.to_target_ids(
            torch.arange(self.cfg.draft_vocab_size, device=self.embed_tokens.weight.device)
        )

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def init_hidden(self, states: TargetStates) -> Tensor:
        raise NotImplementedError

    def logits(self, hidden_out: Tensor) -> Tensor:
        raise NotImplementedError

    def _core(
        self, emb: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, ctx: DraftKVCache | TTTState
    ) -> Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _forward(
        self,
        input_ids: Tensor,
        hidden: Tensor,
        positions: Tensor,
        ctx: DraftKVCache | TTTState,
        with_logits: bool = True,
    ) -> tuple[Tensor, Tensor]:
        hidden = hidden.to(self.dtype)
        if hidden.shape[-1] != self.cfg.hidden_size or hidden.shape[:2] != input_ids.shape:
            raise ModelMismatchError(
                f"draft input hidden {tuple(hidden.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)} and H={self.cfg.hidden_size}",
                fix="pass hidden [B, S, H] from init_hidden() or a previous step",
            )
        emb = self.embed_tokens(input_ids).to(hidden.dtype)  # [B, S, H]
        rope = self._rope[0]
        if rope.inv_freq.device != hidden.device:
            rope.to(hidden.device)
        cos, sin = rope(hidden, positions.to(hidden.device))  # [B, S, D] each, hidden's dtype
        out = self._core(emb, hidden, cos, sin, ctx)  # [B, S, H]
        return out, (self.logits(out) if with_logits else None)

    def step(
        self, input_ids: Tensor, hidden: Tensor, positions: Tensor, cache: DraftKVCache
    ) -> tuple[Tensor, Tensor]:
        """One serving step over S new entries (appended to `cache`).

        Args:
            input_ids: [B, S] the token after each hidden state (x[j+1] for a hidden at j).
            hidden: [B, S, H] init_hidden() output (verified positions) or a previous step's
                hidden_out (draft chain).
            positions: [B, S] RoPE positions (j for a verified position j; r+k for chain
                step k rooted at r).
            cache: the draft KV cache; entries attend causally to everything in it.

        Returns:
            hidden_out [B, S, H] (pre-norm; feed it to the next chain step) and logits
            [B, S, Vd] (draft vocab; map with to_target_ids).
        """
        return self._forward(input_ids, hidden, positions, cache)

    def ttt_steps(
        self,
        input_ids: Tensor,
        hidden0: Tensor,
        steps: int,
        checkpoint_attention: bool = False,
        with_logits: bool = True,
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """The TTT unroll; yields (hidden_out [B, T, H], logits [B, T, Vd]) for k = 0..K-1.

        Step k at index t reads token x[t+1+k] (0 past the end: those positions are
        weighted 0 by the loss), hidden0[t] at k=0 else its own step k-1 output at t, RoPE
        position t+k. Both loss alignments (eagle_core/loss.py) train this one forward: they
        differ in the loss weights and averaging only, as SpecForge 0.2.0 and EAGLE-3's
        current trainer compute this forward too.

        Args:
            input_ids: [B, T] the sample's tokens x.
            hidden0: [B, T, H] init_hidden() of the target states at every position.
            steps: K.
            checkpoint_attention: recompute the attention scores of steps >= 1 in backward
                (saves about K * B * Hq * T^2 * 6 bytes for long samples; same numbers).
            with_logits: False yields None for logits (the loss then computes them itself,
                under activation checkpointing).
        """
        b, t = input_ids.shape
        st = TTTState(checkpoint=checkpoint_attention)
        base = torch.arange(t, device=input_ids.device).expand(b, t)  # [B, T]
        hidden = hidden0
        for k in range(steps):
            st.step = k
            tokens = torch.zeros_like(input_ids)
            if 1 + k < t:
                tokens[:, : t - 1 - k] = input_ids[:, 1 + k :]  # x[t+1+k]
            hidden, logits = self._forward(tokens, hidden, base + k, st, with_logits)
            yield hidden, logits


class Eagle3Draft(_Draft):
    """EAGLE-3 draft; attribute names are the exported keys (FORMATS.md table)."""

    def __init__(self, cfg: DraftConfig):
        if cfg.kind != "eagle3":
            raise ConfigError(f"Eagle3Draft got kind={cfg.kind!r}", fix="use build_draft(cfg)")
        super().__init__(cfg)
        h = cfg.hidden_size
        self.fc = nn.Linear(cfg.num_aux * h, h, bias=False)  # [A*H] -> [H]
        self.midlayer = Eagle3Layer(cfg, self.llama_config)
        self.norm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        # default map: the first Vd target ids; build_draft installs the scanned vocab map
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self._make_rotary()

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        """Draft ids -> target ids: i + d2t[i]."""
        return draft_ids + self.d2t[draft_ids]

    def init_hidden(self, states: TargetStates) -> Tensor:
        """fc(aux): [B, T, A*H] -> [B, T, H]."""
        aux = states.aux
        if aux.shape[-1] != self.fc.in_features:
            raise ModelMismatchError(
                f"target aux states have width {aux.shape[-1]}, the draft's fc expects "
                f"{self.fc.in_features} ({self.cfg.num_aux} layers x H={self.cfg.hidden_size})",
                fix="capture the layers in draft.cfg.aux_layer_ids of the same target",
            )
        return self.fc(aux.to(self.fc.weight.dtype))

    def logits(self, hidden_out: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden_out))  # [B, S, Vd]

    def _core(self, emb, hidden, cos, sin, ctx):  # type: ignore[no-untyped-def]
        return self.midlayer(emb, hidden, cos, sin, ctx)

    def set_vocab_map(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install a draft vocab: d2t int64 [Vd] (target = i + d2t[i]), t2d bool [V]."""
        vd, v = self.cfg.draft_vocab_size, self.cfg.vocab_size
        if tuple(d2t.shape) != (vd,) or tuple(t2d.shape) != (v,) or int(t2d.sum()) != vd:
            raise ModelMismatchError(
                f"vocab map d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} with "
                f"{int(t2d.sum())} draft tokens does not fit Vd={vd}, V={v}",
                fix="scan the vocab with draft_vocab_size = the draft config's, on this tokenizer",
            )
        target_ids = torch.arange(vd) + d2t.cpu().long()
        if not torch.equal(t2d.cpu().nonzero().flatten(), target_ids.sort().values):
            raise ModelMismatchError(
                "vocab map d2t and t2d disagree",
                fix="re-run scan_vocab; do not edit vocab_map.safetensors",
            )
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())


class Eagle1Draft(_Draft):
    """EAGLE-1 draft: fc(cat(embed, feature)) -> one Llama layer -> the target's lm_head."""

    def __init__(self, cfg: DraftConfig):
        if cfg.kind != "eagle1":
            raise ConfigError(f"Eagle1Draft got kind={cfg.kind!r}", fix="use build_draft(cfg)")
        super().__init__(cfg)
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)  # reference EAGLE-1: bias=True
        self.layers = nn.ModuleList([Eagle1Layer(cfg, self.llama_config)])
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)  # the target's, frozen
        self._make_rotary()

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids  # the draft vocab is the target vocab

    def init_hidden(self, states: TargetStates) -> Tensor:
        """The feature is the target's final-normed last hidden state [B, T, H]."""
        return states.last.to(self.dtype)

    def logits(self, hidden_out: Tensor) -> Tensor:
        return self.lm_head(hidden_out)  # [B, S, V]: no norm, as the target's head sees it

    def _core(self, emb, hidden, cos, sin, ctx):  # type: ignore[no-untyped-def]
        x = self.fc(torch.cat([emb, hidden], dim=-1))  # [B, S, 2H] -> [B, S, H], embeddings first
        return self.layers[0](x, cos, sin, ctx)


Draft = Eagle3Draft | Eagle1Draft


def build_draft(
    cfg: DraftConfig, target_model: nn.Module | None = None, vocab_map: Any = None
) -> Eagle3Draft | Eagle1Draft:
    """A freshly initialised draft; copies the target's embeddings (and EAGLE-1 lm_head).

    Args:
        cfg: the draft config (DraftConfig.from_target_config(target.config, ...)).
        target_model: a transformers causal LM; its input embeddings (and, for EAGLE-1, its
            output embeddings) are copied and frozen.
        vocab_map: an object with `d2t` int64 [Vd] and `t2d` bool [V] (eagle_core.vocab.VocabMap);
            EAGLE-3 only. Without one the draft vocab is the first Vd target ids.
    """
    draft: Eagle3Draft | Eagle1Draft = (
        Eagle3Draft(cfg) if cfg.kind == "eagle3" else Eagle1Draft(cfg)
    )
    if target_model is not None:
        emb = target_model.get_input_embeddings().weight
        if tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ModelMismatchError(
                f"target embeddings {tuple(emb.shape)} do not match the draft config "
                f"(V={cfg.vocab_size}, H={cfg.hidden_size})",
                fix="derive the draft config from this target's config",
            )
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(emb)
            if isinstance(draft, Eagle1Draft):
                draft.lm_head.weight.copy_(target_model.get_output_embeddings().weight)
    if vocab_map is not None:
        if not isinstance(draft, Eagle3Draft):
            raise ConfigError(
                "a vocab map was given for an EAGLE-1 draft",
                fix="EAGLE-1 uses the full target vocab: pass vocab_map=None",
            )
        draft.set_vocab_map(torch.as_tensor(vocab_map.d2t), torch.as_tensor(vocab_map.t2d))
    elif isinstance(draft, Eagle3Draft) and cfg.draft_vocab_size < cfg.vocab_size:
        log.warning(
            "no vocab map: the draft vocab is the first %d target ids", cfg.draft_vocab_size
        )
    return draft
