"""The release stage: which exported draft a serving job should use, promoted only when better.

A release is a stable name (`default`, `llama-8b-chat`...) pointing at one export artifact.
After evaluate, the new draft is compared with the current release of the same name on the
same held-out prompts, with the same (current) target and the same evaluation settings: the
current release's export is evaluated again through the evaluate stage, so when nothing
changed that evaluation is the cached artifact of its own run, and when the target changed
it is measured on the new target. The decision rule (`decide`):

- refuse a new draft that is not lossless (greedy speculative output differs from plain
  greedy decoding on some prompt): that is a bug, whatever its τ;
- promote when there is no current release, or when the current one cannot be evaluated on
  this target any more (its export was deleted, or it does not fit the target);
- promote when τ_new ≥ τ_current − tolerance, else keep the current release, saying why:
  "kept the current release: τ 3.10 < 3.40 − 0.1".

The pointer (storage/pointer.py) lives under `<root>/releases/<name>/`:

    current.json                 the newest promoted entry (serving jobs read `export_url`)
    history/<time>-<id>.json     one immutable file per decision: promote, keep, refuse, manual

Each entry holds the export URL, the artifact keys, the fingerprints of target and data the
manifests recorded (absent when the manifests have none), τ and per-position acceptance of
both drafts, the tolerance, the decision and its reason, the time and the flow-run id.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from eagle_core.errors import ConfigError, ModelMismatchError
from storage import ArtifactError, ArtifactStore, StageRef
from storage.pointer import PointerLog

if TYPE_CHECKING:
    from eagle_core.evaluate import EvalConfig

log = logging.getLogger(__name__)

RELEASES_DIR = "releases"
CURRENT = "current.json"
SCHEMA = 1  # of the entry documents
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Action = Literal["promote", "keep", "refuse", "manual", "unchanged"]


def check_release_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ConfigError(
            f"release name {name!r} is not usable as a directory name",
            fix="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True, kw_only=True)
class ReleaseConfig:
    """Which release a run competes for, and how much worse a new draft may measure.

    Attributes:
        name: the release (a directory under `<root>/releases/`).
        tolerance: promote when τ_new ≥ τ_current − tolerance.
    """

    name: str = "default"  # one release per store: the usual one-target set-up
    # τ of equally good drafts (3 seeds, 200 steps, 12 prompts per kind) spread over 0.08
    # (benchmarks/results/alignment-200steps.json): within that, the fresher draft wins
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        check_release_name(self.name)
        if not 0.0 <= self.tolerance < 100.0:
            raise ConfigError(
                f"release.tolerance={self.tolerance} is not in [0, 100)",
                fix="use 0.1 (default); 0 promotes only drafts at least as good",
            )


@dataclass(frozen=True)
class Measured:
    """One draft as the evaluate stage measured it."""

    export_url: str
    export_key: str
    evaluate_url: str
    evaluate_key: str
    tau: float | None
    tau_per_kind: dict[str, float | None]
    per_position_acceptance: list[float | None]
    prompts: int
    mismatched: int  # prompts whose speculative output differs from greedy decoding
    lossless_checked: bool  # False in sampling mode (no token-for-token reference)
    target: str

    @property
    def lossless(self) -> bool | None:
        return self.mismatched == 0 if self.lossless_checked else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"lossless": self.lossless}


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str

    @property
    def promoted(self) -> bool:
        return self.action in ("promote", "manual")


@dataclass(frozen=True)
class ReleaseOutcome:
    """What the release stage decided; `to_dict()` is the flow result's `release` entry."""

    name: str
    decision: Decision
    new: Measured
    current: Measured | None  # the current release measured now (None: none, or unusable)
    entry: dict[str, Any] | None  # the history entry written (None: nothing to record)
    current_url: str  # the export a serving job should use after this decision ("" = none)
    pointer_url: str  # `<root>/releases/<name>/current.json`
    recorded: bool = False  # `entry` was appended by this call (not an earlier equal one)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "promoted": self.decision.promoted,
            "action": self.decision.action,
            "reason": self.decision.reason,
            "export_url": self.current_url,
            "tau_new": self.new.tau,
            "tau_current": self.current.tau if self.current else None,
            "entry": (self.entry or {}).get("id"),
            "recorded": self.recorded,
            "pointer": self.pointer_url,
        }


