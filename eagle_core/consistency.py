"""Does training accuracy predict serving acceptance? Training's per-step held-out accuracy
next to the evaluator's measured acceptance, and τ predicted from one next to τ measured.

Notation: K the evaluator's chain length (`report.json` "steps"), a_k (k = 1..K) the training
run's held-out rate for TTT step k-1 (step k-1 at index t is draft position k of a chain rooted
at t, see eagle_core/loss.py), N_k the evaluator's verify rounds that accepted at least k draft
tokens, R its verify rounds.

a_k is, when the run logged it (`step_cond_acc`, train CODE after issue 12), the
serving-faithful conditional acceptance: over held-out chains still alive at step k-1 (every
earlier step hit, and every teacher-forced input token equals the target's argmax, i.e. what
a greedy serving engine would have fed), the fraction whose draft argmax equals the target
argmax. Older runs have only the teacher-forced per-step accuracy (`step_acc`: over all
positions, whatever earlier steps did); it is then used instead, and the report says so. The
teacher-forced prediction is always shown too: it over-predicts when a draft's errors are
correlated across steps (a product of marginal accuracies assumes independence).

What is compared, per draft position k:

    training             a_k (conditional)         ≈ P(position k accepted | 1..k-1 accepted)
    measured (evaluate)  c_k = N_k / N_{k-1}       (N_0 = R; report "conditional_accept_rate…")
    predicted            p_k = a_1 · … · a_k       ≈ P(at least k accepted)
    measured (evaluate)  r_k = N_k / R             (report "accept_rate_per_position")

    τ_pred = 1 + Σ_{k=1..K} p_k                   τ_meas = 1 + Σ accepted / R = 1 + Σ_k r_k

The conditional a_k estimates c_k, and the product of conditional acceptances estimates r_k
(a step no chain reached has no a_k; when the product is already 0 there it stays 0); the gaps
(measured − predicted) show where training and serving disagree. Known reasons for a gap
besides misalignment, listed in every report's notes: training accuracy skips positions
whose target argmax is outside the draft vocab (serving always rejects those); the held-out
split of training is not the evaluator's prompt set; the last round of a prompt may propose
fewer than K tokens (max_new_tokens / end of text), which lowers r_k; sampling (temperature
> 0) and tree drafting are not what a_k models.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from eagle_core.errors import DataError
from eagle_core.metrics import METRICS_FILE
from storage import ArtifactStore, StageRef

log = logging.getLogger(__name__)

CONSISTENCY_JSON = "consistency.json"
CONSISTENCY_MD = "consistency.md"
KIND_ORDER = ("chat", "fim", "all")


@dataclass(frozen=True)
class TrainAccuracy:
    """The per-step accuracy a report predicts from, and where it came from.

    Attributes:
        step_acc: accuracy of TTT step 0, 1, ... (draft positions 1, 2, ...); () = none logged.
        source: "heldout" (held-out split, what the report wants) or "train" (training
            batches: the run had no held-out split), or "none".
        step: the optimizer step the accuracy was measured at (None = unknown).
        samples: held-out samples it was measured on (None = unknown).
        step_count: positions each step's accuracy was measured on, when the record has
            them (`step_count`); a step with 0 positions has no accuracy (its 0.0 is not one).
        step_cond_acc: serving-faithful conditional acceptance of step 0, 1, ... (None where
            no chain reached the step); None = the run did not log it (older runs).
        step_cond_roots: chains each conditional rate was measured on.
    """

    step_acc: tuple[float, ...]
    source: str
    step: int | None = None
    samples: int | None = None
    step_count: tuple[int, ...] | None = None
    step_cond_acc: tuple[float | None, ...] | None = None
    step_cond_roots: tuple[int, ...] | None = None

    def usable_steps(self) -> int:
        """Leading steps with a measured accuracy (all, unless a step had no position)."""
        if self.step_count is None:
            return len(self.step_acc)
        return next((i for i, c in enumerate(self.step_count) if c <= 0), len(self.step_acc))

    @property
    def predictor(self) -> str:
        """Which rates τ is predicted from: "conditional" when logged, else "teacher-forced"."""
        return "conditional" if self.step_cond_acc else "teacher-forced"


@dataclass(frozen=True)
class PositionRow:
    """One draft position k (1-based) of one prompt kind; None where not measured."""

    position: int
    train_acc: float | None  # teacher-forced per-step accuracy of step k-1
    measured_conditional: float | None  # c_k
    conditional_gap: float | None  # c_k - a_k (a_k: the rate the prediction uses)
    predicted_rate: float | None  # p_k = a_1 ... a_k
    measured_rate: float | None  # r_k
    rate_gap: float | None  # r_k - p_k
    train_cond_acc: float | None = None  # serving-faithful conditional rate (None: not logged)
    predicted_rate_teacher_forced: float | None = None  # product of the train_acc values


@dataclass(frozen=True)
class KindConsistency:
    """τ and per-position rows of one prompt kind ("chat", "fim" or "all")."""

    kind: str
    prompts: int
    verify_forwards: int
    tau_predicted: float | None
    tau_measured: float | None
    tau_gap: float | None  # measured - predicted
    positions: tuple[PositionRow, ...]
    tau_predicted_teacher_forced: float | None = None  # from the teacher-forced accuracies


@dataclass(frozen=True)
class ConsistencyReport:
    """Training accuracy vs measured acceptance for every prompt kind of one evaluation."""

    steps: int  # K, the evaluator's chain length
    mode: str
    temperature: float
    train: TrainAccuracy
    predicted_positions: int  # positions τ_pred covers: min(K, TTT steps logged)
    kinds: tuple[KindConsistency, ...]
    notes: tuple[str, ...]
    train_url: str = ""
    eval_url: str = ""
    predicted_from: str = "teacher-forced"  # "conditional" (serving-faithful) or "teacher-forced"

    def kind(self, name: str) -> KindConsistency:
        """The rows of one kind (KeyError when the evaluation had no such prompts)."""
        for k in self.kinds:
            if k.kind == name:
                return k
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what `consistency.json` holds)."""
        d = asdict(self)
        d["train"]["step_acc"] = list(self.train.step_acc)
        for name in ("step_count", "step_cond_acc", "step_cond_roots"):
            if d["train"][name] is not None:
                d["train"][name] = list(d["train"][name])
        return d

    def to_json(self) -> str:
        """`consistency.json`'s text."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        """`consistency.md`: a τ table per kind and a per-position table per kind."""
        src = {
            "heldout": "held-out split",
            "train": "TRAINING batches (no held-out split)",
            "none": "nothing logged",
        }.get(self.train.source, self.train.source)
        at = f" at step {self.train.step}" if self.train.step is not None else ""
        lines = [
            f"# Training accuracy vs serving acceptance ({self.mode}, {self.steps} steps, "
            f"temperature {self.temperature})",
            "",
            f"Training per-step accuracy: {src}{at}"
            + (f", {self.train.samples} samples" if self.train.samples is not None else "")
            + (f" ({self.train_url})" if self.train_url else "")
            + ".",
            "",
            "τ predicted from: "
            + (
                "serving-faithful conditional acceptance (chains along the target's greedy path)"
                if self.predicted_from == "conditional"
                else "teacher-forced per-step accuracy (the run logged no conditional rates)"
            )
            + ".",
            "",
            f"| kind | prompts | τ predicted ({self.predicted_from}) | τ predicted "
            "(teacher-forced) | τ measured | gap (measured − predicted) |",
            "|---|---|---|---|---|---|",
        ]
        for k in self.kinds:
            lines.append(
                f"| {k.kind} | {k.prompts} | {_f(k.tau_predicted)} | "
                f"{_f(k.tau_predicted_teacher_forced)} | {_f(k.tau_measured)} | "
                f"{_f(k.tau_gap, '+.3f')} |"
            )
        for k in self.kinds:
            lines += [
                "",
                f"## {k.kind}",
                "",
                "| position k | train acc (teacher-forced) | train conditional | measured "
                "P(k ok given k−1 ok) | gap | predicted P(≥k ok) | measured P(≥k ok) | gap |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in k.positions:
                lines.append(
                    f"| {r.position} | {_f(r.train_acc)} | {_f(r.train_cond_acc)} | "
                    f"{_f(r.measured_conditional)} | "
                    f"{_f(r.conditional_gap, '+.3f')} | {_f(r.predicted_rate)} | "
                    f"{_f(r.measured_rate)} | {_f(r.rate_gap, '+.3f')} |"
                )
        lines += [
            "",
            "τ predicted = 1 + Σ_k a_1·…·a_k over the evaluator's chain positions (a_k: the "
            "conditional rate when logged, else the teacher-forced accuracy; the teacher-forced "
            "τ is shown too); τ measured = 1 + accepted draft tokens / verify rounds. A gap is "
            "measured − predicted.",
            "",
        ]
        if self.notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)


def _f(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _acc_list(v: Any, where: str) -> tuple[float, ...]:
    if not isinstance(v, Sequence) or isinstance(v, str):
        raise DataError(
            f"{where} is not a list of per-step accuracies ({type(v).__name__})",
            fix="pass the training run's metrics.jsonl rows or its manifest counts",
        )
    out = []
    for i, x in enumerate(v):
        if not isinstance(x, int | float) or isinstance(x, bool) or not 0.0 <= x <= 1.0:
            raise DataError(
                f"{where}[{i}] = {x!r} is not an accuracy in [0, 1]",
                fix="pass the training run's metrics.jsonl rows or its manifest counts",
            )
        out.append(float(x))
    return tuple(out)


def _cond_list(v: Any, where: str) -> tuple[float | None, ...] | None:
    """Conditional rates (None entries: no chain reached the step); None when not logged."""
    if v is None:
        return None
    if not isinstance(v, Sequence) or isinstance(v, str):
        raise DataError(
            f"{where} is not a list of per-step conditional rates ({type(v).__name__})",
            fix="pass the training run's metrics.jsonl rows or its manifest counts",
        )
    out: list[float | None] = []
    for i, x in enumerate(v):
        out.append(None if x is None else _acc_list([x], f"{where}[{i}]")[0])
    return tuple(out) if out else None


def _count_list(v: Any) -> tuple[int, ...] | None:
    ok = isinstance(v, Sequence) and not isinstance(v, str)
    return tuple(int(c) for c in v) if ok else None


def train_accuracy(train_metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> TrainAccuracy:
    """The per-step accuracy to predict from, out of what a training run writes.

    Accepted forms (eagle_core/train.py, eagle_core/metrics.py):
    - `metrics.jsonl` rows (a list): the last `{"kind": "eval", "step_acc": [...]}` record
      (held-out); with none, the last `{"kind": "train", ...}` record (training batches);
    - the manifest counts (a dict with `heldout_step_acc`, else `final_step_acc`);
    - one metrics record (a dict with `step_acc`; kind "eval" = held-out).

    Raises:
        DataError: none of those forms, or accuracies outside [0, 1].
    """
    if isinstance(train_metrics, Mapping):
        if "counts" in train_metrics and isinstance(train_metrics["counts"], Mapping):
            train_metrics = train_metrics["counts"]  # a whole manifest dict
        if "step_acc" in train_metrics:
            heldout = train_metrics.get("kind", "eval") == "eval"
            acc = _acc_list(train_metrics["step_acc"], "metrics record step_acc")
            counts = train_metrics.get("step_count")
            if isinstance(counts, Sequence) and len(counts) == len(acc):
                counts = tuple(int(c) for c in counts)
            else:
                counts = None
            return TrainAccuracy(
                acc,
                "heldout" if heldout else "train",
                _int_or_none(train_metrics.get("step")),
                _int_or_none(train_metrics.get("samples")) if heldout else None,
                counts,
                _cond_list(train_metrics.get("step_cond_acc"), "metrics record step_cond_acc"),
                _count_list(train_metrics.get("step_cond_roots")),
            )
        if train_metrics.get("heldout_step_acc") is not None:
            return TrainAccuracy(
                _acc_list(train_metrics["heldout_step_acc"], "counts.heldout_step_acc"),
                "heldout",
                _int_or_none(train_metrics.get("steps")),
                _int_or_none(train_metrics.get("heldout_samples")),
                step_cond_acc=_cond_list(
                    train_metrics.get("heldout_step_cond_acc"), "counts.heldout_step_cond_acc"
                ),
                step_cond_roots=_count_list(train_metrics.get("heldout_step_cond_roots")),
            )
        if train_metrics.get("final_step_acc") is not None:
            return TrainAccuracy(
                _acc_list(train_metrics["final_step_acc"], "counts.final_step_acc"),
                "train",
                _int_or_none(train_metrics.get("steps")),
            )
        if "heldout_step_acc" in train_metrics or "final_step_acc" in train_metrics:
            return TrainAccuracy((), "none")  # a run that logged no accuracy at all
        raise DataError(
            f"training metrics hold no per-step accuracy (keys {sorted(train_metrics)[:12]})",
            fix="pass the train artifact's metrics.jsonl rows or its manifest counts",
        )
    if isinstance(train_metrics, str) or not isinstance(train_metrics, Sequence):
        raise DataError(
            f"training metrics must be a dict or a list of records, not "
            f"{type(train_metrics).__name__}",
            fix="pass the train artifact's metrics.jsonl rows or its manifest counts",
        )
    for kind in ("eval", "train"):
        rows = [
            r
            for r in train_metrics
            if isinstance(r, Mapping) and r.get("kind") == kind and r.get("step_acc") is not None
        ]
        if rows:
            last = max(rows, key=lambda r: int(r.get("step", 0)))  # file order on ties
            return train_accuracy(last)
    return TrainAccuracy((), "none")


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _rates(summary: Mapping[str, Any], name: str, steps: int, kind: str) -> list[float | None]:
    v = summary.get(name)
    if not isinstance(v, Sequence) or len(v) != steps:
        raise DataError(
            f"evaluate report: {kind}.{name} is not a list of {steps} rates ({v!r:.80})",
            fix="pass the report.json of an evaluate artifact (eagle_core/evaluate.py)",
        )
    return [None if x is None else float(x) for x in v]


def consistency_report(
    train_metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    eval_report: Mapping[str, Any],
    *,
    train_url: str = "",
    eval_url: str = "",
) -> ConsistencyReport:
    """Training per-step accuracy next to measured acceptance, per kind (chat, fim, all).

    Args:
        train_metrics: the run's `metrics.jsonl` rows, its manifest counts, or one metrics
            record (see `train_accuracy`).
        eval_report: evaluate's `report.json` (keys steps, mode, temperature, kinds, all).
        train_url / eval_url: shown in the report.

    Returns:
        The report; τ_pred is None for every kind when the run logged no accuracy, and
        covers only the logged positions (a lower bound, noted) when it logged fewer TTT
        steps than the chain length.

    Raises:
        DataError: a malformed metrics or report.
    """
    train = train_accuracy(train_metrics)
    if not isinstance(eval_report, Mapping) or not isinstance(eval_report.get("steps"), int):
        raise DataError(
            "evaluate report has no integer 'steps'",
            fix="pass the report.json of an evaluate artifact (eagle_core/evaluate.py)",
        )
    steps = int(eval_report["steps"])
    mode = str(eval_report.get("mode", "chain"))
    temperature = float(eval_report.get("temperature", 0.0))
    kinds_in = dict(eval_report.get("kinds") or {})
    if "all" in eval_report:
        kinds_in["all"] = eval_report["all"]
    if not kinds_in:
        raise DataError(
            "evaluate report has no 'kinds' and no 'all' summary",
            fix="pass the report.json of an evaluate artifact (eagle_core/evaluate.py)",
        )
    n_tf = min(steps, train.usable_steps())
    acc: list[float | None] = [*train.step_acc[:n_tf], *[None] * (steps - n_tf)]
    predicted_tf: list[float | None] = [
        math.prod(train.step_acc[: k + 1]) if k < n_tf else None for k in range(steps)
    ]
    tau_tf = 1.0 + sum(p for p in predicted_tf if p is not None) if n_tf else None
    cond: list[float | None] = [None] * steps
    if train.step_cond_acc:
        cond = [*train.step_cond_acc[:steps], *[None] * (steps - len(train.step_cond_acc))]
        cond = cond[:steps]
        used = cond
        predicted = _chain_products(cond, steps)
    else:
        used, predicted = acc, predicted_tf
    n_pred = next((k for k, p in enumerate(predicted) if p is None), steps)
    tau_pred = 1.0 + sum(p for p in predicted if p is not None) if n_pred else None

    order = [k for k in KIND_ORDER if k in kinds_in] + sorted(set(kinds_in) - set(KIND_ORDER))
    kinds = []
    for name in order:
        s = kinds_in[name]
        meas_cond = _rates(s, "conditional_accept_rate_per_position", steps, name)
        rate = _rates(s, "accept_rate_per_position", steps, name)
        rows = tuple(
            PositionRow(
                position=k + 1,
                train_acc=acc[k],
                measured_conditional=meas_cond[k],
                conditional_gap=_diff(meas_cond[k], used[k]),
                predicted_rate=predicted[k],
                measured_rate=rate[k],
                rate_gap=_diff(rate[k], predicted[k]),
                train_cond_acc=cond[k],
                predicted_rate_teacher_forced=predicted_tf[k],
            )
            for k in range(steps)
        )
        tau = s.get("tau")
        tau = float(tau) if isinstance(tau, int | float) and not math.isnan(tau) else None
        kinds.append(
            KindConsistency(
                kind=name,
                prompts=int(s.get("prompts") or 0),
                verify_forwards=int(s.get("verify_forwards") or 0),
                tau_predicted=tau_pred,
                tau_measured=tau,
                tau_gap=_diff(tau, tau_pred),
                positions=rows,
                tau_predicted_teacher_forced=tau_tf,
            )
        )
    notes = _notes(train, steps, mode, temperature, n_pred if train.step_cond_acc else n_tf)
    if train.step_cond_acc and n_pred < min(steps, len(train.step_cond_acc)):
        notes.insert(
            0,
            f"no held-out chain reached TTT step {n_pred} (draft position {n_pred + 1}) along "
            "the target's greedy path: the conditional prediction stops there (a lower bound)",
        )
    elif not train.step_cond_acc and train.source != "none":
        notes.insert(
            0,
            "the training run logged no serving-faithful conditional rates (trained before "
            "they existed): τ is predicted from the teacher-forced per-step accuracy, which "
            "over-predicts when the draft's errors are correlated across steps",
        )
    report = ConsistencyReport(
        steps=steps,
        mode=mode,
        temperature=temperature,
        train=train,
        predicted_positions=n_pred,
        kinds=tuple(kinds),
        notes=tuple(notes),
        train_url=train_url,
        eval_url=eval_url,
        predicted_from=train.predictor,
    )
    for k in report.kinds:
        log.info(
            "consistency %s: τ predicted (%s) %s, teacher-forced %s, measured %s (gap %s)",
            k.kind,
            report.predicted_from,
            _f(k.tau_predicted),
            _f(k.tau_predicted_teacher_forced),
            _f(k.tau_measured),
            _f(k.tau_gap, "+.3f"),
        )
    return report


def _chain_products(rates: Sequence[float | None], steps: int) -> list[float | None]:
    """p_k = a_1 · … · a_k for k = 1..steps; None from the first unknown a_k on, except that
    a product already 0 stays 0 (no chain survives to a step that none reached)."""
    out: list[float | None] = []
    p = 1.0
    for k in range(steps):
        a = rates[k] if k < len(rates) else None
        if a is None and p != 0.0:
            break
        p = 0.0 if a is None else p * a
        out.append(p)
    return out + [None] * (steps - len(out))


def _diff(measured: float | None, predicted: float | None) -> float | None:
    return None if measured is None or predicted is None else measured - predicted


def _notes(train: TrainAccuracy, steps: int, mode: str, temp: float, n_pred: int) -> list[str]:
    notes = []
    if train.source == "none":
        notes.append(
            "the training run logged no per-step accuracy: nothing is predicted "
            "(train with a held-out split: train.heldout_fraction > 0 or train.heldout)"
        )
    elif train.source == "train":
        notes.append(
            "the training run had no held-out split: the prediction uses training-batch "
            "accuracy, which overestimates acceptance (set train.heldout_fraction > 0)"
        )
    if train.usable_steps() < min(steps, len(train.step_acc)):
        notes.append(
            f"TTT step {train.usable_steps()} (draft position {train.usable_steps() + 1}) had "
            "no held-out position to measure: positions from there on are not predicted"
        )
    elif 0 < n_pred < steps:
        notes.append(
            f"training unrolled {n_pred} TTT steps, the evaluator drafted {steps}: τ predicted "
            f"covers positions 1..{n_pred} only (a lower bound); train with ttt_steps >= {steps}"
        )
    if mode != "chain":
        notes.append(
            f"the evaluator used {mode} drafting: the prediction models a single chain, so "
            "measured τ is expected above it"
        )
    if temp > 0:
        notes.append(
            f"the evaluator sampled (temperature {temp}): acceptance is then probabilistic, "
            "while training accuracy counts argmax matches"
        )
    notes += [
        "training accuracy skips positions whose target argmax lies outside the draft vocab; "
        "serving always rejects there, so a small vocab map shows up as a negative gap",
        "the training held-out split and the evaluator's prompts are different samples "
        "(the evaluator continues prompts with the target's own greedy text)",
        "a prompt's last round may draft fewer than K tokens (max_new_tokens or end of text), "
        "which lowers the measured rates at late positions slightly",
    ]
    return notes


# ---------------------------------------------------------------------------------------------
# from artifacts


def train_metrics_of(store: ArtifactStore, train_ref: StageRef) -> list[dict[str, Any]] | dict:
    """A train artifact's `metrics.jsonl` rows, or its manifest counts when it has no metrics
    file (or the file has no accuracy)."""
    if METRICS_FILE in store.list_files(train_ref):
        rows = []
        for line in store.read_bytes(train_ref, METRICS_FILE).decode().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a blank or torn line (read_metrics skips them too)
                continue
        if train_accuracy(rows).source != "none":
            return rows
    return dict(store.manifest(train_ref.stage, train_ref.key).counts)


def consistency_for(
    store: ArtifactStore, train_ref: StageRef, eval_report: Mapping[str, Any], eval_url: str = ""
) -> ConsistencyReport:
    """The report of an evaluation (its report dict, published or not) of a training run."""
    return consistency_report(
        train_metrics_of(store, train_ref), eval_report, train_url=train_ref.url, eval_url=eval_url
    )


def write_consistency(store: ArtifactStore, train_ref: StageRef, eval_ref: StageRef) -> dict:
    """The consistency report (as `to_dict()`) of a published evaluate artifact and the
    training run whose export it evaluated.

    It reads `report.json` of `eval_ref` and the metrics of `train_ref`. Evaluate artifacts
    made with `train_ref` already hold it as `consistency.json` / `consistency.md`; this is
    for any other pair (and for tasks that show it).
    """
    report = store.read_json(eval_ref, "report.json")
    return consistency_for(store, train_ref, report, eval_url=eval_ref.url).to_dict()


def markdown_of(report: Mapping[str, Any]) -> str:
    """`to_markdown()` of a report given as its dict (`consistency.json`, `write_consistency`)."""
    return _from_dict(report).to_markdown()


def _from_dict(d: Mapping[str, Any]) -> ConsistencyReport:
    tr = d["train"]
    train = TrainAccuracy(
        **{
            **tr,
            "step_acc": tuple(tr["step_acc"]),
            **{
                name: None if tr.get(name) is None else tuple(tr[name])
                for name in ("step_count", "step_cond_acc", "step_cond_roots")
            },
        }
    )
    kinds = tuple(
        KindConsistency(**{**k, "positions": tuple(PositionRow(**r) for r in k["positions"])})
        for k in d["kinds"]
    )
    return ConsistencyReport(
        **{**d, "train": train, "kinds": kinds, "notes": tuple(d.get("notes", ()))}
    )
