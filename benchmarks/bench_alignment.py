"""Reference-style vs aligned training-time test (issue 12), on the demo target.

Same data, steps and seed per pair; `--seeds` seeds each (issue: 3). For each draft:
- τ (chain k=5, greedy) on held-out FIM and chat prompts (the evaluate stage);
- the first-token acceptance rate on FIM prompts (the evaluator's position-1 acceptance:
  how often the first drafted token of a round is accepted, over every round of the FIM
  middles) — the reference loss mask never trains the first token of a middle;
- τ predicted from the held-out per-step accuracy of training (as conditional acceptance
  rates: 1 + Σ_i Π_{j<=i} a_j, k=5) and its gap to the measured τ (all prompts):
  `tau_predicted` from the serving-faithful conditional rates when the run logged them
  (`tau_predicted_from` says which), `tau_predicted_teacher_forced` from the teacher-forced
  per-step accuracy, each with its gap (measured − predicted).
Reference = `ttt_alignment="reference"`: what SpecForge 0.2.0 and EAGLE-3's current
`cnets.py` train (tests/eagle_core/test_specforge_peer.py): the same forward as aligned (RoPE
t+k, plain causal attention), loss weight `loss_mask[t+k]` and each step's loss divided by
all B·T positions; aligned = the pipeline's default (the predicted token's mask, divided by
the weighted positions). See eagle_core/loss.py. Results before 2026-12-04
(alignment-200steps.json) trained an older "reference" that also used RoPE position t and a
shifted-diagonal attention mask, which those trainers no longer compute.

Data and the aligned seed-0 draft are shared with `bench_quality` (same store, same keys):
whatever it already computed is reused.

Run: .venv/bin/python -m benchmarks.bench_alignment --target <demo target URL> [--seeds 3]
     [--steps N --result-name alignment-Nsteps]  (writes benchmarks/results/<name>.json)
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from benchmarks.bench_quality import parser, start, train_and_evaluate
from benchmarks.measure import save

METRICS = (
    "tau_fim",
    "tau_chat",
    "first_token_accept_fim",
    "tau_predicted",
    "tau_predicted_teacher_forced",
    "tau_all",
    "tau_gap",
    "tau_gap_teacher_forced",
    "tau_gap_fim",
    "tau_gap_chat",
)
PER_SEED = ("tau_fim", "tau_chat", "tau_all", "tau_predicted", "tau_predicted_teacher_forced")


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _std(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.stdev(vals) if len(vals) > 1 else None


def _abs_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    return _mean([{"g": abs(r[key])} for r in _rs_with(rows, key)], "g")


def _rs_with(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The runs that have a value (not None) for `key`."""
    return [r for r in rows if r.get(key) is not None]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--result-name",
        default="alignment",
        help="writes benchmarks/results/<name>.json (e.g. alignment-200steps for a longer run)",
    )
    run = start(ap.parse_args())
    store, data, budget, target, args = run.store, run.data, run.budget, run.target, run.args
    runs: dict[str, list[dict[str, Any]]] = {"aligned": [], "reference": []}
    for seed in range(args.seeds):  # seed-major: a cut-short run still has both schemes
        for scheme in ("aligned", "reference"):
            runs[scheme].append(
                train_and_evaluate(
                    store,
                    data,
                    budget,
                    label=f"TTT 7 steps ({scheme})",
                    seed=seed,
                    alignment=scheme,
                )
            )
    for rs in runs.values():  # gap to the teacher-forced prediction (measured − predicted)
        for r in rs:
            tf, tau = r.get("tau_predicted_teacher_forced"), r.get("tau_all")
            r["tau_gap_teacher_forced"] = tau - tf if tf is not None and tau is not None else None
    rows = []
    for scheme, rs in runs.items():
        row: dict[str, Any] = {"training": scheme, "seeds": len(rs)}
        for m in METRICS:
            row[m] = _mean(rs, m)
            if m in ("tau_fim", "tau_chat"):
                row[m + "_std"] = _std(rs, m)
        row["abs_tau_gap"] = _abs_mean(rs, "tau_gap")
        row["abs_tau_gap_teacher_forced"] = _abs_mean(rs, "tau_gap_teacher_forced")
        # "conditional" / "teacher-forced" (eagle_core.consistency), one entry per distinct value
        row["tau_predicted_from"] = "/".join(sorted({str(r.get("tau_predicted_from")) for r in rs}))
        for m in PER_SEED:
            row[m + "_per_seed"] = [r.get(m) for r in rs]
        rows.append(row)
    a, r = rows
    save(
        args.result_name,
        rows,
        command=f"python -m benchmarks.bench_alignment --seeds {args.seeds} --steps "
        f"{budget.steps} --train-samples {budget.train_samples} --target {target}",
        target_model=target,
        budget=dataclasses.asdict(budget),
        seeds=args.seeds,
        runs=runs,
        aligned_minus_reference={
            m: (a[m] - r[m]) if a[m] is not None and r[m] is not None else None
            for m in (*METRICS, "abs_tau_gap", "abs_tau_gap_teacher_forced")
        },
        wall_s=time.time() - run.started,
    )


if __name__ == "__main__":
    main()