def _fmt(tau: float | None) -> str:
    return "n/a" if tau is None else f"{tau:.2f}"


def decide(
    new: Measured,
    current: Measured | None,
    tolerance: float,
    *,
    current_problem: str = "",
) -> Decision:
    """The promotion rule (module docstring). `current_problem`: why the current release could
    not be measured (it then loses); `current` None and no problem: there is no release."""
    if new.lossless is False:
        return Decision(
            "refuse",
            f"refused the new draft: not lossless ({new.mismatched}/{new.prompts} prompts "
            "differ from greedy decoding)",
        )
    if new.tau is None:
        return Decision("refuse", "refused the new draft: no acceptance length was measured")
    if current_problem:
        return Decision("promote", f"promoted: the current release is unusable ({current_problem})")
    if current is None:
        return Decision("promote", f"promoted: first release (τ {_fmt(new.tau)})")
    if current.tau is None:
        return Decision("promote", "promoted: the current release measured no acceptance length")
    relation = f"τ {_fmt(new.tau)} {{}} {_fmt(current.tau)} − {tolerance:g}"
    if new.tau >= current.tau - tolerance:
        return Decision("promote", "promoted: " + relation.format("≥"))
    return Decision("keep", "kept the current release: " + relation.format("<"))


def measured(store: ArtifactStore, export_ref: StageRef, evaluate_ref: StageRef) -> Measured:
    """Read τ, per-position acceptance and the lossless check from an evaluate manifest."""
    m = store.manifest(evaluate_ref.stage, evaluate_ref.key)
    counts, meta = m.counts, m.meta
    tau = counts.get("tau")
    kinds = dict(meta.get("tau") or {})
    kinds.pop("all", None)
    lossless = counts.get("lossless")  # None in sampling mode
    return Measured(
        export_url=export_ref.url,
        export_key=export_ref.key,
        evaluate_url=evaluate_ref.url,
        evaluate_key=evaluate_ref.key,
        tau=float(tau) if isinstance(tau, (int, float)) else None,
        tau_per_kind=kinds,
        per_position_acceptance=list(meta.get("per_position_acceptance") or []),
        prompts=int(counts.get("prompts") or 0),
        mismatched=int(counts.get("mismatched") or 0),
        lossless_checked=lossless is not None,
        target=str(meta.get("target") or ""),
    )


def pointer(store: ArtifactStore, name: str) -> PointerLog:
    """The release's log: `<root>/releases/<name>/{current.json, history/}`."""
    return PointerLog(
        store,
        f"{RELEASES_DIR}/{check_release_name(name)}",
        head=CURRENT,
        select=lambda e: bool(e.get("promoted")),
    )


def fingerprints_of(store: ArtifactStore, refs: Mapping[str, Sequence[StageRef]]) -> dict[str, Any]:
    """The fingerprints of the target and the data the manifests of `refs` (and, where the
    store can walk them, their upstream artifacts) recorded in `meta["fingerprints"]`.

    Returns:
        {"target": fingerprint, "data": [source fingerprints]}, each only when found: keys
        alone identify the inputs of artifacts made before fingerprints were recorded.
    """
    flat = [r for rs in refs.values() for r in rs]
    lineage = getattr(store, "lineage_fingerprints", None)  # walks the inputs upstream
    if lineage is not None:
        fps = lineage(flat) or {}
    else:
        fps = {"sources": []}
        for r in flat:
            try:
                meta_fp = store.manifest(r.stage, r.key).meta.get("fingerprints") or {}
            except ArtifactError:
                continue
            if isinstance(meta_fp, dict):
                if meta_fp.get("target") and "target" not in fps:
                    fps["target"] = meta_fp["target"]
                fps["sources"] += list(meta_fp.get("sources") or [])
    out: dict[str, Any] = {}
    if fps.get("target"):
        out["target"] = fps["target"]
    if fps.get("sources"):
        out["data"] = fps["sources"]
    return out


def _keys(refs: Mapping[str, Sequence[StageRef]]) -> dict[str, list[str]]:
    return {stage: [r.key for r in rs] for stage, rs in refs.items() if rs}


