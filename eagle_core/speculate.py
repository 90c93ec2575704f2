"""Speculative decoding with an EAGLE draft and a transformers target: chain and dynamic tree.

Notation: n verified tokens x[0..n-1] so far, V target vocab, Vd draft vocab, H hidden size,
K draft steps (chain length / tree depth), k top-k per tree level, M tree nodes.

Positions (one convention for both models, = ARCHITECTURE.md "TTT alignment"):
- the target KV cache holds x[0..n-2]; x[n-1] (the last emitted token, the "root") is fed
  with the proposals in ONE verify forward at positions n-1, n, ...
- draft cache entry t holds (token x[t+1], hidden init_hidden(target states)[t], RoPE
  position t): it predicts x[t+2]. After each verify the draft cache is cut back to the
  verified entries and extended with the newly verified positions (their states come from
  the verify forward itself, via HiddenCapture), then drafts from its last entry r = n-2:
  chain step k (k >= 1) feeds the previous draft token, the previous step's pre-norm hidden
  output and RoPE position r + k.

Greedy (temperature 0) output equals plain greedy decoding token for token whatever the
draft proposes: a proposal is kept only if it equals the target's argmax after the same
prefix, and every emitted token is a target argmax. τ (tokens per verify forward) is
1 + mean(accepted), computed from the counted accept events.

A round cut by the stop (max_new_tokens, or an EOS among its tokens) counts only what it
emitted: accepted = emitted - 1 for that round, so that 1 (prefill) + Σ (accepted + 1) is
exactly the number of tokens returned and τ never credits proposals past the stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from eagle_core.capture import HiddenCapture, TargetStates
from eagle_core.draft import DraftKVCache
from eagle_core.errors import ConfigError, ModelMismatchError

log = logging.getLogger(__name__)

Mode = Literal["chain", "tree"]


@dataclass
class SpecResult:
    """What one speculative generation emitted and the events it counted.

    Attributes:
        tokens: the new tokens (prompt excluded), truncated at max_new_tokens / after EOS.
        n_target_forwards: target forwards, the prefill included.
        accepted_per_forward: accepted draft tokens of each verify forward (prefill excluded).
        per_position_accept_counts: [K] verify forwards whose k-th proposal (chain) / depth-k
            node (tree) was accepted.
        per_position_proposed: [K] verify forwards that proposed a k-th token.
        draft_time_s / target_time_s: wall time in draft / target forwards.
        n_draft_forwards: draft forwards (extends and chain / tree steps).
    """

    tokens: list[int]
    n_target_forwards: int = 0
    accepted_per_forward: list[int] = field(default_factory=list)
    per_position_accept_counts: list[int] = field(default_factory=list)
    per_position_proposed: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    n_draft_forwards: int = 0

    @property
    def tau(self) -> float:
        """Acceptance length: tokens emitted per verify forward = 1 + mean accepted."""
        a = self.accepted_per_forward
        return 1.0 + sum(a) / len(a) if a else float("nan")


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def _finish(tokens: list[int], max_new: int, eos: set[int]) -> tuple[list[int], bool]:
    """Truncate at max_new and right after the first EOS; (tokens, done)."""
    for i, t in enumerate(tokens[:max_new]):
        if t in eos:
            return tokens[: i + 1], True
    return tokens[:max_new], len(tokens) >= max_new


def _check_prompt(input_ids: Tensor) -> Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ConfigError(
            f"input_ids of shape {tuple(input_ids.shape)}: speculative decoding here runs one "
            "non-empty prompt at a time",
            fix="pass input_ids [1, T] (or [T]) with T >= 1",
        )
    return input_ids.long()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Sums wall time of target / draft forwards (CUDA-synchronised)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.draft = 0.0
        self.target = 0.0

    def run(
        self, which: Literal["draft", "target"], fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(self.device)
        dt = time.perf_counter() - t0
        if which == "draft":
            self.draft += dt
        else:
            self.target += dt
        return out


@torch.no_grad()
def greedy_generate(
    target: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[int]:
    """Plain greedy decoding with a KV cache (the baseline): one target forward per token.

    Returns the new tokens, truncated at max_new_tokens / right after the first EOS.
    """
    ids = _check_prompt(input_ids).to(_device(target))
    if max_new_tokens <= 0:
        return []
    eos = _eos_set(eos_token_id)
    cache = DynamicCache()
    n = ids.shape[1]
    out = target(input_ids=ids, past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    nxt = int(out.logits[0, -1].argmax())
    while True:
        tokens.append(nxt)
        if nxt in eos or len(tokens) >= max_new_tokens:
            return tokens
        pos = torch.tensor([[n + len(tokens) - 1]], device=ids.device)
        out = target(
            input_ids=torch.tensor([[nxt]], device=ids.device),
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        nxt = int(out.logits[0, -1].argmax())


# ---------------------------------------------------------------------------------------------
# cache surgery


def _keep_target_cache(cache: DynamicCache, keep: Tensor) -> None:
    """Keep cache entries `keep` (ascending indices along the sequence) in every layer."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModelMismatchError(
            f"{type(cache).__name__} exposes no per-layer keys/values",
            fix="use transformers >= 4.56 (DynamicCache.layers)",
        )
    for layer in layers:
        if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
            continue
        layer.keys = layer.keys.index_select(-2, keep)
        layer.values = layer.values.index_select(-2, keep)


