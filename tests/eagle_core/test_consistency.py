"""The consistency report: training per-step accuracy vs measured acceptance, τ predicted vs
measured, from hand-made metrics/reports (exact numbers) and from a real train → export →
evaluate run on the small target."""

from __future__ import annotations

import json

import pytest

from eagle_core.consistency import (
    consistency_report,
    markdown_of,
    train_accuracy,
    train_metrics_of,
    write_consistency,
)
from eagle_core.errors import DataError
from storage import ArtifactStore


def _summary(tau: float, rates: list, cond: list, prompts: int = 2, vf: int = 10) -> dict:
    return {
        "prompts": prompts,
        "verify_forwards": vf,
        "tau": tau,
        "accept_rate_per_position": rates,
        "conditional_accept_rate_per_position": cond,
    }


def _report(steps: int = 2, **kw) -> dict:
    """An evaluate report.json in eagle_core/evaluate.py's format (only the keys read)."""
    chat = _summary(1.9, [0.6, 0.3], [0.6, 0.5])
    fim = _summary(1.5, [0.4, 0.1], [0.4, 0.25], prompts=3, vf=20)
    allk = _summary(1.6333, [0.4667, 0.1667], [0.4667, 0.3571], prompts=5, vf=30)
    if steps != 2:
        chat = _summary(1.0, [0.0] * steps, [0.0] * steps)
        fim = allk = chat
    return {
        "mode": "chain",
        "steps": steps,
        "temperature": 0.0,
        "kinds": {"chat": chat, "fim": fim},
        "all": allk,
        **kw,
    }


METRICS = [
    {"kind": "train", "step": 1, "step_acc": [0.1, 0.1], "loss": 3.0},
    {"kind": "eval", "step": 1, "step_acc": [0.2, 0.1], "samples": 4, "loss": 3.1},
    {"kind": "train", "step": 2, "step_acc": [0.9, 0.9], "loss": 2.0},
    {"kind": "eval", "step": 2, "step_acc": [0.8, 0.5], "samples": 4, "loss": 2.5},
]


def test_exact_numbers_per_kind() -> None:
    rep = consistency_report(METRICS, _report())
    assert rep.steps == 2 and rep.predicted_positions == 2
    assert rep.train.source == "heldout" and rep.train.step == 2 and rep.train.samples == 4
    assert rep.train.step_acc == (0.8, 0.5)  # the LAST held-out record, not a training one
    assert [k.kind for k in rep.kinds] == ["chat", "fim", "all"]
    chat = rep.kind("chat")
    assert chat.tau_predicted == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert chat.tau_measured == pytest.approx(1.9)
    assert chat.tau_gap == pytest.approx(1.9 - 2.2)
    p1, p2 = chat.positions
    assert (p1.position, p2.position) == (1, 2)
    assert p1.train_acc == 0.8 and p2.train_acc == 0.5
    assert p1.predicted_rate == pytest.approx(0.8) and p2.predicted_rate == pytest.approx(0.4)
    assert p1.measured_conditional == 0.6 and p2.measured_conditional == 0.5
    assert p2.conditional_gap == pytest.approx(0.0) and p1.conditional_gap == pytest.approx(-0.2)
    assert p2.measured_rate == 0.3 and p2.rate_gap == pytest.approx(0.3 - 0.4)
    fim = rep.kind("fim")
    assert fim.prompts == 3 and fim.verify_forwards == 20
    assert fim.tau_gap == pytest.approx(1.5 - 2.2)
    assert fim.positions[1].conditional_gap == pytest.approx(0.25 - 0.5)
    assert rep.kind("all").tau_predicted == pytest.approx(2.2)


def test_chain_length_decides_what_is_predicted() -> None:
    # more TTT steps than the chain: only the first K count
    rep = consistency_report({"heldout_step_acc": [0.5, 0.5, 0.9], "steps": 7}, _report())
    assert rep.kind("all").tau_predicted == pytest.approx(1 + 0.5 + 0.25)
    assert rep.train.source == "heldout" and rep.train.step == 7
    # fewer TTT steps than the chain: a lower bound over the logged positions, and a note
    rep = consistency_report({"kind": "eval", "step_acc": [0.5, 0.5]}, _report(steps=4))
    assert rep.predicted_positions == 2
    all_ = rep.kind("all")
    assert all_.tau_predicted == pytest.approx(1.75)
    assert [r.predicted_rate for r in all_.positions] == [0.5, 0.25, None, None]
    assert [r.train_acc for r in all_.positions][2:] == [None, None]
    assert all_.positions[3].rate_gap is None
    assert any("lower bound" in n and "ttt_steps >= 4" in n for n in rep.notes)


