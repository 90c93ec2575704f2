"""The consistency report predicts τ from the serving-faithful conditional rates when the
training run logged them (eagle_core/loss.py `step_cond_*`), keeps the teacher-forced τ next to
it, and falls back to the teacher-forced accuracy (saying so) for older runs."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_quality import predicted_tau
from eagle_core.consistency import consistency_report, markdown_of, train_accuracy
from eagle_core.errors import DataError


def _summary(tau: float, rates: list, cond: list) -> dict:
    return {
        "prompts": 2,
        "verify_forwards": 10,
        "tau": tau,
        "accept_rate_per_position": rates,
        "conditional_accept_rate_per_position": cond,
    }


def _report(steps: int = 2) -> dict:
    s = _summary(1.75, [0.5, 0.25], [0.5, 0.5])
    if steps != 2:
        s = _summary(1.0, [0.0] * steps, [0.0] * steps)
    return {"mode": "chain", "steps": steps, "temperature": 0.0, "kinds": {"chat": s}, "all": s}


# teacher-forced 0.5 / 0.5, but every chain that got step 1 right gets step 2 right too
EVAL = {
    "kind": "eval",
    "step": 5,
    "samples": 8,
    "step_acc": [0.5, 0.5],
    "step_count": [40, 38],
    "step_cond_acc": [0.5, 1.0],
    "step_cond_roots": [40, 16],
}


def test_conditional_rates_predict_and_teacher_forced_is_kept() -> None:
    rep = consistency_report([EVAL], _report())
    assert rep.predicted_from == "conditional" and rep.train.predictor == "conditional"
    assert rep.train.step_cond_acc == (0.5, 1.0) and rep.train.step_cond_roots == (40, 16)
    chat = rep.kind("chat")
    assert chat.tau_predicted == pytest.approx(1 + 0.5 + 0.5 * 1.0)
    assert chat.tau_predicted_teacher_forced == pytest.approx(1 + 0.5 + 0.25)
    assert chat.tau_gap == pytest.approx(1.75 - 2.0)  # measured - predicted (conditional)
    p1, p2 = chat.positions
    assert (p2.train_acc, p2.train_cond_acc) == (0.5, 1.0)
    assert p2.predicted_rate == pytest.approx(0.5)
    assert p2.predicted_rate_teacher_forced == pytest.approx(0.25)
    assert p2.conditional_gap == pytest.approx(0.5 - 1.0)  # against the rate used
    md = rep.to_markdown()
    assert "predicted from: serving-faithful conditional" in md
    assert "| chat | 2 | 2.000 | 1.750 | 1.750 | -0.250 |" in md
    assert "| 2 | 0.500 | 1.000 | 0.500 | -0.500 | 0.500 | 0.250 | -0.250 |" in md
    doc = json.loads(rep.to_json())
    assert doc["train"]["step_cond_acc"] == [0.5, 1.0] and doc["predicted_from"] == "conditional"
    assert markdown_of(doc) == md  # the dict round-trips
    assert not any("teacher-forced per-step accuracy, which" in n for n in rep.notes)


def test_older_runs_fall_back_to_teacher_forced_and_say_so() -> None:
    old = {k: v for k, v in EVAL.items() if not k.startswith("step_cond")}
    rep = consistency_report([old], _report())
    assert rep.predicted_from == "teacher-forced"
    assert rep.kind("all").tau_predicted == pytest.approx(1.75)
    assert rep.kind("all").tau_predicted_teacher_forced == pytest.approx(1.75)
    assert any("logged no serving-faithful conditional rates" in n for n in rep.notes)
    assert "predicted from: teacher-forced" in rep.to_markdown()
    # an old consistency.json (no new keys) still renders
    doc = rep.to_dict()
    del doc["predicted_from"]
    for k in doc["kinds"]:
        del k["tau_predicted_teacher_forced"]
        for r in k["positions"]:
            del r["train_cond_acc"], r["predicted_rate_teacher_forced"]
    assert "τ predicted" in markdown_of(doc)


def test_manifest_counts_and_unreached_steps() -> None:
    counts = {
        "steps": 9,
        "heldout_samples": 3,
        "heldout_step_acc": [0.4, 0.2, 0.1, 0.1],
        "heldout_step_cond_acc": [0.4, 0.0, None, None],
        "heldout_step_cond_roots": [30, 12, 0, 0],
    }
    acc = train_accuracy(counts)
    assert acc.step_cond_acc == (0.4, 0.0, None, None) and acc.step_cond_roots == (30, 12, 0, 0)
    # no chain reached step 3, but none could: the product is already 0 there
    rep = consistency_report(counts, _report(steps=4))
    assert rep.predicted_positions == 4
    assert [r.predicted_rate for r in rep.kind("all").positions] == [0.4, 0.0, 0.0, 0.0]
    assert rep.kind("all").tau_predicted == pytest.approx(1.4)
    # a step no chain reached while some were still alive: unknown, the prediction stops
    alive = {**counts, "heldout_step_cond_acc": [0.4, 0.5, None, None]}
    rep = consistency_report(alive, _report(steps=4))
    assert rep.predicted_positions == 2 and rep.kind("all").tau_predicted == pytest.approx(1.6)
    assert [r.predicted_rate for r in rep.kind("all").positions][2:] == [None, None]
    assert any("no held-out chain reached TTT step 2" in n for n in rep.notes)
    with pytest.raises(DataError, match=r"heldout_step_cond_acc\[1\]"):
        consistency_report({**counts, "heldout_step_cond_acc": [0.4, 2.0]}, _report())


def test_bench_quality_predicted_tau() -> None:
    assert predicted_tau([0.5, 1.0, 0.3], 2) == pytest.approx(2.0)
    assert predicted_tau([0.5], 2) is None  # fewer steps than the chain
    assert predicted_tau(None, 2) is None
    assert predicted_tau([0.5, 0.0, None], 3) == pytest.approx(1.5)  # 0 stays 0
    assert predicted_tau([0.5, None, 0.3], 3) is None  # unknown while chains were alive