def _crop_target_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` entries (the cache's own crop takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _draft_cache_rows(cache: DraftKVCache, rows: Tensor) -> None:
    """Reorder / repeat the draft cache's batch rows (tree beams), [B'] indices."""
    if cache.k is not None and cache.v is not None:
        cache.k = cache.k.index_select(0, rows)
        cache.v = cache.v.index_select(0, rows)


# ---------------------------------------------------------------------------------------------
# the decoder


class _Speculator:
    """One generation: target cache + draft cache + counters."""

    def __init__(
        self,
        target: nn.Module,
        draft: nn.Module,
        steps: int,
        temperature: float,
        generator: torch.Generator | None,
    ):
        self.target, self.draft = target, draft
        self.steps = steps
        self.temperature = temperature
        self.generator = generator
        self.device = _device(target)
        self.clock = _Clock(self.device)
        self.tcache = DynamicCache()
        self.dcache = DraftKVCache()
        self.res = SpecResult(
            tokens=[],
            per_position_accept_counts=[0] * steps,
            per_position_proposed=[0] * steps,
        )
        cfg = getattr(draft, "cfg", None)
        if cfg is None:
            raise ModelMismatchError(
                f"{type(draft).__name__} is not an eagle_core draft (no .cfg)",
                fix="build it with eagle_core.draft.build_draft or load_exported_draft",
            )
        tcfg = target.config
        if cfg.hidden_size != tcfg.hidden_size or cfg.vocab_size != tcfg.vocab_size:
            raise ModelMismatchError(
                f"draft (H={cfg.hidden_size}, V={cfg.vocab_size}) does not fit the target "
                f"(H={tcfg.hidden_size}, V={tcfg.vocab_size})",
                fix="use the draft trained for this target",
            )
        # EAGLE-1 reads only the last hidden state; capture layer 0 as a harmless placeholder
        self.layer_ids = tuple(cfg.aux_layer_ids) or (0,)

    # -- forwards
    def target_forward(
        self, ids: Tensor, positions: Tensor, mask: Tensor | None, cap: HiddenCapture
    ) -> tuple[Tensor, TargetStates]:
        """ids/positions: [1, S]; mask: None (causal) or [1, 1, S, L+S] additive.

        Returns logits [S, V] (fp32) and the states captured in this forward ([1, S, ...]).
        """
        out = self.clock.run(
            "target",
            self.target,
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self.tcache,
            use_cache=True,
        )
        self.res.n_target_forwards += 1
        return out.logits[0].float(), cap.states()

    def draft_step(self, ids: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S] tokens, [B, S, H] hidden, [B, S] positions -> (hidden_out, logits [B,S,Vd])."""
        self.res.n_draft_forwards += 1
        return self.clock.run("draft", self.draft.step, ids, hidden, positions, self.dcache)

    def extend_draft(
        self, states: TargetStates, tokens: Tensor, first_pos: int
    ) -> tuple[Tensor, Tensor]:
        """Append verified entries first_pos.. (tokens x[t+1], states[t]); last (h, logits)."""
        hidden = self.clock.run("draft", self.draft.init_hidden, states)  # [1, S, H]
        s = hidden.shape[1]
        pos = torch.arange(first_pos, first_pos + s, device=self.device)[None]  # [1, S]
        h, logits = self.draft_step(tokens[None], hidden, pos)
        return h[:, -1:], logits[:, -1]  # [1, 1, H], [1, Vd]

    # -- sampling helpers
    def _probs(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def _sample(self, probs: Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    steps: int = 5,
    mode: Mode = "chain",
    topk: int = 4,
    total_tokens: int = 24,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
) -> SpecResult:
    """Generate with draft proposals verified by the target, one verify forward per round.

    Args:
        target: a transformers causal LM (eval mode; any dtype/device).
        draft: an eagle_core draft (Eagle3Draft / Eagle1Draft) for this target.
        input_ids: [1, T] or [T] the prompt.
        max_new_tokens: stop after this many new tokens.
        steps: K, draft tokens per chain / tree depth.
        mode: "chain" (K proposals in a row) or "tree" (EAGLE-2 dynamic tree; greedy only).
        topk: tree: children expanded per node and beams kept per level.
        total_tokens: tree: draft nodes verified per round (the root excluded).
        temperature: 0 = greedy (lossless: equals greedy_generate); > 0 = sampling with the
            standard rejection rule (chain only): the output follows the target's
            distribution at that temperature.
        eos_token_id: stop right after emitting one of these.
        seed: of the sampling generator (temperature > 0).

    Returns:
        SpecResult: tokens and the counted events (τ = result.tau).
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} < 1", fix="draft at least one token per round")
    if mode not in ("chain", "tree"):
        raise ConfigError(f"mode={mode!r} is not chain or tree", fix="use chain or tree")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} < 0", fix="use 0 (greedy) or > 0")
    if mode == "tree" and temperature > 0:
        raise ConfigError(
            "tree drafting is implemented for greedy verification only",
            fix="use temperature=0 with mode=tree, or mode=chain for sampling",
        )
    if mode == "tree" and (topk < 1 or total_tokens < 1):
        raise ConfigError(
            f"tree topk={topk}, total_tokens={total_tokens} must be >= 1", fix="use e.g. 4 / 24"
        )
    ids = _check_prompt(input_ids).to(_device(target))
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=ids.device)
        gen.manual_seed(seed)
    sp = _Speculator(target, draft, steps, temperature, gen)
    eos = _eos_set(eos_token_id)
    n = ids.shape[1]
    with HiddenCapture(target, sp.layer_ids) as cap:
        pos = torch.arange(n, device=ids.device)[None]
        logits, states = sp.target_forward(ids, pos, None, cap)
        first = int(logits[-1].argmax()) if temperature == 0 else sp._sample(sp._probs(logits[-1]))
        x = ids[0].tolist() + [first]  # every token so far; the target cache holds x[:-1]
        new, done = _finish([first], max_new_tokens, eos)
        # draft entries t = 0..n-1 (tokens x[1..n], states 0..n-1)
        pending_states, first_pos = states, 0
        while not done:
            toks = torch.tensor(x[first_pos + 1 :], device=ids.device)  # the verified tokens
            assert toks.numel() == pending_states.aux.shape[1]
            root_h, root_logits = sp.extend_draft(pending_states, toks, first_pos)
            n_verified = len(x) - 1  # draft entries after the extend = target cache length
            if mode == "chain":
                accepted, states_v, depth = _chain_round(sp, x, root_h, root_logits, cap)
            else:
                accepted, states_v, depth = _tree_round(
                    sp, x, root_h, root_logits, cap, topk, total_tokens
                )
            sp.dcache.crop(n_verified)
            pending_states, first_pos = states_v, n_verified
            x += accepted
            before = len(new)
            new, done = _finish(new + accepted, max_new_tokens, eos)
            # proposals past the stop were verified but never emitted: not counted
            _count(sp, min(len(accepted), len(new) - before) - 1, depth)
    sp.res.tokens = new
    sp.res.draft_time_s, sp.res.target_time_s = sp.clock.draft, sp.clock.target
    return sp.res


def _chain_round(
    sp: _Speculator, x: list[int], root_h: Tensor, root_logits: Tensor, cap: HiddenCapture
) -> tuple[list[int], TargetStates, int]:
    """Draft K tokens in a row, verify them in one forward.

    root_h [1, 1, H] / root_logits [1, Vd]: the draft's output at its last verified entry.
    Returns the emitted tokens (accepted proposals + the target's bonus token), the target
    states of the verified positions n-1 .. n-1+accepted ([1, accepted+1, ...]) and the
    proposed depth K (the caller counts the events, after the stop truncation).
    """
    dev, k_steps = sp.device, sp.steps
    r = len(x) - 2  # the chain's root entry (the last verified draft entry)
    proposals: list[int] = []
    qs: list[Tensor] = []  # draft distributions over the target vocab (sampling)
    h, logits = root_h, root_logits  # [1, 1, H], [1, Vd]
    draft_targets = sp.draft.draft_target_ids if sp.temperature > 0 else None
    for k in range(k_steps):
        if sp.temperature == 0:
            tok = int(sp.draft.to_target_ids(logits[0].argmax()[None])[0])
        else:
            q_draft = sp._probs(logits[0])  # [Vd]
            q = torch.zeros(sp.target.config.vocab_size, device=dev)
            q[draft_targets] = q_draft  # [V]: 0 outside the draft vocab
            qs.append(q)
            tok = int(draft_targets[sp._sample(q_draft)])
        proposals.append(tok)
        if k == k_steps - 1:
            break
        h, lg = sp.draft_step(
            torch.tensor([[tok]], device=dev), h, torch.tensor([[r + 1 + k]], device=dev)
        )
        logits = lg[:, -1]
    # verify [x[-1], d1..dK] at positions n-1 .. n-1+K
    n = len(x)
    ids = torch.tensor([[x[-1], *proposals]], device=dev)
    pos = torch.arange(n - 1, n + k_steps, device=dev)[None]
    tlogits, states = sp.target_forward(ids, pos, None, cap)  # [K+1, V]
    a = 0
    if sp.temperature == 0:
        preds = tlogits.argmax(-1).tolist()
        while a < k_steps and proposals[a] == preds[a]:
            a += 1
        bonus = preds[a]
    else:
        bonus = -1
        for k in range(k_steps):
            p = sp._probs(tlogits[k])
            tok = proposals[k]
            ratio = float(p[tok] / qs[k][tok]) if qs[k][tok] > 0 else 0.0
            u = float(torch.rand((), generator=sp.generator, device=dev))
            if u < min(1.0, ratio):
                a += 1
                continue
            resid = torch.clamp(p - qs[k], min=0.0)
            bonus = sp._sample(resid / resid.sum()) if resid.sum() > 0 else sp._sample(p)
            break
        if bonus < 0:
            bonus = sp._sample(sp._probs(tlogits[k_steps]))
    _crop_target_cache(sp.tcache, n + a)  # keep x[0..n-1] and the accepted a
    return proposals[:a] + [bonus], states.slice(0, a + 1), k_steps


def _count(sp: _Speculator, accepted: int, proposed_depth: int) -> None:
    """Record one verify forward: `accepted` emitted proposals out of `proposed_depth`."""
    sp.res.accepted_per_forward.append(accepted)
    for k in range(min(proposed_depth, sp.steps)):
        sp.res.per_position_proposed[k] += 1
        if k < accepted:
            sp.res.per_position_accept_counts[k] += 1


def _tree_round(
    sp: _Speculator,
    x: list[int],
    root_h: Tensor,
    root_logits: Tensor,
    cap: HiddenCapture,
    topk: int,
    total_tokens: int,
) -> tuple[list[int], TargetStates, int]:
    """EAGLE-2 dynamic tree: expand the top-k beams per level, rerank all nodes by cumulative
    log-prob, verify the best `total_tokens` with a tree mask, keep the longest accepted path.

    Returns (emitted tokens, states of the kept rows, the deepest verified node's depth).
    """
    dev, depth_max = sp.device, sp.steps
    r = len(x) - 2
    n_cached = sp.dcache.length
    vd = root_logits.shape[-1]
    k = min(topk, vd)
    # nodes: token (target id), parent (-1 = root), depth (1..K), score (cum log-prob)
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    lp = torch.log_softmax(root_logits[0].float(), -1)  # [Vd]
    top_lp, top_id = lp.topk(k)
    tgt = sp.draft.to_target_ids(top_id)
    beam_nodes: list[int] = []
    for j in range(k):
        tokens.append(int(tgt[j]))
        parents.append(-1)
        depths.append(1)
        scores.append(float(top_lp[j]))
        beam_nodes.append(j)
    beam_h = root_h.expand(k, 1, root_h.shape[-1])  # [k, 1, H] hidden that produced each beam
    _draft_cache_rows(sp.dcache, torch.zeros(k, dtype=torch.long, device=dev))
    for depth in range(1, depth_max):
        ids = torch.tensor([[tokens[i]] for i in beam_nodes], device=dev)  # [k, 1]
        pos = torch.full((len(beam_nodes), 1), r + depth, device=dev)
        h, lg = sp.draft_step(ids, beam_h, pos)  # [k,1,H], [k,1,Vd]
        lp = torch.log_softmax(lg[:, -1].float(), -1)  # [k, Vd]
        c_lp, c_id = lp.topk(k, dim=-1)  # [k, k]
        cum = c_lp + torch.tensor([scores[i] for i in beam_nodes], device=dev)[:, None]
        c_tgt = sp.draft.to_target_ids(c_id)
        first_child = len(tokens)
        for b, node in enumerate(beam_nodes):
            for j in range(k):
                tokens.append(int(c_tgt[b, j]))
                parents.append(node)
                depths.append(depth + 1)
                scores.append(float(cum[b, j]))
        best = cum.flatten().topk(k).indices  # next beams among the k*k children
        rows = best // k
        beam_nodes = [first_child + int(i) for i in best]
        beam_h = h.index_select(0, rows)  # [k, 1, H]
        _draft_cache_rows(sp.dcache, rows)
    # back to one row holding the verified entries only
    _draft_cache_rows(sp.dcache, torch.zeros(1, dtype=torch.long, device=dev))
    sp.dcache.crop(n_cached)
    chosen = _select_nodes(parents, depths, scores, total_tokens)
    # verify [root, chosen...]: chosen sorted by depth, so parents precede children
    m = len(chosen)
    index_of = {node: i + 1 for i, node in enumerate(chosen)}  # node -> row (0 = root)
    n = len(x)
    ids = torch.tensor([[x[-1]] + [tokens[i] for i in chosen]], device=dev)  # [1, M+1]
    pos = torch.tensor([[n - 1] + [n - 1 + depths[i] for i in chosen]], device=dev)
    allow = torch.zeros(m + 1, m + 1, dtype=torch.bool, device=dev)
    allow[:, 0] = True
    for i, node in enumerate(chosen):
        row = i + 1
        allow[row, row] = True
        p = parents[node]
        while p >= 0:
            allow[row, index_of[p]] = True
            p = parents[p]
    allow[0, 0] = True
    dtype = next(sp.target.parameters()).dtype
    full = torch.ones(m + 1, n - 1 + m + 1, dtype=torch.bool, device=dev)
    full[:, n - 1 :] = allow  # prefix fully visible, tree block = ancestors + self
    mask = torch.zeros(1, 1, m + 1, n + m, dtype=dtype, device=dev)
    mask.masked_fill_(~full[None, None], torch.finfo(dtype).min)
    tlogits, states = sp.target_forward(ids, pos, mask, cap)  # [M+1, V]
    preds = tlogits.argmax(-1).tolist()
    children: dict[int, list[int]] = {}
    for node in chosen:
        children.setdefault(parents[node], []).append(node)
    path: list[int] = []
    cur, row = -1, 0
    while True:
        want = preds[row]
        nxt = next((c for c in children.get(cur, []) if tokens[c] == want), None)
        if nxt is None:
            break
        path.append(nxt)
        cur, row = nxt, index_of[nxt]
    bonus = preds[row]
    max_depth = max((depths[i] for i in chosen), default=0)
    keep_rows = [0] + [index_of[i] for i in path]
    keep = torch.tensor(list(range(n - 1)) + [n - 1 + j for j in keep_rows], device=dev)
    _keep_target_cache(sp.tcache, keep)
    rows_t = torch.tensor(keep_rows, device=dev)
    kept = TargetStates(
        aux=states.aux.index_select(1, rows_t), last=states.last.index_select(1, rows_t)
    )
    return [tokens[i] for i in path] + [bonus], kept, max_depth


def _select_nodes(
    parents: list[int], depths: list[int], scores: list[float], total: int
) -> list[int]:
    """The best `total` nodes by cumulative log-prob forming a tree (every parent included),
    ordered by depth (then score) so that parents come first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], depths[i], i))
    chosen: set[int] = set()
    picked: list[int] = []
    for i in order:
        if len(picked) >= total:
            break
        if parents[i] == -1 or parents[i] in chosen:
            chosen.add(i)
            picked.append(i)
    return sorted(picked, key=lambda i: (depths[i], -scores[i], i))