def test_a_step_without_positions_is_not_an_accuracy() -> None:
    rec = {"kind": "eval", "step": 3, "step_acc": [0.5, 0.0, 0.9], "step_count": [10, 0, 4]}
    rep = consistency_report([rec], _report())
    assert rep.predicted_positions == 1 and rep.train.step_count == (10, 0, 4)
    assert rep.kind("all").tau_predicted == pytest.approx(1.5)
    assert rep.kind("all").positions[1].train_acc is None
    assert any("no held-out position" in n for n in rep.notes)
    assert markdown_of(rep.to_dict()) == rep.to_markdown()
    counted = consistency_report([{**rec, "step_count": [10, 5, 4]}], _report())
    assert counted.kind("all").tau_predicted == pytest.approx(1.5)  # 0.0 accuracy, measured


def test_train_accuracy_sources() -> None:
    assert train_accuracy(METRICS).step_acc == (0.8, 0.5)
    only_train = [r for r in METRICS if r["kind"] == "train"]
    acc = train_accuracy(only_train)
    assert acc.source == "train" and acc.step_acc == (0.9, 0.9) and acc.step == 2
    rep = consistency_report(only_train, _report())
    assert any("no held-out split" in n for n in rep.notes)
    # manifest counts (eagle_core/train.py _publish), whole manifest dicts too
    counts = {"steps": 9, "heldout_step_acc": [0.7], "heldout_samples": 3, "final_step_acc": [1.0]}
    assert train_accuracy(counts) == train_accuracy({"counts": counts})
    assert train_accuracy(counts).step_acc == (0.7,) and train_accuracy(counts).samples == 3
    acc = train_accuracy({"steps": 9, "heldout_step_acc": None, "final_step_acc": [0.6]})
    assert acc.source == "train" and acc.step_acc == (0.6,)
    # a run that logged nothing: no prediction, said so
    rep = consistency_report([], _report())
    assert rep.train.source == "none" and rep.predicted_positions == 0
    assert rep.kind("all").tau_predicted is None and rep.kind("all").tau_gap is None
    assert rep.kind("all").tau_measured == pytest.approx(1.6333)
    assert any("no per-step accuracy" in n for n in rep.notes)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(DataError, match=r"step_acc\[1\] = 1.5"):
        consistency_report([{"kind": "eval", "step_acc": [0.5, 1.5]}], _report())
    with pytest.raises(DataError, match="no per-step accuracy"):
        consistency_report({"loss": 1.0}, _report())
    with pytest.raises(DataError, match="dict or a list"):
        consistency_report("metrics.jsonl", _report())  # type: ignore[arg-type]
    with pytest.raises(DataError, match="integer 'steps'"):
        consistency_report(METRICS, {"kinds": {}})
    bad = _report()
    bad["kinds"]["fim"]["accept_rate_per_position"] = [0.5]
    with pytest.raises(DataError, match=r"fim.accept_rate_per_position is not a list of 2"):
        consistency_report(METRICS, bad)


def test_notes_for_tree_and_sampling_and_missing_kinds() -> None:
    rep = consistency_report(METRICS, _report(mode="tree", temperature=0.7))
    assert any("tree drafting" in n for n in rep.notes)
    assert any("temperature 0.7" in n for n in rep.notes)
    only_fim = _report()
    del only_fim["kinds"]["chat"]
    assert [k.kind for k in consistency_report(METRICS, only_fim).kinds] == ["fim", "all"]
    # an unmeasured rate (no verify round) stays None, its gap too
    empty = _report()
    empty["kinds"]["chat"] = {
        **_summary(None, [None, None], [None, None], prompts=0, vf=0)  # type: ignore[arg-type]
    }
    chat = consistency_report(METRICS, empty).kind("chat")
    assert chat.tau_measured is None and chat.tau_gap is None
    assert chat.positions[0].conditional_gap is None and chat.positions[0].train_acc == 0.8


def test_markdown_and_json() -> None:
    rep = consistency_report(METRICS, _report(), train_url="/r/train/k", eval_url="/r/ev/k")
    md = rep.to_markdown()
    assert "| chat | 2 | 2.200 | 2.200 | 1.900 | -0.300 |" in md  # no conditional rates logged
    assert "| 2 | 0.500 | – | 0.500 | +0.000 | 0.400 | 0.300 | -0.100 |" in md
    assert "predicted from: teacher-forced" in md and rep.predicted_from == "teacher-forced"
    assert "## fim" in md and "held-out split at step 2" in md and "/r/train/k" in md
    doc = json.loads(rep.to_json())
    assert doc["kinds"][0]["kind"] == "chat" and doc["train"]["step_acc"] == [0.8, 0.5]
    assert doc["kinds"][2]["tau_predicted"] == pytest.approx(2.2)
    assert markdown_of(doc) == md  # the dict round-trips


