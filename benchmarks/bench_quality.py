"""Draft quality on the demo target: τ (chain k=5, greedy) on held-out FIM and chat prompts.

Compared in one run, same data, same steps, same seed:
- an EAGLE-3 draft trained with training-time test (TTT, 7 unrolled steps, aligned masks);
- the limit k+1 = 6 (every drafted token accepted);
- the same draft trained without TTT (ttt_steps=1: next-token only, as plain EAGLE-1/2 do);
- the speculative-decoding wall-clock speedup over plain greedy decoding of the target on
  the same prompts, and the lossless count (speculative output == greedy output).
Goal: τ >= 4.5 on FIM, >= 3.5 on chat, every output identical to greedy.

Everything goes through the pipeline's own stage functions (download, tokenize, scan_vocab,
extract_hidden, train (inline launcher), export, evaluate) into one artifact store, so the
stages shared with `bench_alignment` and `bench_regenerate` (data, and the aligned draft of
seed 0) are computed once and reused from the cache by the others.

Run: .venv/bin/python -m benchmarks.bench_quality --target <build_demo_target artifact URL>
     (default: build the full demo target into --store first; ~10+ min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.measure import save
from storage import ArtifactStore, StageRef

log = logging.getLogger("bench_quality")

DEFAULT_STORE = os.environ.get("EAGLE_BENCH_STORE", "artifacts/bench")
TRAIN_FILES = (("data/chat_sharegpt.train.jsonl", "chat"), ("data/fim.train.jsonl", "fim"))
HELDOUT_FILES = (("data/chat_sharegpt.heldout.jsonl", "chat"), ("data/fim.heldout.jsonl", "fim"))


@dataclass(frozen=True)
class Budget:
    """The training / evaluation budget of every draft in these benchmarks (recorded in JSON)."""

    # Sized for 2 busy CPU cores (~7 min of training per draft); a GPU run can use 10x more.
    train_samples: int = 160  # per kind (chat, FIM), from the demo target's train files
    heldout_samples: int = 32  # per kind, for the held-out per-step accuracy (τ predicted)
    max_length: int = 256  # tokens per training sample
    draft_vocab_size: int = 4096  # of the demo target's 8192
    steps: int = 40  # optimizer steps (2 busy CPU cores: ~10 s per step)
    batch_size: int = 4  # samples per step
    lr: float = 1e-3  # short runs need a larger rate than the reference 5e-5
    eval_prompts: int = 12  # held-out prompts per kind
    eval_new_tokens: int = 40  # generated per prompt
    chain_steps: int = 5  # k


@dataclass
class Data:
    """The prepared (cached) inputs every draft variant trains and is evaluated on."""

    target: str
    train_records: list[StageRef]
    heldout_records: list[StageRef]
    tokens: list[StageRef]
    vocab: StageRef
    hidden: list[StageRef]
    heldout_hidden: list[StageRef]


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", default=DEFAULT_STORE, help="artifact root (shared cache)")
    ap.add_argument(
        "--target",
        default=os.environ.get("EAGLE_BENCH_TARGET", ""),
        help="demo target artifact URL (default: $EAGLE_BENCH_TARGET, else build it)",
    )
    ap.add_argument("--steps", type=int, default=Budget.steps)
    ap.add_argument("--train-samples", type=int, default=Budget.train_samples)
    ap.add_argument("--eval-prompts", type=int, default=Budget.eval_prompts)
    ap.add_argument("--eval-new-tokens", type=int, default=Budget.eval_new_tokens)
    ap.add_argument("--heldout-samples", type=int, default=Budget.heldout_samples)
    ap.add_argument("--draft-vocab", type=int, default=Budget.draft_vocab_size)


def budget_from_args(args: argparse.Namespace) -> Budget:
    return Budget(
        steps=args.steps,
        train_samples=args.train_samples,
        eval_prompts=args.eval_prompts,
        eval_new_tokens=args.eval_new_tokens,
        heldout_samples=args.heldout_samples,
        draft_vocab_size=args.draft_vocab,
    )


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def resolve_target(store: ArtifactStore, target: str) -> str:
    """The demo target's artifact URL: the given one, or the full demo target built here."""
    if target:
        return target.rstrip("/")
    from eagle_core.demo import DemoTargetConfig, build_demo_target

    return build_demo_target(store, DemoTargetConfig()).url


