"""The evaluate stage: real speculative decoding of held-out prompts with an exported draft.

For every prompt (chat and FIM, reported separately) the target decodes greedily twice:
plainly (`greedy_generate`, the baseline) and speculatively (`speculative_generate`, the
draft proposing, the target verifying in one forward per round). It reports, from counted
events only:

- τ = tokens emitted per verify forward = 1 + Σ accepted / Σ verify forwards (a round cut
  by max_new_tokens / EOS counts only the proposals it emitted, so emitted tokens =
  prompts + verify forwards + accepted exactly);
- per-position acceptance: P(the k-th proposal is accepted) = forwards that accepted >= k
  tokens / verify forwards, and the conditional rate given k-1 were accepted;
- draft and target forward times (total and per forward);
- speedup = baseline wall time / speculative wall time, on this device, same prompts;
- the lossless check: prompts whose speculative output equals greedy decoding token for
  token (greedy mode; sampling mode reports it as not applicable).

Outputs: `report.json`, `report.md` (a markdown table) and `acceptance.png`; given the
training run (`train_ref`), also `consistency.json` / `consistency.md`: its held-out
per-step accuracy next to this acceptance (eagle_core/consistency.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from eagle_core.errors import ConfigError, DataError
from eagle_core.speculate import SpecResult, greedy_generate, speculative_generate
from storage import ArtifactStore, StageRef

log = logging.getLogger(__name__)

# 2: a round cut by max_new_tokens / EOS counts only the proposals it emitted (speculate.py)
CODE_VERSION = "3"  # 2: cut rounds count emitted proposals only; 3: generation_config eos
STAGE = "evaluate"
Kind = Literal["chat", "fim"]
KINDS: tuple[Kind, ...] = ("chat", "fim")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Which prompts, and how to decode them.

    Attributes:
        target: the target model (local dir, Hub name or demo-target artifact URL); "" = the
            target named in the export's manifest.
        tokenizer: the tokenizer; "" = the target's (its `tokenizer/` for demo artifacts).
        prompts: where held-out prompts come from, in order: records artifact URLs
            (`<root>/download/<key>`), jsonl/json files (local or fsspec URLs) or directories
            of `*.jsonl` (ShareGPT / OpenAI chat rows, FIM prefix/middle/suffix rows);
            empty = the held-out files (`data/*.heldout.jsonl`) of a demo-target artifact
            given as `target`. A single string is taken as one source.
        max_prompts: prompts per kind (chat, FIM), taken in file order.
        max_new_tokens: tokens generated per prompt.
        max_prompt_tokens: longer prompts keep their last tokens (left truncation).
        steps: draft tokens per round (chain length / tree depth).
        mode: "chain" or "tree" (EAGLE-2 dynamic tree).
        topk / total_tokens: tree expansion width and verified nodes per round.
        temperature: 0 = greedy (lossless check); > 0 = rejection sampling (chain only).
        dtype / device: of the target and draft.
        seed: sampling seed.
    """

    target: str = ""  # "" = the export's target
    tokenizer: str = ""  # "" = the target's
    prompts: tuple[str, ...] = ()  # () = the demo target's held-out files
    max_prompts: int = 16  # per kind: enough for a stable τ, small enough for a CPU run
    max_new_tokens: int = 64  # long enough for several rounds of 5-token chains
    max_prompt_tokens: int = 512  # left-truncate longer prompts (keeps the recent context)
    steps: int = 5  # the chain length of the EAGLE-3 chain-decoding reference numbers
    mode: Literal["chain", "tree"] = "chain"  # chain: what every engine supports
    topk: int = 4  # tree: children per node and beams per level
    total_tokens: int = 24  # tree: nodes verified per round
    temperature: float = 0.0  # greedy: the lossless check applies
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # CPU-safe default
    device: str = "cpu"
    seed: int = 0
    # who decodes: "ours" (eagle_core.speculate, this process) or "vllm" (the engine users
    # serve with, its own venv; eagle_core/engine_vllm.py): part of the key
    engine: Literal["ours", "vllm"] = "ours"
    # the vLLM venv's python; "" = $EAGLE_PIPELINE_VLLM_PYTHON, else `.ci/engine-venv vllm`'s.
    # Where an engine is installed never changes what it measures: not in the key
    vllm_python: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,) if self.prompts else ())
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        checks = [
            (self.max_prompts >= 1, "max_prompts", "use >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", "use >= 1"),
            (self.max_prompt_tokens >= 1, "max_prompt_tokens", "use >= 1"),
            (self.steps >= 1, "steps", "use >= 1 (5 is the default)"),
            (self.mode in ("chain", "tree"), "mode", "use chain or tree"),
            (self.topk >= 1 and self.total_tokens >= 1, "topk/total_tokens", "use >= 1"),
            (self.temperature >= 0, "temperature", "use 0 (greedy) or > 0"),
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype", "use float32"),
            (
                not (self.mode == "tree" and self.temperature > 0),
                "mode",
                "tree drafting verifies greedily: use temperature=0 or mode=chain",
            ),
            (self.engine in ("ours", "vllm"), "engine", "use ours or vllm"),
            (
                self.engine == "ours" or (self.mode == "chain" and self.temperature == 0),
                "engine",
                "engine=vllm measures greedy chain drafting: use mode=chain, temperature=0",
            ),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ConfigError(
                    f"evaluate.{name} is invalid ({getattr(self, name, '')})", fix=fix
                )


@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt: the tokens the target continues."""

    sample_id: str
    kind: Kind
    input_ids: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# prompts


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int] | None:
    """Token ids of a chat cut before its LAST assistant turn, with the generation prompt.

    None when there is no assistant turn after a user turn (nothing to continue).
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last <= 0:
        return None
    from eagle_core.chat import resolve_chat_template

    head = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    ids = tokenizer.apply_chat_template(
        head,
        chat_template=resolve_chat_template(tokenizer),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def fim_prompt_ids(tokenizer: Any, prefix: str, suffix: str) -> list[int]:
    """PSM prompt `<prefix>P<suffix>S<middle>` with the tokenizer's own FIM tokens."""
    from eagle_core.fim import build_fim_sample, discover_fim_tokens

    tokens = discover_fim_tokens(tokenizer)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    sample = build_fim_sample(tokens, enc(prefix), [], enc(suffix), "psm")
    return sample.input_ids[:-1]  # drop the end token build_fim_sample appends after the middle


def prompts_from_records(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_per_kind: int, max_tokens: int
) -> tuple[list[EvalPrompt], dict[str, int]]:
    """Normalised records (RECORD_SCHEMA dicts) -> prompts, at most max_per_kind per kind.

    Returns (prompts, skipped counts by reason): chats without an assistant turn to
    continue, and "tokens" records (no text to cut), are skipped and counted.
    """
    from eagle_core.records import parse_messages

    out: list[EvalPrompt] = []
    per_kind = dict.fromkeys(KINDS, 0)
    skipped: dict[str, int] = {}
    for rec in records:
        kind = rec.get("kind")
        if kind not in per_kind:
            skipped[f"kind_{kind}"] = skipped.get(f"kind_{kind}", 0) + 1
            continue
        if per_kind[kind] >= max_per_kind:
            continue
        if kind == "chat":
            ids = chat_prompt_ids(tokenizer, parse_messages(rec["messages_json"]))
            if ids is None:
                skipped["chat_without_assistant_turn"] = (
                    skipped.get("chat_without_assistant_turn", 0) + 1
                )
                continue
        else:
            ids = fim_prompt_ids(tokenizer, rec.get("prefix") or "", rec.get("suffix") or "")
        out.append(EvalPrompt(str(rec["sample_id"]), kind, tuple(ids[-max_tokens:])))
        per_kind[kind] += 1
        if all(v >= max_per_kind for v in per_kind.values()):
            break
    return out, skipped


def _jsonl_records(paths: Sequence[str], skipped: dict[str, int]) -> Iterable[dict[str, Any]]:
    """Rows of local/fsspec jsonl (or json list) files, normalised to records; rejected rows
    are counted in `skipped` by reason. URLs are opened with the artifact store's options
    (`storage.urls.fs_options`: `$EAGLE_PIPELINE_S3_ENDPOINT` for s3://)."""
    import fsspec

    from eagle_core.records import Rejected, normalize_record
    from storage.urls import fs_options, redact_url

    for path in paths:
        shown = redact_url(path)
        try:
            with fsspec.open(path, "rt", encoding="utf-8", **fs_options(path)) as fh:
                text = fh.read()
        except FileNotFoundError as exc:
            raise DataError(
                f"evaluate.prompts: {shown} does not exist",
                fix="pass held-out jsonl/json files, a directory of them, or a records "
                "artifact URL (<root>/download/<key>); for s3:// check the bucket and "
                "$EAGLE_PIPELINE_S3_ENDPOINT",
            ) from exc
        except UnicodeDecodeError as exc:
            raise DataError(
                f"evaluate.prompts: {shown} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                fix="pass jsonl/json prompt files in UTF-8",
            ) from exc
        rows: list[Any]
        if path.endswith(".json"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"evaluate.prompts: {shown} is not valid JSON ({exc})",
                    fix="a .json prompt file holds one JSON list of records; use .jsonl for "
                    "one record per line",
                ) from exc
            rows = loaded if isinstance(loaded, list) else [loaded]
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    log.warning(
                        "evaluate: %s line %d skipped (malformed_json: %s)", shown, lineno, exc
                    )
                    skipped["malformed_json"] = skipped.get("malformed_json", 0) + 1
        base = os.path.basename(shown.rstrip("/"))
        for i, raw in enumerate(rows):
            sid = str(raw.get("id", f"{base}:{i}")) if isinstance(raw, dict) else f"{shown}:{i}"
            rec = normalize_record(raw, sample_id=sid, source=shown)
            if isinstance(rec, Rejected):
                log.warning("evaluate: %s line %d skipped (%s)", shown, i + 1, rec.reason)
                skipped[str(rec.reason)] = skipped.get(str(rec.reason), 0) + 1
                continue
            yield rec


def _artifact_records(url: str) -> Iterable[dict[str, Any]]:
    from storage.shards import iter_batches

    store, stage, key = ArtifactStore.for_url(url)
    ref = store.ref(stage, key)
    cols = ["sample_id", "kind", "messages_json", "prefix", "suffix"]
    for batch in iter_batches(store, ref, columns=cols):
        yield from batch.to_pylist()


def _demo_heldout_files(target: str) -> list[str]:
    from eagle_core.models import is_artifact_url

    if not is_artifact_url(target):
        raise ConfigError(
            "evaluate.prompts is empty and evaluate.target is not a demo-target artifact",
            fix="pass evaluate.prompts (a records artifact URL or held-out jsonl files)",
        )
    store, stage, key = ArtifactStore.for_url(target)
    ref = store.ref(stage, key)
    names = store.list_files(ref, prefix="data/", suffix=".heldout.jsonl")
    names = [n for n in names if "/files." not in n]  # whole files: no prompt to cut
    return [store.url(stage, key, n) for n in names]


def stop_token_ids(target, tokenizer) -> tuple[int, ...]:
    """Where generation stops, as a serving engine decides it: the target's
    `generation_config.eos_token_id` (chat models list their end-of-turn token there, e.g.
    Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`) plus the tokenizer's eos."""
    ids: list[int] = []
    gen = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    for e in [gen] if isinstance(gen, int) else list(gen or []):
        ids.append(int(e))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


def load_prompts(
    cfg: EvalConfig, tokenizer: Any, target: str
) -> tuple[list[EvalPrompt], dict[str, int]]:
    """The held-out prompts named by cfg.prompts (see EvalConfig)."""
    rejected: dict[str, int] = {}
    records = (
        _records_of(list(cfg.prompts), rejected)
        if cfg.prompts
        else _jsonl_records(_demo_heldout_files(target), rejected)
    )
    prompts, skipped = prompts_from_records(
        records, tokenizer, cfg.max_prompts, cfg.max_prompt_tokens
    )
    for reason, n in rejected.items():  # rows the record normaliser refused
        skipped[reason] = skipped.get(reason, 0) + n
    if not prompts:
        raise DataError(
            f"no usable chat or FIM prompt in {list(cfg.prompts) or target}",
            fix="pass held-out chat (with an assistant turn) or FIM records",
        )
    return prompts, skipped


def _records_of(sources: list[str], skipped: dict[str, int]) -> Iterable[dict[str, Any]]:
    """Records of every source in order (artifact URLs, files, directories; local or fsspec
    URLs, opened with the artifact store's options)."""
    for src in sources:
        if _is_records_artifact(src):
            yield from _artifact_records(src.rstrip("/"))
        elif os.path.isdir(src):
            names = sorted(n for n in os.listdir(src) if n.endswith((".jsonl", ".json")))
            yield from _jsonl_records([os.path.join(src, n) for n in names], skipped)
        elif "://" in src and _remote_isdir(src):
            yield from _jsonl_records(_remote_files(src), skipped)
        else:
            yield from _jsonl_records([src], skipped)


def _remote_isdir(url: str) -> bool:
    import fsspec

    from storage.urls import fs_options

    fs, path = fsspec.core.url_to_fs(url, **fs_options(url))
    try:
        return bool(fs.isdir(path))
    except OSError:
        return False  # opening it as a file gives the clear error


def _remote_files(url: str) -> list[str]:
    """The .jsonl / .json files directly in a remote directory, sorted, as URLs."""
    import fsspec

    from storage.urls import fs_options

    fs, path = fsspec.core.url_to_fs(url, **fs_options(url))
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith((".jsonl", ".json")))
    return [fs.unstrip_protocol(p) for p in names]


def _is_records_artifact(url: str) -> bool:
    parts = url.rstrip("/").rsplit("/", 2)
    if len(parts) != 3:
        return False
    try:
        store, stage, key = ArtifactStore.for_url(url)
        return store.is_done(stage, key)
    except Exception:  # noqa: BLE001 (any unreadable URL is simply not an artifact)
        return False


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass
class KindStats:
    """Summed events of one prompt kind."""

    prompts: int = 0
    lossless: int = 0
    mismatched: list[str] = dataclasses.field(default_factory=list)
    divergences: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    verify_forwards: int = 0
    accepted: int = 0
    emitted: int = 0
    accept_counts: list[int] = dataclasses.field(default_factory=list)
    proposed: list[int] = dataclasses.field(default_factory=list)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    draft_forwards: int = 0
    target_forwards: int = 0
    spec_wall_s: float = 0.0
    baseline_wall_s: float = 0.0
    baseline_tokens: int = 0

    def add(self, r: SpecResult, steps: int) -> None:
        if not self.accept_counts:
            self.accept_counts, self.proposed = [0] * steps, [0] * steps
        self.verify_forwards += len(r.accepted_per_forward)
        self.accepted += sum(r.accepted_per_forward)
        self.emitted += len(r.tokens)
        for k in range(steps):
            self.accept_counts[k] += r.per_position_accept_counts[k]
            self.proposed[k] += r.per_position_proposed[k]
        self.draft_time_s += r.draft_time_s
        self.target_time_s += r.target_time_s
        self.draft_forwards += r.n_draft_forwards
        self.target_forwards += r.n_target_forwards

    def summary(self, greedy: bool) -> dict[str, Any]:
        vf = self.verify_forwards
        rates = [c / vf if vf else None for c in self.accept_counts]
        cond = []
        for k, c in enumerate(self.accept_counts):
            prev = vf if k == 0 else self.accept_counts[k - 1]
            cond.append(c / prev if prev else None)
        return {
            "prompts": self.prompts,
            "tau": 1 + self.accepted / vf if vf else None,
            "verify_forwards": vf,
            "accepted_tokens": self.accepted,
            "emitted_tokens": self.emitted,
            "accept_rate_per_position": rates,
            "conditional_accept_rate_per_position": cond,
            "accept_counts_per_position": self.accept_counts,
            "draft_time_s": self.draft_time_s,
            "target_time_s": self.target_time_s,
            "draft_forwards": self.draft_forwards,
            "target_forwards": self.target_forwards,
            "draft_ms_per_forward": 1e3 * self.draft_time_s / max(self.draft_forwards, 1),
            "target_ms_per_forward": 1e3 * self.target_time_s / max(self.target_forwards, 1),
            "speculative_wall_s": self.spec_wall_s,
            "baseline_wall_s": self.baseline_wall_s,
            "speculative_tokens_per_s": self.emitted / self.spec_wall_s
            if self.spec_wall_s
            else None,
            "baseline_tokens_per_s": self.baseline_tokens / self.baseline_wall_s
            if self.baseline_wall_s
            else None,
            "speedup": (self.emitted / self.spec_wall_s)
            / (self.baseline_tokens / self.baseline_wall_s)
            if self.spec_wall_s and self.baseline_wall_s and self.baseline_tokens
            else None,
            "lossless": self.lossless if greedy else None,
            "lossless_checked": self.prompts if greedy else 0,
            "mismatched_sample_ids": self.mismatched,
            "divergences": self.divergences,
        }


@torch.no_grad()
def divergence(
    target: torch.nn.Module, prompt: EvalPrompt, base: list[int], spec: list[int]
) -> dict[str, Any]:
    """Where a speculative output first left greedy decoding, and the target's logit margin
    there (one full forward over the common prefix, no cache).

    A margin near 0 (e.g. < 1e-3 in fp32, < 0.1 in bf16) is a near-tie that batched verify
    and one-token decoding round differently; a large margin means a real bug.
    """
    i = next(
        (j for j, (a, b) in enumerate(zip(base, spec, strict=False)) if a != b),
        min(len(base), len(spec)),
    )
    out: dict[str, Any] = {"sample_id": prompt.sample_id, "position": i}
    if i < len(base) and i < len(spec):
        device = next(target.parameters()).device
        ids = torch.tensor([[*prompt.input_ids, *base[:i]]], device=device)
        logits = target(input_ids=ids).logits[0, -1].float()
        out.update(
            greedy_token=base[i],
            speculative_token=spec[i],
            logit_margin=float(logits[base[i]] - logits[spec[i]]),
        )
    return out


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def measure(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: Sequence[EvalPrompt],
    cfg: EvalConfig,
    eos_token_id: int | Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Decode every prompt plainly and speculatively; the report dict (see module docstring)."""
    device = next(target.parameters()).device
    greedy = cfg.temperature == 0
    stats = {k: KindStats() for k in KINDS}
    if prompts:  # warm-up: first-call allocations must not count against either side
        warm = torch.tensor([prompts[0].input_ids], device=device)
        greedy_generate(target, warm, 2)
        speculative_generate(
            target,
            draft,
            warm,
            2,
            steps=cfg.steps,
            mode=cfg.mode,
            topk=cfg.topk,
            total_tokens=cfg.total_tokens,
        )
    for i, p in enumerate(prompts):
        ids = torch.tensor([p.input_ids], device=device)
        base, t_base = _timed(
            device, lambda ids=ids: greedy_generate(target, ids, cfg.max_new_tokens, eos_token_id)
        )
        spec, t_spec = _timed(
            device,
            lambda ids=ids, i=i: speculative_generate(
                target,
                draft,
                ids,
                cfg.max_new_tokens,
                steps=cfg.steps,
                mode=cfg.mode,
                topk=cfg.topk,
                total_tokens=cfg.total_tokens,
                temperature=cfg.temperature,
                eos_token_id=eos_token_id,
                seed=cfg.seed + i,
            ),
        )
        s = stats[p.kind]
        s.prompts += 1
        s.add(spec, cfg.steps)
        s.spec_wall_s += t_spec
        s.baseline_wall_s += t_base
        s.baseline_tokens += len(base)
        if greedy:
            if spec.tokens == base:
                s.lossless += 1
            else:
                s.mismatched.append(p.sample_id)
                s.divergences.append(divergence(target, p, base, spec.tokens))
                log.warning(
                    "evaluate: %s: speculative output differs from greedy (%s)",
                    p.sample_id,
                    s.divergences[-1],
                )
        if progress is not None:
            progress(i + 1, len(prompts))
    total = KindStats()
    for s in stats.values():
        if not s.prompts:
            continue
        if not total.accept_counts:
            total.accept_counts, total.proposed = [0] * cfg.steps, [0] * cfg.steps
        for f in dataclasses.fields(KindStats):
            a, b = getattr(total, f.name), getattr(s, f.name)
            if f.name in ("accept_counts", "proposed"):
                setattr(total, f.name, [x + y for x, y in zip(a, b, strict=True)])
            else:
                setattr(total, f.name, a + b)
    return {
        "mode": cfg.mode,
        "steps": cfg.steps,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "device": str(device),
        "kinds": {k: s.summary(greedy) for k, s in stats.items() if s.prompts},
        "all": total.summary(greedy),
    }


# ---------------------------------------------------------------------------------------------
# reports


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def report_markdown(report: dict[str, Any]) -> str:
    """A markdown table per kind (and all prompts): τ, acceptance per position, times."""
    steps = report["steps"]
    head = [
        "kind",
        "prompts",
        "τ",
        *[f"acc@{k + 1}" for k in range(steps)],
        "draft ms/fwd",
        "target ms/fwd",
        "speedup",
        "lossless",
    ]
    lines = [
        f"# Speculative decoding: {report['mode']}, {steps} steps, "
        f"temperature {report['temperature']}, device {report['device']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    rows = [*report["kinds"].items(), ("all", report["all"])]
    for kind, s in rows:
        lossless = (
            f"{s['lossless']}/{s['lossless_checked']}"
            if s["lossless"] is not None
            else "n/a (sampling)"
        )
        cells = [
            kind,
            str(s["prompts"]),
            _fmt(s["tau"], ".2f"),
            *[_fmt(r, ".2f") for r in s["accept_rate_per_position"]],
            _fmt(s["draft_ms_per_forward"], ".2f"),
            _fmt(s["target_ms_per_forward"], ".2f"),
            _fmt(s["speedup"], ".2f") + ("x" if s["speedup"] is not None else ""),
            lossless,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "τ = tokens per verify forward = 1 + accepted / verify forwards (counted). acc@k = "
        "share of verify forwards that accepted at least k draft tokens. Speedup = plain "
        "greedy wall time / speculative wall time for the same prompts on this device.",
        "",
    ]
    return "\n".join(lines)


def plot_acceptance(report: dict[str, Any], path: str) -> None:
    """acceptance.png: acceptance rate per draft position, one line per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = list(range(1, report["steps"] + 1))
    for kind, s in [*report["kinds"].items(), ("all", report["all"])]:
        rates = [r if r is not None else float("nan") for r in s["accept_rate_per_position"]]
        tau = s["tau"]
        ax.plot(steps, rates, marker="o", label=f"{kind} (τ={_fmt(tau, '.2f')})")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(k-th draft token accepted)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{report['mode']} drafting, {report['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def key_params(cfg: EvalConfig) -> Any:
    """`cfg` as the key sees it: `vllm_python` never counts (where vLLM is installed), and
    engine="ours" hashes exactly as before the engine field existed (older artifacts keep
    their keys); engine="vllm" is in the key."""
    from storage.keys import canonical

    doc = canonical(cfg)
    doc.pop("vllm_python")
    if cfg.engine == "ours":
        doc.pop("engine")
    return doc


# ---------------------------------------------------------------------------------------------
# the stage


def evaluate(
    store: ArtifactStore,
    export_ref: StageRef,
    cfg: EvalConfig,
    prompts: Sequence[EvalPrompt] | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    train_ref: StageRef | None = None,
) -> StageRef:
    """The evaluate stage: `<root>/evaluate/<key>/{report.json, report.md, acceptance.png}`,
    plus `consistency.{json,md}` (eagle_core/consistency.py) when `train_ref` is given.

    Args:
        store: the artifact store.
        export_ref: an export artifact (config.json + model.safetensors).
        cfg: prompts and decoding settings.
        prompts: explicit prompts (tests, notebooks); None = load those cfg.prompts names.
            They are part of the cache key.
        force: recompute even if a finished artifact exists.
        progress: called with (prompts done, prompts total).
        train_ref: the training run the export was made from: its held-out per-step
            accuracy is compared with the measured acceptance (part of the key when given).

    Raises:
        ConfigError: `train_ref` is not the run the export was made from.
        ModelMismatchError: the draft does not fit the target.
        DataError: no usable prompt.
    """
    from eagle_core.export import load_exported_draft
    from eagle_core.models import load_target, load_tokenizer

    extra = [dataclasses.asdict(p) for p in prompts] if prompts is not None else None
    params: Any = key_params(cfg) if extra is None else {"cfg": key_params(cfg), "prompts": extra}
    from storage.fingerprint import model_fingerprint

    inputs = [export_ref] if train_ref is None else [export_ref, train_ref]
    export_manifest = store.manifest(export_ref.stage, export_ref.key)
    target_ref = cfg.target or str(export_manifest.meta.get("target") or "")
    # the target as it is now decides tau: evaluating on a target updated in place re-runs
    fingerprints: dict[str, Any] | None = None
    if target_ref:
        fingerprints = {"target": model_fingerprint(target_ref)}
        if cfg.tokenizer and cfg.tokenizer != target_ref:
            fingerprints["tokenizer"] = model_fingerprint(cfg.tokenizer, part="tokenizer")
    key = store.key(STAGE, params, inputs=inputs, code=CODE_VERSION, fingerprints=fingerprints)
    if store.is_done(STAGE, key) and not force:
        log.info("evaluate %s: cached", key)
        return store.ref(STAGE, key)
    if train_ref is not None:
        made_from = [i.get("key") for i in export_manifest.inputs if i.get("stage") == "train"]
        if made_from and train_ref.key not in made_from:
            raise ConfigError(
                f"evaluate: train_ref {train_ref.url} is not the run export {export_ref.url} "
                f"was made from (train key {made_from[0]})",
                fix="pass the train artifact the export was made from, or no train_ref",
            )
    meta = export_manifest.meta
    target_name = cfg.target or str(meta.get("target") or "")
    if not target_name:
        raise ConfigError(
            "evaluate.target is empty and the export names no target",
            fix="set evaluate.target to the target model",
        )
    log.info("evaluate %s: draft %s, target %s", key, export_ref.url, target_name)
    target = load_target(target_name, dtype=cfg.dtype, device=cfg.device)
    tokenizer = load_tokenizer(cfg.tokenizer or target_name)
    skipped: dict[str, int] = {}
    if prompts is None:
        prompts, skipped = load_prompts(cfg, tokenizer, target_name)
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = store.local_dir(export_ref, os.path.join(tmp, "draft"))
        draft = load_exported_draft(export_dir, target)  # checks the draft fits the target
        eos = stop_token_ids(target, tokenizer)
        if cfg.engine == "vllm":
            from eagle_core.engine_vllm import measure_vllm, vllm_python
            from eagle_core.models import resolve_model_dir

            python = vllm_python(cfg.vllm_python)
            del draft, target  # vLLM loads its own copies
            target_dir = resolve_model_dir(target_name)
            report = measure_vllm(target_dir, export_dir, list(prompts), cfg, eos, python)
            if progress is not None:  # one driver call: nothing to report before it ends
                progress(len(prompts), len(prompts))
        else:
            report = measure(target, draft, list(prompts), cfg, eos_token_id=eos, progress=progress)
        report.update(target=target_name, draft=export_ref.url, skipped_prompts=skipped)
        png = os.path.join(tmp, "acceptance.png")
        plot_acceptance(report, png)
        consistency = None
        if train_ref is not None:
            from eagle_core.consistency import CONSISTENCY_JSON, CONSISTENCY_MD, consistency_for

            consistency = consistency_for(store, train_ref, report, store.url(STAGE, key))
        with store.publish(STAGE, key, params=params, inputs=inputs, force=force) as w:
            w.write_json("report.json", report)
            w.write_bytes("report.md", report_markdown(report).encode())
            if consistency is not None:
                w.write_bytes(CONSISTENCY_JSON, consistency.to_json().encode())
                w.write_bytes(CONSISTENCY_MD, consistency.to_markdown().encode())
                w.meta.update(
                    tau_predicted={k.kind: k.tau_predicted for k in consistency.kinds},
                    train=train_ref.url,
                )
            with open(png, "rb") as fh:
                w.write_bytes("acceptance.png", fh.read())
            a = report["all"]
            w.counts.update(
                prompts=a["prompts"],
                lossless=a["lossless"],
                mismatched=len(a["mismatched_sample_ids"]),
                tau=a["tau"],
                speedup=a["speedup"],
            )
            w.meta.update(
                tau={k: s["tau"] for k, s in report["kinds"].items()} | {"all": a["tau"]},
                per_position_acceptance=a["accept_rate_per_position"],
                mode=cfg.mode,
                target=target_name,
            )
            # provenance for promotion: the training data the draft was made from (the
            # target's fingerprint, as evaluated, is added by the store)
            lineage = store.lineage_fingerprints([export_ref])
            w.meta["fingerprints"] = {"sources": lineage["sources"]}
    log.info(
        "evaluate %s: τ=%s, lossless %s/%s",
        key,
        _fmt(report["all"]["tau"], ".2f"),
        report["all"]["lossless"],
        report["all"]["lossless_checked"],
    )
    return store.ref(STAGE, key)