def test_write_consistency_reads_both_artifacts(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    with store.publish("train", "run") as w:
        w.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in METRICS).encode())
        w.counts.update(heldout_step_acc=[0.1, 0.1], steps=2)  # metrics.jsonl wins
    with store.publish("evaluate", "ev") as w:
        w.write_json("report.json", _report())
    train_ref, eval_ref = store.ref("train", "run"), store.ref("evaluate", "ev")
    doc = write_consistency(store, train_ref, eval_ref)
    assert doc["kinds"][0]["tau_predicted"] == pytest.approx(2.2)
    assert doc["train_url"] == train_ref.url and doc["eval_url"] == eval_ref.url
    # no metrics file: the manifest counts
    with store.publish("train", "bare") as w:
        w.counts.update(heldout_step_acc=[0.5, 0.5], steps=2, heldout_samples=1)
    bare = store.ref("train", "bare")
    assert isinstance(train_metrics_of(store, bare), dict)
    doc = write_consistency(store, bare, eval_ref)
    assert doc["kinds"][-1]["tau_predicted"] == pytest.approx(1.75)


# ---- integration: a real tiny training run, exported and evaluated ---------------------------


@pytest.mark.slow
def test_evaluate_with_train_ref_writes_the_report(
    small_target_dir: str, small_tokenizer_dir: str, tmp_path
) -> None:
    from train_helpers import make_samples, publish_hidden, publish_tokens

    from eagle_core.errors import ConfigError
    from eagle_core.evaluate import EvalConfig, EvalPrompt, evaluate
    from eagle_core.export import ExportConfig, export
    from eagle_core.train import TrainConfig, run_training

    store = ArtifactStore(str(tmp_path / "store"))
    samples = make_samples(24, seed=5)
    hidden = publish_hidden(store, publish_tokens(store, samples), small_target_dir)
    cfg = TrainConfig(
        store=store.root,
        target=small_target_dir,
        data=(hidden.url,),
        steps=4,
        batch_size=4,
        lr=1e-2,
        ttt_steps=3,
        heldout_fraction=0.25,
        log_every=2,
        seed=1,
    )
    train_ref = run_training(store, cfg)
    assert train_ref.counts["heldout_samples"] > 0
    exp = export(store, train_ref, ExportConfig(dtype="float32", target=small_target_dir))
    prompts = [
        EvalPrompt(s["sample_id"], kind, tuple(s["input_ids"][:8]))  # type: ignore[arg-type]
        for s, kind in zip(samples[:4], ["chat", "fim", "chat", "fim"], strict=True)
    ]
    ecfg = EvalConfig(max_new_tokens=8, steps=3, tokenizer=small_tokenizer_dir)
    plain = evaluate(store, exp, ecfg, prompts=prompts)
    ref = evaluate(store, exp, ecfg, prompts=prompts, train_ref=train_ref)
    assert ref.key != plain.key  # the train ref is part of the key only when given
    assert "consistency.json" not in store.list_files(plain)
    assert {"consistency.json", "consistency.md"} <= set(store.list_files(ref))
    doc = store.read_json(ref, "consistency.json")
    report = store.read_json(ref, "report.json")
    counts = store.manifest("train", train_ref.key).counts
    acc, cond = counts["heldout_step_acc"], counts["heldout_step_cond_acc"]
    assert doc["train"]["source"] == "heldout" and doc["train"]["step_acc"] == pytest.approx(acc)
    assert doc["predicted_from"] == "conditional" and len(cond) == 3
    assert counts["heldout_step_cond_roots"][0] > 0 and cond[0] == pytest.approx(acc[0])
    pred, p = 1.0, 1.0  # the serving-faithful conditional rates, None: no chain got there
    for a in cond:
        if a is None and p:
            break
        p = 0.0 if a is None else p * a
        pred += p
    assert [k["kind"] for k in doc["kinds"]] == ["chat", "fim", "all"]
    for k in doc["kinds"]:
        measured = report["all"] if k["kind"] == "all" else report["kinds"][k["kind"]]
        assert k["tau_measured"] == pytest.approx(measured["tau"])
        tf = 1 + acc[0] + acc[0] * acc[1] + acc[0] * acc[1] * acc[2]
        assert k["tau_predicted_teacher_forced"] == pytest.approx(tf)
        assert k["tau_predicted"] == pytest.approx(pred)
        assert 1.0 <= k["tau_measured"] <= 4.0 and 1.0 <= k["tau_predicted"] <= 4.0
        assert [r["position"] for r in k["positions"]] == [1, 2, 3]
    md = store.read_bytes(ref, "consistency.md").decode()
    assert "τ predicted" in md and "| all | 4 |" in md
    meta = store.manifest("evaluate", ref.key).meta
    assert meta["train"] == train_ref.url and meta["tau_predicted"]["all"] == pytest.approx(pred)
    # a train ref the export was not made from is refused
    other = store.ref("extract_hidden", hidden.key)
    fake = type(train_ref)(stage="train", key="0" * 16, url=other.url)
    with pytest.raises(ConfigError, match="not the run export"):
        evaluate(store, exp, ecfg, prompts=prompts, train_ref=fake)