@dataclass
class Run:
    """What every quality benchmark starts from (`start`)."""

    args: argparse.Namespace
    budget: Budget
    store: ArtifactStore
    target: str  # the demo target's artifact URL
    data: Data
    started: float  # time.time() before the target was resolved: the benchmark's wall_s


def parser(doc: str) -> argparse.ArgumentParser:
    """A command line described by `doc`'s first line, with the common arguments."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(ap)
    return ap


def start(args: argparse.Namespace, extract_train: bool = True) -> Run:
    """Log to stderr, resolve (or build) the target and prepare the shared, cached data
    (`extract_train`: see `prepare`)."""
    setup_logging()
    budget = budget_from_args(args)
    store = ArtifactStore(args.store)
    started = time.time()
    target = resolve_target(store, args.target)
    data = prepare(store, target, budget, extract_train=extract_train)
    return Run(args, budget, store, target, data, started)


def _download(store: ArtifactStore, path: str, kind: str, n: int | None) -> StageRef:
    from eagle_core.download import DownloadConfig, SourceSpec, download

    cfg = DownloadConfig(sources=(SourceSpec(path=path, kind=kind),), max_samples=n, seed=0)
    return download(store, cfg)


def tokenize_only(
    store: ArtifactStore,
    target: str,
    records: StageRef,
    kind: str,
    budget: Budget,
    loss_on: str = "answer",
) -> StageRef:
    """tokenize one records artifact with the target's tokenizer (the benchmarks' settings)."""
    from eagle_core.tokenize import TokenizeConfig, tokenize

    tcfg = TokenizeConfig(
        tokenizer=target, format=kind, max_length=budget.max_length, loss_on=loss_on
    )
    return tokenize(store, records, tcfg)


def tokenize_and_extract(
    store: ArtifactStore,
    target: str,
    records: StageRef,
    kind: str,
    budget: Budget,
    loss_on: str = "answer",
) -> tuple[StageRef, StageRef]:
    """tokenize -> extract_hidden of one records artifact with the target."""
    from eagle_core.extract import ExtractConfig, extract_hidden

    tok = tokenize_only(store, target, records, kind, budget, loss_on)
    hid = extract_hidden(
        store, tok, ExtractConfig(target=target, batch_size=8, model_dtype="float32")
    )
    return tok, hid


def prepare(store: ArtifactStore, target: str, budget: Budget, extract_train: bool = True) -> Data:
    """download -> tokenize -> scan_vocab -> extract_hidden for the train and held-out files.

    extract_train=False skips extract_hidden of the train files (`Data.hidden` is empty): for
    a caller that trains only on other data (the vocabulary map still comes from them).
    """
    from eagle_core.vocab import VocabConfig, scan_vocab

    t0 = time.time()
    train_records, heldout_records, tokens, hidden, heldout_hidden = [], [], [], [], []
    for name, kind in TRAIN_FILES:
        rec = _download(store, f"{target}/{name}", kind, budget.train_samples)
        if extract_train:
            tok, hid = tokenize_and_extract(store, target, rec, kind, budget)
            hidden.append(hid)
        else:
            tok = tokenize_only(store, target, rec, kind, budget)
        train_records.append(rec)
        tokens.append(tok)
    for name, kind in HELDOUT_FILES:
        rec = _download(store, f"{target}/{name}", kind, budget.heldout_samples)
        _tok, hid = tokenize_and_extract(store, target, rec, kind, budget)
        heldout_records.append(rec)
        heldout_hidden.append(hid)
    vocab = scan_vocab(store, tokens, VocabConfig(draft_vocab_size=budget.draft_vocab_size))
    log.info("data ready in %.0f s", time.time() - t0)
    return Data(target, train_records, heldout_records, tokens, vocab, hidden, heldout_hidden)


def predicted_tau(step_acc: list[float | None] | None, k: int) -> float | None:
    """τ predicted from per-step held-out rates a_1..a_k read as conditional acceptance rates:
    τ = 1 + Σ_{i=1..k} Π_{j<=i} a_j. The rates are the serving-faithful conditional ones
    (`heldout_step_cond_acc`) when the run logged them, else the teacher-forced accuracies.
    None when fewer than k steps were trained, or a rate is unknown (None: no held-out chain
    reached that step) while the product is still above 0 (a product of 0 stays 0)."""
    if not step_acc or len(step_acc) < k:
        return None
    tau, run = 1.0, 1.0
    for a in step_acc[:k]:
        if a is None and run != 0.0:
            return None
        run = 0.0 if a is None else run * a
        tau += run
    return tau


def consistency_rows(store: ArtifactStore, trained: StageRef, report: dict) -> dict[str, Any]:
    """τ predicted / measured / gap per kind from `eagle_core.consistency` (when present);
    these override the local `predicted_tau` figures."""
    try:
        from eagle_core.consistency import consistency_for
    except ImportError:
        return {}
    rep = consistency_for(store, trained, report)
    out: dict[str, Any] = {
        "tau_predicted_source": "eagle_core.consistency",
        "tau_predicted_from": rep.predicted_from,  # "conditional" or "teacher-forced"
    }
    for k in rep.kinds:
        suffix = "" if k.kind == "all" else f"_{k.kind}"
        out[f"tau_predicted{suffix}"] = k.tau_predicted
        out[f"tau_predicted_teacher_forced{suffix}"] = k.tau_predicted_teacher_forced
        out[f"tau_gap{suffix}"] = k.tau_gap
    out["consistency_notes"] = list(rep.notes)
    return out


def train_and_evaluate(
    store: ArtifactStore,
    data: Data,
    budget: Budget,
    *,
    label: str,
    seed: int = 0,
    ttt_steps: int = 7,
    alignment: str = "aligned",
    hidden: list[StageRef] | None = None,
) -> dict[str, Any]:
    """Train a draft (inline launcher), export it, evaluate it; one result row.

    `hidden` replaces the training hidden-state artifacts (e.g. regenerated data).
    """
    from eagle_core.evaluate import EvalConfig, evaluate
    from eagle_core.export import ExportConfig, export
    from eagle_core.launch import launch_training
    from eagle_core.train import TrainConfig

    cfg = TrainConfig(
        store=store.root,
        target=data.target,
        data=tuple(h.url for h in (hidden or data.hidden)),
        heldout=tuple(h.url for h in data.heldout_hidden),
        vocab_map=data.vocab.url,
        ttt_steps=ttt_steps,
        ttt_alignment=alignment,  # type: ignore[arg-type]
        lr=budget.lr,
        steps=budget.steps,
        batch_size=budget.batch_size,
        warmup_steps=max(1, budget.steps // 20),
        seed=seed,
        log_every=10,
    )
    t0 = time.time()
    trained = launch_training(cfg, 1, launcher="inline")
    t_train = time.time() - t0
    exported = export(store, trained, ExportConfig(target=data.target))
    ecfg = EvalConfig(
        target=data.target,
        prompts=tuple(r.url for r in data.heldout_records),
        max_prompts=budget.eval_prompts,
        max_new_tokens=budget.eval_new_tokens,
        steps=budget.chain_steps,
    )
    t0 = time.time()
    evaluated = evaluate(store, exported, ecfg)
    t_eval = time.time() - t0
    report = store.read_json(evaluated, "report.json")
    counts = store.manifest(trained.stage, trained.key).counts
    step_acc = counts.get("heldout_step_acc")
    cond_acc = counts.get("heldout_step_cond_acc")  # serving-faithful; None for older runs
    row: dict[str, Any] = {
        "draft": label,
        "seed": seed,
        "ttt_steps": ttt_steps,
        "alignment": alignment,
        "train_url": trained.url,
        "evaluate_url": evaluated.url,
        "train_s": t_train,
        "evaluate_s": t_eval,
        "heldout_step_acc": step_acc,
        "heldout_step_cond_acc": cond_acc,
        "tau_predicted": predicted_tau(cond_acc or step_acc, budget.chain_steps),
        "tau_predicted_teacher_forced": predicted_tau(step_acc, budget.chain_steps),
    }
    for kind in ("fim", "chat"):
        s = report["kinds"].get(kind)
        if s is None:
            continue
        rates = s["accept_rate_per_position"]
        row.update(
            {
                f"tau_{kind}": s["tau"],
                f"accept_rate_{kind}": rates,
                f"first_token_accept_{kind}": rates[0] if rates else None,
                f"speedup_{kind}": s["speedup"],
                f"lossless_{kind}": f"{s['lossless']}/{s['lossless_checked']}",
            }
        )
    a = report["all"]
    row.update(
        tau_all=a["tau"],
        speedup_all=a["speedup"],
        lossless_all=f"{a['lossless']}/{a['lossless_checked']}",
        # gap = measured - predicted (the sign eagle_core.consistency uses)
        tau_gap=(a["tau"] - row["tau_predicted"])
        if row["tau_predicted"] is not None and a["tau"] is not None
        else None,
    )
    row.update(consistency_rows(store, trained, report))
    log.info(
        "%s: tau fim %s chat %s (train %.0f s, eval %.0f s)",
        label,
        row.get("tau_fim"),
        row.get("tau_chat"),
        t_train,
        t_eval,
    )
    return row


def short(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The result-table row of a run: `keys` of `row` in that order (None where missing)."""
    return {k: row.get(k) for k in keys}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument(
        "--loss-on-all",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the TTT draft with tokenize loss_on='all' (every token a position)",
    )
    run = start(ap.parse_args())
    store, data, budget, target = run.store, run.data, run.budget, run.target
    ttt = train_and_evaluate(store, data, budget, label="TTT 7 steps (aligned)")
    no_ttt = train_and_evaluate(store, data, budget, label="no TTT (1 step)", ttt_steps=1)
    variants = [ttt, no_ttt]
    if run.args.loss_on_all:
        hidden_all = [
            tokenize_and_extract(store, target, rec, kind, budget, loss_on="all")[1]
            for rec, (_name, kind) in zip(data.train_records, TRAIN_FILES, strict=True)
        ]
        variants.append(
            train_and_evaluate(
                store, data, budget, label="TTT 7 steps, loss on every token", hidden=hidden_all
            )
        )
    limit = float(budget.chain_steps + 1)
    keys = ("draft", "tau_fim", "tau_chat", "speedup_all", "lossless_all")
    rows = [short(r, keys) for r in variants]
    rows.append({"draft": "limit k+1", "tau_fim": limit, "tau_chat": limit})
    goal_fim, goal_chat = 4.5, 3.5
    save(
        "draft_quality",
        rows,
        command="python -m benchmarks.bench_quality --target " + target,
        target_model=target,
        budget=dataclasses.asdict(budget),
        runs=variants,
        goal={"tau_fim": goal_fim, "tau_chat": goal_chat, "lossless": "all"},
        met={
            "tau_fim": (ttt.get("tau_fim") or 0) >= goal_fim,
            "tau_chat": (ttt.get("tau_chat") or 0) >= goal_chat,
            "lossless": all(
                r[f"lossless_{k}"].split("/")[0] == r[f"lossless_{k}"].split("/")[1]
                for r in variants
                for k in ("fim", "chat")
                if f"lossless_{k}" in r
            ),
        },
        ttt_gain={
            k: (ttt.get(f"tau_{k}") or 0) - (no_ttt.get(f"tau_{k}") or 0) for k in ("fim", "chat")
        },
        wall_s=time.time() - run.started,
    )


if __name__ == "__main__":
    main()