def _train_of(store: ArtifactStore, export_ref: StageRef) -> StageRef | None:
    """The train artifact an export was made from, if it is still in the store."""
    inputs = store.manifest(export_ref.stage, export_ref.key).inputs
    for i in inputs:
        if i.get("stage") == "train" and i.get("key"):
            try:
                return store.ref("train", i["key"])
            except ArtifactError:
                return None
    return None


def measure_current(
    store: ArtifactStore,
    export_url: str,
    eval_cfg: EvalConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Measured | None, str]:
    """Evaluate the current release's export with this run's settings and target.

    Passing its training run keeps the evaluate key of the release's own run, so an
    unchanged target and unchanged settings find that artifact cached.

    Returns:
        (measured, "") or (None, why it cannot be measured on this target).
    """
    from eagle_core.evaluate import evaluate

    try:
        ex_store, stage, key = ArtifactStore.for_url(export_url)
        ref = ex_store.ref(stage, key)
    except ArtifactError as exc:
        return None, f"its export {export_url} is gone: {exc.what}"
    train = _train_of(ex_store, ref)
    try:
        ev = evaluate(ex_store, ref, eval_cfg, progress=progress, train_ref=train)
    except ModelMismatchError as exc:
        return None, f"its draft does not fit the target: {exc.what}"
    return measured(ex_store, ref, ev), ""


