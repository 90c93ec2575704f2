"""The training-time-test (TTT) loss of EAGLE drafts, with the label/hidden alignment.

Notation: B batch, T tokens, H hidden, A captured layers, V / Vd target / draft vocab,
K TTT steps, x the sample's tokens, s[t] the target's states at position t (aux for fc,
last = final-normed last hidden), len the sample's length (attention_mask sum).

TTT alignment, the one place it is defined (serving semantics are the truth: step k at
index t is the k-th draft step of a chain rooted at the verified position r = t):

    index t             0      1      2      3      4      5
    tokens x            x0     x1     x2     x3     x4     x5
    target states       s0     s1     s2     s3     s4     s5

    step 0 at t=1:  in (x2, fc(s1.aux)) @pos 1   -> predicts x3 | target softmax(s2.last) | w = m[3]
    step 1 at t=1:  in (x3, out_0[1])   @pos 2   -> predicts x4 | target softmax(s3.last) | w = m[4]
    step 2 at t=1:  in (x4, out_1[1])   @pos 3   -> predicts x5 | target softmax(s4.last) | w = m[5]

    step k at t:    in (x[t+1+k], fc(s[t].aux) if k == 0 else out_{k-1}[t]) @ RoPE position t+k
                    predicts x[t+2+k]; target = softmax(s[t+1+k].last @ W_head[draft rows].T)
                    weight = m[t+2+k] * [full-vocab argmax of the target at t+1+k is in Vd]
                             * [t+2+k < len]            (m = loss_mask; nothing wraps around)

    attention of step k at index t (what a serving engine's draft KV cache holds then):

        step-0 keys, index j = 0 1 2 3 4 5       chain keys (index t only)
        step 0, t=3:           # # # # . .        -
        step 2, t=3:           # # # # . .        k1[3] k2[3]

Both alignments train this one forward (positions and attention above; Eagle3Draft.ttt_steps).
They differ in the loss weights and averaging only:

    aligned:    weight = m[t+2+k] * in_vocab[t+1+k] * [t+2+k < len];
                loss_k = Σ weight·CE / Σ weight
    reference:  weight = m[t+k] * in_vocab[t+1+k] * [t+1+k < len];
                loss_k = Σ weight·CE / (B·T)        (T = the batch's padded length)
    total = Σ_k decay^k · loss_k (decay 0.8 in both; per micro batch, then averaged over
    micro batches and processes)

`alignment="reference"` is what SpecForge 0.2.0 (`OnlineEagle3Model.forward`,
`LlamaForCausalLMEagle3` attention with `position_ids + lck`, `LogSoftmaxLoss`: a `.mean()`
over all B·T positions) and SafeAILab EAGLE-3's current `traineagle3/cnets.py` compute: the
same RoPE t+k and plain causal attention as "aligned" (EAGLE-3 dropped its earlier
shifted-diagonal mask in Sep 2025), the loss mask two tokens before the predicted one (their
loss mask shifts with the steps, so the first two tokens of every masked span are never
trained, and the two tokens after it are) and the loss divided by every position, masked and
padded ones included, so its scale falls with padding and mask density (checked against
SpecForge's own forward: tests/eagle_core/test_specforge_peer.py). EAGLE-1/2 divided by
loss_mask.sum(), as "aligned" does.

Accuracy_k (both alignments) = fraction of weighted positions where the draft argmax equals
the target argmax (both in the draft vocab). The reference trainers print hits over
#{m[t+k] = 1}: a target argmax outside the draft vocab counts there as a miss, here not at all.

Serving-faithful conditional acceptance (metrics only, no extra forward): teacher forcing feeds
step k the DATA token x[t+1+k], while a greedy serving engine feeds the draft's own step k-1
token, which (when accepted) is the target's argmax g[t+k] (g: the argmax over the draft rows;
where the full-vocab argmax is not a draft token the weight is 0). A chain rooted at t (a
position with step-0 weight > 0) is alive at step k when, for every j < k, step j hit (draft
argmax_j[t] == g[t+1+j]), had weight > 0, and x[t+2+j] == g[t+1+j] (the teacher-forced input
of step j+1 is what serving would feed; the root's own input x[t+1] is not required to be g[t]:
the root is a context, as in the teacher-forced step 0). Per step k:
cond_roots_k = #{alive at k with weight_k > 0}, cond_hits_k = # of those that hit. A chain whose
data token leaves the target's greedy path is dropped from then on (censored, not a miss), so
Π_k cond_hits_k / cond_roots_k estimates P(a chain accepts at least k tokens) even on data the
target did not write, and captures errors correlated across steps (a product of the per-step
accuracies assumes they are independent). With alignment="reference" the roots and steps are
those with reference weight > 0 (the forward is the same).

The target's distribution is computed from `last_hidden` through the target lm_head rows of
the draft vocab only (`W_head[draft_target_ids]`, fp32 over Vd), never full-vocab fp32 logits;
softmax over those rows equals the full softmax gathered on the draft vocab and renormalised.
Whether the full-vocab argmax lies in the draft vocab is decided by comparing the best draft
row with the best non-draft row, computed in chunks under no_grad.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from eagle_core.capture import TargetStates
from eagle_core.draft import Eagle1Draft, Eagle3Draft
from eagle_core.errors import ConfigError, ModelMismatchError

log = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 25  # fp32 elements per chunk of non-draft logits (128 MiB)


@dataclass(frozen=True, kw_only=True)
class TTTConfig:
    """How the TTT unroll is trained."""

    steps: int = 7  # EAGLE-3 default; at least as deep as the chains serving engines draft
    decay: float = 0.8  # step k weighs decay**k: its token counts only if steps < k were accepted
    # "reference": EAGLE-3/SpecForge loss weights and averaging (module docstring)
    alignment: Literal["aligned", "reference"] = "aligned"
    checkpoint_attention: bool = False  # long samples: recompute TTT scores in backward
    eagle1_feature_weight: float = 1.0  # EAGLE-1: weight of SmoothL1(feature) (reference: 1.0)
    eagle1_ce_weight: float = 0.1  # EAGLE-1: weight of the soft CE (reference: 0.1)
    # recompute each step's [B, T, Vd] logits in backward instead of keeping K of them:
    # at Vd=32k they are most of the TTT memory; costs one extra lm_head matmul per step
    checkpoint_head: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 64:
            raise ConfigError(f"ttt.steps={self.steps} is not in [1, 64]", fix="use 7 (default)")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"ttt.decay={self.decay} is not in (0, 1]", fix="use 0.8 (default)")
        if self.alignment not in ("aligned", "reference"):
            raise ConfigError(
                f"ttt.alignment={self.alignment!r} is unknown",
                fix="use 'aligned' (default) or 'reference'",
            )
        if self.eagle1_feature_weight < 0 or self.eagle1_ce_weight < 0:
            raise ConfigError("ttt.eagle1_*_weight must be >= 0", fix="use 1.0 and 0.1")


@dataclass
class DraftBatch:
    """One training batch (right padded).

    Attributes:
        input_ids: [B, T] int64.
        attention_mask: [B, T] int64, 1 on the sample's tokens, 0 on right padding.
        loss_mask: [B, T] int64, 1 on tokens the draft must learn to predict.
        last_hidden: [B, T, H] the target's final-normed last hidden state.
        aux_hidden: [B, T, A*H] captured aux layers (EAGLE-3; None for EAGLE-1).
        input_last_hidden: [B, T, H] what an EAGLE-1 draft is fed in place of last_hidden
            (training feature noise, eagle_core/train.py); the target distribution and the
            feature-regression targets still come from last_hidden. None: last_hidden.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    last_hidden: Tensor
    aux_hidden: Tensor | None = None
    input_last_hidden: Tensor | None = None

    def to(self, device: torch.device | str) -> DraftBatch:
        return DraftBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            last_hidden=self.last_hidden.to(device),
            aux_hidden=None if self.aux_hidden is None else self.aux_hidden.to(device),
            input_last_hidden=None
            if self.input_last_hidden is None
            else self.input_last_hidden.to(device),
        )


