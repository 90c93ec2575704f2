"""The `retrain` flow: the whole DAG, and the stage-group flows that run parts of it.

```
[build_demo_target | import_target] -> download (per dataset, parallel) -> [regenerate] -> tokenize
    -> scan_vocab (eagle3) -> extract_hidden (offline; per dataset, parallel)
    -> train -> export -> evaluate
```

Caching is the artifact store's: every task computes its content key, returns at once
("cached") when the manifest exists, and recomputes when its stage is listed in `force`.
Resume is rerunning with the same parameters: finished stages are skipped, a sharded stage
continues at its first unfinished shard, training at its last checkpoint.

The flows take the pydantic sections of `flows.params` as parameters, so the Prefect UI shows
one form section per stage; tasks receive the frozen `eagle_core` configs and artifact URLs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.states import Completed

from flows.params import (
    DEMO,
    DataParams,
    DatasetSpec,
    EvalParams,
    ExportParams,
    ExtractParams,
    PipelineParams,
    RegenerateParams,
    ReleaseParams,
    Stage,
    StorageParams,
    TokenizeParams,
    TrainParams,
    VocabParams,
    demo_target_config,
)
from storage import ArtifactStore, PipelineError, StageRef
from tasks.build_demo_target import build_demo_target
from tasks.download import download
from tasks.evaluate import evaluate as evaluate_task
from tasks.evaluate import tau_of
from tasks.export import export as export_task
from tasks.extract_hidden import extract_hidden
from tasks.import_target import import_target
from tasks.regenerate import regenerate as regenerate_task
from tasks.release import release as release_task
from tasks.scan_vocab import scan_vocab
from tasks.tokenize import tokenize as tokenize_task
from tasks.train import train as train_task

# The demo target's data files used as the demo datasets (chat + FIM), and held-out prompts.
DEMO_DATASETS = (("data/chat_sharegpt.train.jsonl", "chat"), ("data/fim.train.jsonl", "fim"))
DEMO_HELDOUT = (("data/chat_sharegpt.heldout.jsonl", "chat"), ("data/fim.heldout.jsonl", "fim"))


@dataclass
class RetrainResult:
    """What a retrain run produced: one ref per stage (lists for per-dataset stages)."""

    refs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)  # stage -> every ref was reused
    export_url: str = ""
    tau: float | None = None
    # the release stage's decision (eagle_core.release.ReleaseOutcome.to_dict()); None: off
    release: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "refs": self.refs,
            "cached": self.cached,
            "export_url": self.export_url,
            "tau": self.tau,
            "release": self.release,
        }


@dataclass
class _Inputs:
    """The target, tokenizer, datasets and held-out prompts a run works on."""

    target: str
    tokenizer: str
    datasets: list[DatasetSpec]
    heldout: list[DatasetSpec]  # prompt files for evaluate, downloaded like the datasets


def _resolve_inputs(
    p: PipelineParams, store_url: str, force: set[str]
) -> tuple[_Inputs, StageRef | None]:
    """`target: demo` builds (or reuses) the demo target and takes its data files; a `.gguf`
    target is imported first (import_target) and its artifact is the target from then on."""
    user_heldout = [DatasetSpec(path=x, kind="auto") for x in p.evaluate.prompts]
    from eagle_core.import_target import ImportTargetConfig, is_gguf_ref

    if is_gguf_ref(p.target):
        imported = import_target(
            ImportTargetConfig(gguf=p.target, dtype=p.target_dtype),
            store_url,
            force="import_target" in force,
        )
        tokenizer = p.tokenizer or imported.url
        return _Inputs(imported.url, tokenizer, list(p.data.datasets), user_heldout), imported
    if p.target != DEMO:
        inputs = _Inputs(p.target, p.tokenizer or p.target, list(p.data.datasets), user_heldout)
        return inputs, None
    demo = build_demo_target(
        demo_target_config(p.quick), store_url, force="build_demo_target" in force
    )
    datasets = list(p.data.datasets) or [
        DatasetSpec(path=f"{demo.url}/{name}", kind=kind) for name, kind in DEMO_DATASETS
    ]
    heldout = user_heldout or [
        DatasetSpec(path=f"{demo.url}/{name}", kind=kind) for name, kind in DEMO_HELDOUT
    ]
    return _Inputs(demo.url, p.tokenizer or demo.url, datasets, heldout), demo


def heldout_dag(
    data: DataParams, inputs: _Inputs, store_url: str, force: set[str]
) -> list[PrefectFuture]:
    """Download the held-out prompt files (validated like training data, all rows kept);
    runs in parallel with everything up to evaluate."""
    every_row = data.model_copy(update={"max_samples": None})
    return [
        download.submit(every_row.download_config(ds), store_url, force="download" in force)
        for ds in inputs.heldout
    ]


def prepare_data_dag(
    p: PipelineParams, inputs: _Inputs, store_url: str, force: set[str]
) -> tuple[dict[str, list[StageRef]], list[StageRef], StageRef | None]:
    """download (-> regenerate) -> tokenize per dataset in parallel, then scan_vocab over all.

    Returns:
        ({"download": [...], "regenerate": [...]}, tokens per dataset, vocab or None).
    """
    downloaded = [
        download.submit(p.data.download_config(ds), store_url, force="download" in force)
        for ds in inputs.datasets
    ]
    records = downloaded
    if p.regenerate.enabled:
        records = [
            regenerate_task.submit(
                r,
                p.regenerate.regenerate_config(
                    target=inputs.target,
                    tokenizer=inputs.tokenizer,
                    fim_order=p.tokenize.fim_order,
                    seed=p.data.seed,
                ),
                store_url,
                force="regenerate" in force,
            )
            for r in records
        ]
    tokens_f = [
        tokenize_task.submit(
            r,
            p.tokenize.tokenize_config(inputs.tokenizer, ds.kind, p.data.seed),
            store_url,
            force="tokenize" in force,
        )
        for r, ds in zip(records, inputs.datasets, strict=True)
    ]
    tokens = _results(tokens_f)
    vocab = None
    if p.train.draft_kind == "eagle3":
        vocab = scan_vocab(tokens, p.vocab.vocab_config(), store_url, force="scan_vocab" in force)
    refs = {"download": _results(downloaded), "regenerate": []}
    if p.regenerate.enabled:
        refs["regenerate"] = _results(records)
    return refs, tokens, vocab


def train_dag(
    p: PipelineParams,
    inputs: _Inputs,
    tokens: list[StageRef],
    vocab: StageRef | None,
    store_url: str,
    force: set[str],
) -> tuple[list[StageRef], StageRef]:
    """extract_hidden per dataset (offline mode only, in parallel), then train."""
    data = tokens
    hidden: list[StageRef] = []
    if p.train.mode == "offline":
        hidden = _results(
            [
                extract_hidden.submit(
                    t,
                    p.extract.extract_config(inputs.target),
                    store_url,
                    force="extract_hidden" in force,
                )
                for t in tokens
            ]
        )
        data = hidden
    cfg = p.train.train_config(
        store_url=store_url,
        target=inputs.target,
        data=[d.url for d in data],
        vocab_map=vocab.url if vocab else None,
    )
    trained = train_task(
        cfg,
        p.train.nproc,
        p.train.launcher,
        store_url,
        force="train" in force,
        hostfile=p.train.hostfile,
    )
    return hidden, trained


def release_dag(
    export: ExportParams,
    evaluate: EvalParams,
    inputs: _Inputs,
    trained: StageRef,
    draft_kind: Literal["eagle3", "eagle1"],
    prompts: list[StageRef],
    store_url: str,
    force: set[str],
) -> tuple[StageRef, StageRef]:
    """export, then evaluate with real speculative decoding on the `prompts` records."""
    exported = export_task(
        trained,
        export.export_config(draft_kind, inputs.target),
        store_url,
        force="export" in force,
    )
    evaluated = evaluate_task(
        exported,
        evaluate.eval_config(
            target=inputs.target,
            tokenizer=inputs.tokenizer,
            prompts=[r.url for r in prompts],
        ),
        store_url,
        force="evaluate" in force,
        train=trained,
    )
    return exported, evaluated


def preload() -> None:
    """Import what the parallel tasks import, once, before their threads start.

    transformers resolves `AutoTokenizer` & co. lazily and that is not thread-safe: two
    tokenize tasks importing it at the same moment can fail with "cannot import name".
    """
    import transformers

    for name in ("AutoTokenizer", "AutoModelForCausalLM", "AutoConfig", "PreTrainedTokenizerFast"):
        getattr(transformers, name)
    import eagle_core.download  # noqa: F401
    import eagle_core.extract  # noqa: F401
    import eagle_core.tokenize  # noqa: F401


def run_pipeline(params: PipelineParams) -> RetrainResult:
    """The retrain DAG for validated parameters (called by the flows and the CLI)."""
    preload()
    log = get_run_logger()
    p = params.effective()
    store_url = p.storage.url()
    store = ArtifactStore(store_url)
    force: set[str] = set(p.force)
    started = time.time()
    log.info(
        "retrain: target %s, store %s, quick=%s, force=%s",
        p.target,
        store.root,
        p.quick,
        sorted(force) or "none",
    )
    inputs, demo = _resolve_inputs(p, store_url, force)
    heldout_f = heldout_dag(p.data, inputs, store_url, force)
    data_refs, tokens, vocab = prepare_data_dag(p, inputs, store_url, force)
    hidden, trained = train_dag(p, inputs, tokens, vocab, store_url, force)
    heldout = _results(heldout_f)
    if not heldout:
        log.warning(
            "evaluate: no held-out prompts (evaluate.prompts); measuring tau on the "
            "training data, which overestimates it"
        )
        heldout = data_refs["download"]
    exported, evaluated = release_dag(
        p.export, p.evaluate, inputs, trained, p.train.draft_kind, heldout, store_url, force
    )
    data_refs["download"] = data_refs["download"] + [
        r for r in heldout if r not in data_refs["download"]
    ]

    refs: dict[str, list[StageRef]] = {
        "build_demo_target": [demo] if demo and demo.stage == "build_demo_target" else [],
        "import_target": [demo] if demo and demo.stage == "import_target" else [],
        **data_refs,
        "tokenize": tokens,
        "scan_vocab": [vocab] if vocab else [],
        "extract_hidden": hidden,
        "train": [trained],
        "export": [exported],
        "evaluate": [evaluated],
    }
    result = RetrainResult(export_url=exported.url, tau=tau_of(evaluated))
    if p.release.enabled:
        # the current release is measured with exactly the settings `evaluated` was made with
        eval_cfg = p.evaluate.eval_config(
            target=inputs.target, tokenizer=inputs.tokenizer, prompts=[r.url for r in heldout]
        )
        result.release = release_task(
            exported,
            evaluated,
            eval_cfg,
            p.release.release_config(),
            store_url,
            provenance={k: v for k, v in refs.items() if k not in ("export", "evaluate")},
        )
        (log.warning if result.release["action"] in ("keep", "refuse") else log.info)(
            "retrain: release %s: %s; serving %s",
            result.release["name"],
            result.release["reason"],
            result.release["export_url"] or "(no release)",
        )
    for stage, stage_refs in refs.items():
        if not stage_refs:
            continue
        result.refs[stage] = [r.to_dict() for r in stage_refs]
        result.cached[stage] = all(
            store.manifest(r.stage, r.key).created_at < started for r in stage_refs
        )
    log.info(
        "retrain: exported draft %s, acceptance length tau = %s", result.export_url, result.tau
    )
    log.info(
        "retrain: cached stages %s, computed stages %s",
        [s for s, c in result.cached.items() if c],
        [s for s, c in result.cached.items() if not c],
    )
    return result


def _results(futures: list[PrefectFuture]) -> list[StageRef]:
    """Wait for all parallel tasks, then raise the first failure (after all have settled,
    so a failing dataset does not leave its siblings' shards half-written)."""
    wait(futures)
    return [f.result() for f in futures]


@flow(name="retrain", log_prints=False, validate_parameters=True)
def retrain(
    target: str = DEMO,
    tokenizer: str = "",
    data: DataParams = DataParams(),  # noqa: B008 - frozen pydantic sections are immutable
    regenerate: RegenerateParams = RegenerateParams(),  # noqa: B008
    tokenize: TokenizeParams = TokenizeParams(),  # noqa: B008
    vocab: VocabParams = VocabParams(),  # noqa: B008
    extract: ExtractParams = ExtractParams(),  # noqa: B008
    train: TrainParams = TrainParams(),  # noqa: B008
    export: ExportParams = ExportParams(),  # noqa: B008
    evaluate: EvalParams = EvalParams(),  # noqa: B008
    release: ReleaseParams = ReleaseParams(),  # noqa: B008
    storage: StorageParams = StorageParams(),  # noqa: B008
    quick: bool = False,
    force: list[Stage] | None = None,
    target_dtype: Literal["bfloat16", "float32"] = "bfloat16",
) -> Any:
    """Retrain the draft model end to end: data, hidden states, training, export, evaluation,
    release.

    Args:
        target: Target model: a local HF dir, a Hub name, an artifact URL, a .gguf file
            (imported first), or 'demo'.
        tokenizer: Tokenizer of the target (empty: the target's own).
        data: Datasets, sample cap and seed.
        regenerate: On-policy regeneration of answers by the target.
        tokenize: Chat / FIM rendering and truncation.
        vocab: Draft vocabulary.
        extract: Hidden-state extraction (offline mode).
        train: Draft model, TTT, optimizer and DeepSpeed.
        export: Serving checkpoint layout.
        evaluate: Speculative decoding evaluation.
        release: Promotion of the draft a serving job uses (only when it is as good).
        storage: Artifact root (credentials come from the worker's environment).
        quick: Quick preset: a few steps everywhere (smoke test).
        force: Stages to recompute even if their artifacts exist.
        target_dtype: A .gguf target's dequantized weights (bfloat16: what engines serve).

    Returns:
        `RetrainResult.to_dict()`, in a Completed state whose message is the release
        decision ("kept the current release: τ 3.10 < 3.40 − 0.1"), shown with the run.
    """
    params = PipelineParams(
        target=target,
        tokenizer=tokenizer,
        target_dtype=target_dtype,
        data=data,
        regenerate=regenerate,
        tokenize=tokenize,
        vocab=vocab,
        extract=extract,
        train=train,
        export=export,
        evaluate=evaluate,
        release=release,
        storage=storage,
        quick=quick,
        force=force or [],
    )
    result = run_pipeline(params).to_dict()
    decision = result["release"]
    if decision is None:
        return result
    # calling the flow still returns the dict; the run's state carries the decision
    return Completed(message=f"release {decision['name']}: {decision['reason']}", data=result)


@flow(name="prepare-data", validate_parameters=True)
def prepare_data(
    target: str = DEMO,
    tokenizer: str = "",
    data: DataParams = DataParams(),  # noqa: B008
    tokenize: TokenizeParams = TokenizeParams(),  # noqa: B008
    vocab: VocabParams = VocabParams(),  # noqa: B008
    storage: StorageParams = StorageParams(),  # noqa: B008
    quick: bool = False,
    force: list[Stage] | None = None,
) -> dict[str, Any]:
    """Download, tokenize and scan the draft vocabulary (no model training).

    Args:
        target: Target model whose tokenizer is used ('demo': the demo target).
        tokenizer: Tokenizer (empty: the target's own).
        data: Datasets, sample cap and seed.
        tokenize: Chat / FIM rendering and truncation.
        vocab: Draft vocabulary.
        storage: Artifact root.
        quick: Quick preset.
        force: Stages to recompute.
    """
    preload()
    p = PipelineParams(
        target=target,
        tokenizer=tokenizer,
        data=data,
        tokenize=tokenize,
        vocab=vocab,
        storage=storage,
        quick=quick,
        force=force or [],
    ).effective()
    store_url = p.storage.url()
    inputs, _ = _resolve_inputs(p, store_url, set(p.force))
    records, tokens, vocab_ref = prepare_data_dag(p, inputs, store_url, set(p.force))
    return {
        "download": [r.to_dict() for r in records],
        "tokenize": [t.to_dict() for t in tokens],
        "scan_vocab": vocab_ref.to_dict() if vocab_ref else None,
    }


@flow(name="release-draft", validate_parameters=True)
def release_draft(
    train_url: str,
    target: str,
    tokenizer: str = "",
    prompts: list[str] | None = None,
    export: ExportParams = ExportParams(),  # noqa: B008
    evaluate: EvalParams = EvalParams(),  # noqa: B008
    force: list[Stage] | None = None,
) -> dict[str, Any]:
    """Export a trained draft and evaluate it against its target.

    Args:
        train_url: Artifact URL of a finished train stage (<root>/train/<key>).
        target: Target model (local dir, Hub name or artifact URL).
        tokenizer: Tokenizer (empty: the target's own).
        prompts: Held-out prompt files (jsonl) for the evaluation.
        export: Serving checkpoint layout.
        evaluate: Speculative decoding evaluation.
        force: Stages to recompute.
    """
    preload()
    store, stage, key = ArtifactStore.for_url(train_url)
    if stage != "train":
        raise PipelineError(
            f"{train_url} is a {stage!r} artifact, not a train artifact",
            fix="pass the URL of a train stage artifact: <root>/train/<key>",
        )
    if not prompts:
        raise PipelineError(
            "release-draft got no prompts",
            fix="pass held-out prompt files (jsonl) or records artifact URLs",
        )
    specs = [DatasetSpec(path=x, kind="auto") for x in prompts]
    inputs = _Inputs(target, tokenizer or target, [], specs)
    forced = set(force or [])
    heldout = _results(heldout_dag(DataParams(), inputs, store.root, forced))
    kind = store.manifest(stage, key).meta.get("kind", "eagle3")
    exported, evaluated = release_dag(
        export, evaluate, inputs, store.ref(stage, key), kind, heldout, store.root, forced
    )
    return {"export": exported.to_dict(), "evaluate": evaluated.to_dict(), "tau": tau_of(evaluated)}
