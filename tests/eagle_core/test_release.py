"""The release stage (eagle_core/release.py): the promotion rule, and the whole stage with
real speculative decoding on targets and drafts whose acceptance is known exactly.

`constant_target(c)` (tests/release_models.py) is the small test target edited so that
greedy decoding emits token `c` at every position; `constant_draft(c)` is an EAGLE-3 draft
that always proposes `c`. Their acceptance is exact: a draft of the target's token accepts
every proposal (τ = 1 + steps but for the cut last round), any other draft accepts none
(τ = 1). So "the old release's τ falls on a new target" and "a worse draft is kept out"
are measured, not assumed.
"""

from __future__ import annotations

import json

import pytest

from eagle_core.release import (
    CURRENT,
    Measured,
    ReleaseConfig,
    decide,
    history,
    promote,
    release,
    show,
)
from storage import ArtifactError, ArtifactStore, StageRef
from tests.release_models import STEPS, constant_draft, constant_target

PROMPTS = [
    {"id": "f1", "prefix": "def add(a, b):\n    ", "middle": "return a + b", "suffix": "\n"},
    {"id": "f2", "prefix": "import os\n", "middle": "import sys\n", "suffix": "print(1)\n"},
    {
        "id": "c1",
        "messages": [
            {"role": "user", "content": "Write add(a, b)."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ],
    },
]


def _m(tau: float | None, mismatched: int = 0, url: str = "s3://b/export/new") -> Measured:
    return Measured(
        export_url=url,
        export_key=url.rsplit("/", 1)[-1],
        evaluate_url="",
        evaluate_key="",
        tau=tau,
        tau_per_kind={},
        per_position_acceptance=[],
        prompts=4,
        mismatched=mismatched,
        lossless_checked=True,
        target="t",
    )


def test_decision_rule():
    d = decide(_m(3.1), _m(3.4, url="x/export/cur"), 0.1)
    assert (d.action, d.promoted) == ("keep", False)
    assert d.reason == "kept the current release: τ 3.10 < 3.40 − 0.1"
    d = decide(_m(3.3), _m(3.4, url="x/export/cur"), 0.1)  # within the tolerance: fresher wins
    assert d.promoted and d.reason == "promoted: τ 3.30 ≥ 3.40 − 0.1"
    assert decide(_m(3.3), _m(3.4), 0.0).action == "keep"
    assert decide(_m(1.2), None, 0.1).reason == "promoted: first release (τ 1.20)"
    # a draft that is not lossless is refused even as the first release
    d = decide(_m(5.0, mismatched=1), None, 0.1)
    assert d.action == "refuse" and "not lossless (1/4 prompts" in d.reason
    assert decide(_m(None), None, 0.1).action == "refuse"
    d = decide(_m(1.0), None, 0.1, current_problem="its export x is gone")
    assert d.promoted and "unusable (its export x is gone)" in d.reason
    sampled = Measured(**{**_m(2.0).__dict__, "lossless_checked": False, "mismatched": 0})
    assert sampled.lossless is None and decide(sampled, None, 0.1).promoted


def test_config_checks():
    from eagle_core.errors import ConfigError

    with pytest.raises(ConfigError, match="release name"):
        ReleaseConfig(name="../x")
    with pytest.raises(ConfigError, match="tolerance"):
        ReleaseConfig(tolerance=-0.1)


# ---- the stage, with exact acceptance ---------------------------------------------------------


@pytest.mark.slow
def test_release_stage(small_target_dir, small_tokenizer_dir, tmp_path):
    from eagle_core.evaluate import EvalConfig, evaluate

    root = tmp_path / "store"
    store = ArtifactStore(str(root))
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    t1 = constant_target(small_target_dir, str(tmp_path / "t300"), 300)
    t2 = constant_target(small_target_dir, str(tmp_path / "t400"), 400)
    d1, d2, bad = (constant_draft(store, t, c) for t, c in ((t1, 300), (t2, 400), (t1, 500)))

    def on(target: str) -> EvalConfig:
        return EvalConfig(
            target=target,
            tokenizer=small_tokenizer_dir,
            prompts=(str(prompts),),
            max_prompts=2,
            max_new_tokens=12,
            steps=STEPS,
        )

    def run(export_ref: StageRef, cfg: EvalConfig, **kw):
        train = store.ref("train", export_ref.key and _train_key(store, export_ref))
        ev = evaluate(store, export_ref, cfg, train_ref=train)
        return release(store, ReleaseConfig(), export_ref, ev, cfg, flow_run_id="run-1", **kw)

    # 1. no release yet: the first draft is promoted
    first = run(d1, on(t1), provenance={"train": [store.ref("train", "const300")]})
    assert first.decision.action == "promote" and first.decision.promoted
    assert first.new.tau == pytest.approx(3.0, abs=1.01) and first.new.tau > 3.0
    assert first.new.lossless is True
    cur = json.loads((root / "releases/default" / CURRENT).read_text())
    assert cur["export_url"] == d1.url and cur["flow_run_id"] == "run-1"
    assert cur["keys"]["export"] == [d1.key] and cur["keys"]["train"] == ["const300"]
    assert cur["tau"] == first.new.tau and len(cur["per_position_acceptance"]) == STEPS
    assert cur["per_position_acceptance"][0] == 1.0 and cur["compared_with"] is None
    assert "fingerprints" in cur  # recorded when the manifests have them

    # 2. a worse draft on the same target: kept out, and the entry says why
    kept = run(bad, on(t1))
    assert kept.decision.action == "keep" and not kept.decision.promoted
    assert kept.new.tau == 1.0 and kept.current is not None
    assert kept.current.tau == first.new.tau
    # the current release was measured again through the evaluate stage: same key (cached)
    assert kept.current.evaluate_key == first.new.evaluate_key
    assert kept.decision.reason == (f"kept the current release: τ 1.00 < {first.new.tau:.2f} − 0.1")
    assert kept.current_url == d1.url
    assert show(store, "default")["current"]["export_url"] == d1.url
    entry = history(store, "default")[-1]
    assert entry["action"] == "keep" and entry["compared_with"]["tau"] == first.new.tau
    assert entry["compared_with"]["per_position_acceptance"][0] == 1.0

    assert kept.recorded
    again = run(bad, on(t1))  # the same pair measured the same: already decided, not repeated
    assert again.decision == kept.decision and not again.recorded
    assert again.entry["id"] == entry["id"] and len(history(store, "default")) == 2

    # 3. the current release itself again: nothing to decide, nothing recorded
    same = run(d1, on(t1))
    assert same.decision.action == "unchanged" and len(history(store, "default")) == 2

    # 4. the target changed: the old release's τ falls on it, the new draft wins
    moved = run(d2, on(t2))
    assert moved.decision.promoted and moved.current is not None
    assert moved.current.tau == 1.0 and moved.current.target == t2  # measured on the new one
    assert moved.new.tau > 3.0
    assert show(store, "default")["current"]["export_url"] == d2.url

    # 5. rollback by hand
    back = promote(store, "default", d1.url)
    assert back["action"] == "manual" and back["promoted"]
    assert back["tau"] == first.new.tau  # from the latest entry about that export
    assert show(store, "default")["current"]["export_url"] == d1.url
    assert [e["action"] for e in history(store, "default")] == [
        "promote",
        "keep",
        "promote",
        "manual",
    ]
    with pytest.raises(ArtifactError, match="not an export"):
        promote(store, "default", store.url("train", "const300"))

    # 6. the current release's export was deleted: it cannot be measured, the new one wins
    (root / "export" / d1.key / "manifest.json").unlink()
    gone = run(bad, on(t1))
    assert gone.decision.promoted and "unusable (its export" in gone.decision.reason
    assert show(store, "default")["current"]["export_url"] == bad.url

    # 7. the target fine-tuned in place (same path, same file sizes, new weights): now it
    # emits 500, what the current release proposes. Both drafts are measured again on it
    # (the evaluate keys follow the target's weights), so the release is kept; its cached
    # τ 1.0 on the old weights would have let d2 (τ 1.0 on the new ones) replace it
    before = gone.new.evaluate_key
    constant_target(small_target_dir, t1, 500)
    kept2 = run(d2, on(t1))
    assert kept2.current is not None and kept2.current.evaluate_key != before
    assert kept2.current.tau > 3.0 and kept2.new.tau == 1.0
    assert kept2.decision.action == "keep" and kept2.current_url == bad.url


def _train_key(store: ArtifactStore, export_ref: StageRef) -> str:
    m = store.manifest(export_ref.stage, export_ref.key)
    return next(i["key"] for i in m.inputs if i.get("stage") == "train")