def _entry(
    cfg: ReleaseConfig,
    decision: Decision,
    new: Measured,
    current: Measured | None,
    previous: dict[str, Any] | None,
    current_problem: str,
    keys: dict[str, list[str]],
    fingerprints: dict[str, Any],
    flow_run_id: str | None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "release": cfg.name,
        "action": decision.action,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "export_url": new.export_url,
        "keys": keys,
        "target": new.target,
        "fingerprints": fingerprints,
        "tau": new.tau,
        "tau_per_kind": new.tau_per_kind,
        "per_position_acceptance": new.per_position_acceptance,
        "lossless": new.lossless,
        "evaluate_url": new.evaluate_url,
        "tolerance": cfg.tolerance,
        "compared_with": None
        if previous is None
        else {
            "entry": previous.get("id"),
            "export_url": previous.get("export_url"),
            "problem": current_problem or None,
            "tau": current.tau if current else None,
            "tau_per_kind": current.tau_per_kind if current else None,
            "per_position_acceptance": current.per_position_acceptance if current else None,
            "evaluate_url": current.evaluate_url if current else None,
        },
        "at": _now_iso(),
        "flow_run_id": flow_run_id,
    }


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def release(
    store: ArtifactStore,
    cfg: ReleaseConfig,
    export_ref: StageRef,
    evaluate_ref: StageRef,
    eval_cfg: EvalConfig,
    *,
    provenance: Mapping[str, Sequence[StageRef]] | None = None,
    flow_run_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReleaseOutcome:
    """The release stage: compare, decide, record (module docstring).

    Args:
        store: the artifact root the release lives under.
        cfg: release name and tolerance.
        export_ref / evaluate_ref: the new draft and its evaluation with `eval_cfg`.
        eval_cfg: the evaluation settings (target, prompts) the current release is
            measured with.
        provenance: the run's artifacts by stage (download, train...): their keys and
            manifest fingerprints go into the entry.
        flow_run_id: recorded in the entry.
        progress: evaluation progress of the current release.
    """
    log_ = pointer(store, cfg.name)
    previous = log_.newest()
    new = measured(store, export_ref, evaluate_ref)
    refs = {**(provenance or {}), "export": [export_ref], "evaluate": [evaluate_ref]}
    if previous is not None and previous.get("export_url") == export_ref.url:
        decision = Decision("unchanged", "the new draft is already the current release")
        log.info("release %s: %s (%s)", cfg.name, decision.reason, export_ref.url)
        log_.update_head()  # repairs a head left stale by a writer killed after its append
        return ReleaseOutcome(
            cfg.name, decision, new, None, None, export_ref.url, log_.url(CURRENT)
        )
    current: Measured | None = None
    problem = ""
    if previous is not None and new.lossless is not False:
        current, problem = measure_current(store, previous["export_url"], eval_cfg, progress)
        if problem:
            log.warning("release %s: current release %s: %s", cfg.name, previous["id"], problem)
    decision = decide(new, current, cfg.tolerance, current_problem=problem)
    entry = _entry(
        cfg,
        decision,
        new,
        current,
        previous,
        problem,
        _keys(refs),
        fingerprints_of(store, refs),
        flow_run_id,
    )
    last = log_.last()
    if last is not None and _same_decision(last, entry):
        # a rerun of a kept/refused draft against the same release and measurements: the
        # decision is already in the history, so a nightly run of unchanged inputs adds nothing
        log.info("release %s: same decision as entry %s", cfg.name, last["id"])
        entry, recorded = last, False
    else:
        entry, recorded = log_.append(entry), True
    current_url = new.export_url if decision.promoted else (previous or {}).get("export_url", "")
    log.debug("release %s: %s", cfg.name, decision.reason)  # the task logs it for the run
    return ReleaseOutcome(
        cfg.name, decision, new, current, entry, current_url, log_.url(CURRENT), recorded
    )


def _same_decision(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two entries that decide the same way about the same pair of measured drafts."""
    ca, cb = a.get("compared_with") or {}, b.get("compared_with") or {}
    return (
        a.get("action") == b.get("action")
        and a.get("export_url") == b.get("export_url")
        and a.get("evaluate_url") == b.get("evaluate_url")
        and a.get("tolerance") == b.get("tolerance")
        and all(ca.get(k) == cb.get(k) for k in ("entry", "evaluate_url", "problem"))
    )


def promote(
    store: ArtifactStore,
    name: str,
    export_url: str,
    *,
    reason: str = "",
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """Make `export_url` the current release by hand (rollback): a `manual` history entry.

    No evaluation: whoever promotes by hand decides. The entry copies τ from the latest
    earlier entry about the same export, when there is one (`measured_by`).

    Raises:
        ArtifactError: `export_url` is not a finished export artifact.
    """
    log_ = pointer(store, name)
    ex_store, stage, key = ArtifactStore.for_url(export_url)
    if stage != "export":
        raise ArtifactError(
            f"{export_url} is a {stage!r} artifact, not an export",
            fix="pass the URL of an export artifact: <root>/export/<key>",
        )
    ref = ex_store.ref(stage, key)  # raises when it is not finished
    history = log_.entries()
    previous = next((e for e in reversed(history) if e.get("promoted")), None)
    known = next((e for e in reversed(history) if e.get("export_url") == ref.url), None)
    train = _train_of(ex_store, ref)
    refs: dict[str, list[StageRef]] = {"export": [ref], **({"train": [train]} if train else {})}
    entry = {
        "schema": SCHEMA,
        "release": name,
        "action": "manual",
        "promoted": True,
        "reason": reason or f"manual promotion by {_who()}",
        "export_url": ref.url,
        "keys": _keys(refs),
        "target": str(ex_store.manifest(stage, key).meta.get("target") or ""),
        "fingerprints": fingerprints_of(ex_store, refs),
        "tau": (known or {}).get("tau"),
        "tau_per_kind": (known or {}).get("tau_per_kind"),
        "per_position_acceptance": (known or {}).get("per_position_acceptance"),
        "lossless": (known or {}).get("lossless"),
        "measured_by": (known or {}).get("id"),
        "compared_with": None
        if previous is None
        else {"entry": previous.get("id"), "export_url": previous.get("export_url")},
        "at": _now_iso(),
        "flow_run_id": flow_run_id,
    }
    stored = log_.append(entry)
    log.info("release %s: %s -> %s", name, stored["reason"], ref.url)
    return stored


def show(store: ArtifactStore, name: str) -> dict[str, Any]:
    """The current release (`current.json`), checked against the history.

    Returns:
        {"current": entry or None, "stale": current.json lags the history, "pointer": url}.
        When stale, `current` is the history's newest promotion (the truth).
    """
    head = pointer(store, name).read_head()
    return {
        "current": head.newest,
        "stale": head.stale,
        "head_file": head.entry,
        "pointer": pointer(store, name).url(CURRENT),
    }


def history(store: ArtifactStore, name: str) -> list[dict[str, Any]]:
    """Every decision of the release, oldest first."""
    return pointer(store, name).entries()


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