@dataclass
class LossOutput:
    """loss: scalar with grad; per step k: loss value, accuracy and weighted-position count."""

    loss: Tensor
    step_loss: list[float]
    step_acc: list[float]
    step_count: list[int]
    step_feature_loss: list[float] = field(default_factory=list)  # EAGLE-1 only
    # serving-faithful conditional acceptance counts per step (module docstring): chains alive
    # at step k with weight > 0, and how many of them the draft's argmax continues
    step_cond_hits: list[int] = field(default_factory=list)
    step_cond_roots: list[int] = field(default_factory=list)


def shift_left(x: Tensor, n: int) -> Tensor:
    """y[:, t] = x[:, t+n], zeros past the end (dim 1). x: [B, T, ...]."""
    if n == 0:
        return x
    y = torch.zeros_like(x)
    if n < x.shape[1]:
        y[:, : x.shape[1] - n] = x[:, n:]
    return y


@torch.no_grad()
def target_distribution(
    last_hidden: Tensor, target_head: Tensor, draft_target_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The target's next-token distribution restricted to the draft vocab.

    Args:
        last_hidden: [B, T, H] final-normed last hidden states.
        target_head: [V, H] the target lm_head weight.
        draft_target_ids: [Vd] target ids of the draft vocab rows.

    Returns:
        probs [B, T, Vd] fp32 (softmax over the draft rows), argmax [B, T] (draft ids),
        in_vocab [B, T] bool (the full-vocab argmax is a draft token).
    """
    h = last_hidden.float()
    w_d = target_head[draft_target_ids].float()  # [Vd, H]
    logits = h @ w_d.T  # [B, T, Vd] fp32, Vd columns only
    probs = torch.softmax(logits, dim=-1)
    best_d, argmax = logits.max(dim=-1)  # [B, T]
    v = target_head.shape[0]
    if draft_target_ids.numel() == v:
        return probs, argmax, torch.ones_like(argmax, dtype=torch.bool)
    is_draft = torch.zeros(v, dtype=torch.bool, device=target_head.device)
    is_draft[draft_target_ids] = True
    flat = h.reshape(-1, h.shape[-1])  # [B*T, H]
    best_o = torch.full((flat.shape[0],), float("-inf"), device=h.device)
    # chunks of head rows, cast one at a time: no [V, H] fp32 copy, no [B*T, V] logits
    rows = max(1, _CHUNK_ELEMENTS // max(1, flat.shape[0]))
    for i in range(0, v, rows):
        scores = flat @ target_head[i : i + rows].float().T  # [B*T, rows]
        scores[:, is_draft[i : i + rows]] = float("-inf")
        best_o = torch.maximum(best_o, scores.max(dim=-1).values)
    in_vocab = best_d >= best_o.view_as(best_d)  # ties go to the draft row
    return probs, argmax, in_vocab


def step_weights(
    loss_mask: Tensor, attention_mask: Tensor, in_vocab: Tensor, k: int, alignment: str
) -> Tensor:
    """Weight [B, T] of step k at every index t (see the module docstring).

    aligned: loss_mask[t+2+k] * in_vocab[t+1+k] * [t+2+k < len];
    reference: loss_mask[t+k] * in_vocab[t+1+k] * [t+1+k < len].
    """
    lengths = attention_mask.long().sum(dim=1, keepdim=True)  # [B, 1]
    idx = torch.arange(loss_mask.shape[1], device=loss_mask.device)[None, :]  # [1, T]
    vocab_ok = shift_left(in_vocab, 1 + k)
    if alignment == "aligned":
        # weight by the predicted token's mask, not the input's: otherwise the first two
        # tokens of every span are never trained
        m = shift_left(loss_mask, 2 + k)
        inside = idx + 2 + k < lengths
    else:
        m = shift_left(loss_mask, k)
        inside = idx + 1 + k < lengths
    return m.float() * vocab_ok.float() * inside.float()  # [B, T]


def _check(draft: Eagle3Draft | Eagle1Draft, batch: DraftBatch, target_head: Tensor) -> None:
    cfg = draft.cfg
    b, t = batch.input_ids.shape
    for name, tensor in (("attention_mask", batch.attention_mask), ("loss_mask", batch.loss_mask)):
        if tuple(tensor.shape) != (b, t):
            raise ModelMismatchError(
                f"batch.{name} {tuple(tensor.shape)} != input_ids {(b, t)}",
                fix="build the batch with the same padding for every field",
            )
    if tuple(batch.last_hidden.shape) != (b, t, cfg.hidden_size):
        raise ModelMismatchError(
            f"batch.last_hidden {tuple(batch.last_hidden.shape)} != {(b, t, cfg.hidden_size)}",
            fix="hidden states must come from the draft's target (same H)",
        )
    if batch.input_last_hidden is not None and (
        batch.input_last_hidden.shape != batch.last_hidden.shape
    ):
        raise ModelMismatchError(
            f"batch.input_last_hidden {tuple(batch.input_last_hidden.shape)} != "
            f"last_hidden {tuple(batch.last_hidden.shape)}",
            fix="build the draft's input features from the batch's own last_hidden",
        )
    if tuple(target_head.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelMismatchError(
            f"target_head {tuple(target_head.shape)} != (V={cfg.vocab_size}, H={cfg.hidden_size})",
            fix="pass target_head_weight(target) of the draft's target",
        )
    if isinstance(draft, Eagle3Draft):
        want = (b, t, cfg.num_aux * cfg.hidden_size)
        if batch.aux_hidden is None or tuple(batch.aux_hidden.shape) != want:
            got = None if batch.aux_hidden is None else tuple(batch.aux_hidden.shape)
            raise ModelMismatchError(
                f"batch.aux_hidden {got} != {want} (layers {cfg.aux_layer_ids})",
                fix="extract hidden states with the draft's aux_layer_ids",
            )


def _soft_ce(logits: Tensor, probs: Tensor, w: Tensor, denom: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted soft CE of one step; logits, probs [B, S, Vd], w [B, S] -> (loss, argmax)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, S, Vd]
    ce = -(probs * logp).sum(-1)  # [B, S]: target of step k at t is position t+1+k
    return (ce * w).sum() / denom, logits.detach().argmax(-1)


def _head_loss(
    draft: Eagle3Draft | Eagle1Draft, hidden_out: Tensor, probs: Tensor, w: Tensor, denom: Tensor
) -> tuple[Tensor, Tensor]:
    return _soft_ce(draft.logits(hidden_out), probs, w, denom)


def compute_loss(
    draft: Eagle3Draft | Eagle1Draft, batch: DraftBatch, target_head: Tensor, cfg: TTTConfig
) -> LossOutput:
    """The TTT loss of one batch: Σ_k decay^k · loss_k (see the module docstring).

    EAGLE-3: loss_k = soft CE(target softmax over Vd, draft log-softmax).
    EAGLE-1: loss_k = feature_weight · SmoothL1(out_k[t], last[t+1+k]) (mean over H)
             + ce_weight · soft CE; both averaged over the weighted positions.

    Args:
        draft: the draft model (training mode or not).
        batch: the batch; hidden states in any float dtype.
        target_head: [V, H] the target lm_head weight (no grad needed).
        cfg: TTT settings.
    """
    _check(draft, batch, target_head)
    head = target_head.detach().to(batch.last_hidden.device)
    probs, t_argmax, in_vocab = target_distribution(
        batch.last_hidden, head, draft.draft_target_ids.to(head.device)
    )
    last_in = batch.last_hidden if batch.input_last_hidden is None else batch.input_last_hidden
    states = TargetStates(aux=batch.aux_hidden, last=last_in)  # type: ignore[arg-type]
    hidden0 = draft.init_hidden(states)  # [B, T, H]
    is_eagle1 = isinstance(draft, Eagle1Draft)
    total = hidden0.new_zeros((), dtype=torch.float32)
    out = LossOutput(loss=total, step_loss=[], step_acc=[], step_count=[])
    steps = draft.ttt_steps(
        batch.input_ids, hidden0, cfg.steps, cfg.checkpoint_attention,
        with_logits=not cfg.checkpoint_head,
    )  # fmt: skip
    b_len, t_len = batch.input_ids.shape
    # the reference trainers average every step over all B·T positions (module docstring)
    all_positions = hidden0.new_tensor(float(b_len * t_len), dtype=torch.float32)
    # chains alive at the current step, per root index t (serving-faithful acceptance)
    alive = torch.ones_like(batch.input_ids, dtype=torch.bool)  # [B, T]
    cond: list[Tensor] = []  # per step: [hits, roots] int64
    for k, (hidden_out, logits) in enumerate(steps):
        span = t_len - 1 - k  # indices t whose target position t+1+k exists
        if span <= 0:
            out.step_loss.append(0.0)
            out.step_acc.append(0.0)
            out.step_count.append(0)
            cond.append(torch.zeros(2, dtype=torch.long, device=alive.device))
            if is_eagle1:
                out.step_feature_loss.append(0.0)
            continue
        w = step_weights(batch.loss_mask, batch.attention_mask, in_vocab, k, cfg.alignment)
        w = w[:, :span]  # [B, span]
        n = w.sum()
        denom = n.clamp(min=1.0) if cfg.alignment == "aligned" else all_positions
        if cfg.checkpoint_head:
            # keep only hidden_out [B, T, H] for backward; the [B, T, Vd] logits and
            # log-softmax of every step are recomputed there (they dominate TTT memory)
            loss_k, draft_argmax = checkpoint(
                _head_loss, draft, hidden_out[:, :span], probs[:, 1 + k :], w, denom,
                use_reentrant=False,
            )  # fmt: skip
        else:
            loss_k, draft_argmax = _soft_ce(logits[:, :span], probs[:, 1 + k :], w, denom)
        if is_eagle1:
            target_feat = batch.last_hidden[:, 1 + k :].float()  # [B, span, H]
            sl1 = F.smooth_l1_loss(hidden_out[:, :span].float(), target_feat, reduction="none")
            feat_k = (sl1.mean(-1) * w).sum() / denom
            out.step_feature_loss.append(float(feat_k.detach()))
            loss_k = cfg.eagle1_feature_weight * feat_k + cfg.eagle1_ce_weight * loss_k
        total = total + (cfg.decay**k) * loss_k
        with torch.no_grad():
            hit_b = draft_argmax == t_argmax[:, 1 + k :]  # [B, span]
            hit = hit_b.float()
            out.step_acc.append(float((hit * w).sum() / n.clamp(min=1.0)))
            live = alive[:, :span] & (w > 0)  # [B, span]; step 0: the roots
            cond.append(torch.stack([(live & hit_b).sum(), live.sum()]))
            # step k+1 is fed x[t+2+k]; serving feeds the accepted draft token g[t+1+k]
            same_input = batch.input_ids[:, 2 + k :] == t_argmax[:, 1 + k : t_len - 1]
            alive = torch.zeros_like(alive)
            alive[:, : span - 1] = (live & hit_b)[:, : span - 1] & same_input
        out.step_loss.append(float(loss_k.detach()))
        out.step_count.append(int(n.item()))
    counts = torch.stack(cond).tolist() if cond else []  # one device-to-host read
    out.step_cond_hits = [int(c[0]) for c in counts]
    out.step_cond_roots = [int(c[1]) for c in counts]
    out.loss = total
    return out
