"""The parameters of the `retrain` flow: the run form of the Prefect UI.

One pydantic section per stage, in DAG order (data, regenerate, tokenize, vocab, extract,
train, export, evaluate, release, storage). A field's `description` is the help line under it in the
form, `Literal` fields are selects, `ge`/`le` limits are enforced by the form itself. Each
section turns into its stage's frozen `eagle_core` config in one method; tasks only ever see
that dataclass, so wording in this file never changes a content key.

No field holds a secret: credentials come from the environment of the worker (Kubernetes
secrets, Prefect blocks), never from parameters.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # the core configs, imported lazily so the form loads without torch
    from eagle_core.download import DownloadConfig
    from eagle_core.evaluate import EvalConfig
    from eagle_core.export import ExportConfig
    from eagle_core.extract import ExtractConfig
    from eagle_core.regenerate import RegenerateConfig
    from eagle_core.release import ReleaseConfig
    from eagle_core.tokenize import TokenizeConfig
    from eagle_core.train import TrainConfig
    from eagle_core.vocab import VocabConfig

STAGES = (
    "build_demo_target",
    "import_target",
    "download",
    "regenerate",
    "tokenize",
    "scan_vocab",
    "extract_hidden",
    "train",
    "export",
    "evaluate",
)
Stage = Literal[
    "build_demo_target",
    "import_target",
    "download",
    "regenerate",
    "tokenize",
    "scan_vocab",
    "extract_hidden",
    "train",
    "export",
    "evaluate",
]
DEMO = "demo"  # `target: demo` builds the demo target and uses its data files


def _check_url_has_no_secret(v: str, field: str) -> str:
    """Refuse `user:password@` and query strings (signed URLs, tokens) in a URL parameter:
    parameters are stored in the flow run and shown in the UI."""
    parts = urllib.parse.urlsplit(v)
    if parts.password or parts.username or parts.query:
        raise ValueError(
            f"{field} must not carry credentials or a query string; give them to the worker "
            "as environment variables (a Kubernetes secret or a Prefect block)"
        )
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Section):
    """One input dataset."""

    path: str = Field(
        description="Hub dataset name, or a local/fsspec path or glob of jsonl/json/parquet files"
    )
    kind: Literal["chat", "fim", "tokens", "auto"] = Field(
        "chat", description="Record kind: chat, FIM code, pre-tokenized ids, or auto per row"
    )
    weight: float = Field(
        1.0, gt=0, description="Row multiplier: 0.5 keeps half the rows, 2 repeats each twice"
    )
    split: str = Field("train", description="Split to read (Hub datasets)")


class DataParams(_Section):
    """Data: which datasets to download, how many samples, shuffle seed."""

    datasets: list[DatasetSpec] = Field(
        default_factory=list,
        description="Datasets with weights; empty with target 'demo' = the demo chat + FIM files",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Sample cap per dataset, after weighting (empty: all)"
    )
    seed: int = Field(0, ge=0, description="Seed of the shuffle and of FIM span splitting")
    max_reject_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Fail a download above this share of rejected rows"
    )

    def download_config(self, ds: DatasetSpec) -> DownloadConfig:
        """The download of one dataset (datasets download in parallel, one artifact each)."""
        from eagle_core.download import DownloadConfig, SourceSpec

        source = SourceSpec(path=ds.path, kind=ds.kind, split=ds.split, weight=ds.weight)
        return DownloadConfig(
            sources=(source,),
            max_samples=self.max_samples,
            seed=self.seed,
            fim_seed=self.seed,
            max_reject_fraction=self.max_reject_fraction,
        )


class RegenerateParams(_Section):
    """Regenerate: the target rewrites the answers / FIM middles (on-policy data)."""

    enabled: bool = Field(
        False, description="Rewrite answers with the target before tokenizing (slow)"
    )
    backend: Literal["local", "server"] = Field(
        "local", description="local: transformers in the worker; server: OpenAI-compatible URL"
    )
    server_url: str = Field("", description="Server backend: e.g. http://vllm:8000 (no key here)")
    api_key_env: str = Field(
        "", description="NAME of the env variable holding the server's API key (not the key)"
    )
    max_new_tokens: int = Field(1024, ge=1, description="Longest regenerated answer (tokens)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (0: greedy)")
    last_turn_only: bool = Field(False, description="Regenerate only the last assistant turn")

    @field_validator("server_url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return _check_url_has_no_secret(v, "regenerate.server_url")

    def regenerate_config(
        self, *, target: str, tokenizer: str, fim_order: str, seed: int
    ) -> RegenerateConfig:
        from eagle_core.regenerate import RegenerateConfig

        return RegenerateConfig(
            backend=self.backend,
            target=target,
            tokenizer=tokenizer or None,
            server_url=self.server_url or None,
            api_key_env=self.api_key_env or None,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            last_turn_only=self.last_turn_only,
            fim_order=fim_order,  # type: ignore[arg-type]
            seed=seed,
        )


class TokenizeParams(_Section):
    """Tokenize: chat template / FIM rendering, loss masks, truncation."""

    fim_order: Literal["psm", "spm"] = Field(
        "psm", description="FIM order: prefix-suffix-middle (standard) or suffix-prefix-middle"
    )
    fim_rate: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of FIM samples in FIM order (rest: left-to-right)",
    )
    max_length: int = Field(2048, ge=8, le=131072, description="Max tokens per sample")
    keep_reasoning: bool = Field(True, description="Train on reasoning content of answers")
    loss_on: Literal["answer", "all"] = Field(
        "answer",
        description="Loss on answers / FIM middles only, or on every token (prompts too)",
    )

    def tokenize_config(
        self, tokenizer: str, kind: Literal["chat", "fim", "tokens"], seed: int
    ) -> TokenizeConfig:
        from eagle_core.tokenize import TokenizeConfig

        return TokenizeConfig(
            tokenizer=tokenizer,
            format=kind,
            fim_order=self.fim_order,
            fim_rate=self.fim_rate,
            max_length=self.max_length,
            keep_reasoning=self.keep_reasoning,
            loss_on=self.loss_on,
            seed=seed,
        )


class VocabParams(_Section):
    """Vocab: the draft vocabulary (EAGLE-3 only)."""

    draft_vocab_size: int = Field(
        32000, ge=1, description="Draft vocab size: most frequent target tokens kept"
    )

    def vocab_config(self) -> VocabConfig:
        from eagle_core.vocab import VocabConfig

        return VocabConfig(draft_vocab_size=self.draft_vocab_size)


class ExtractParams(_Section):
    """Extract: target hidden states for offline training."""

    batch_size: int = Field(8, ge=1, description="Samples per target forward")
    max_tokens: int = Field(
        16384, ge=1, description="Padded tokens per forward (bounds activation memory)"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Stored hidden-state dtype (bf16: 8H bytes per token)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present")
    shard_size: int = Field(256, ge=1, description="Samples per shard (the unit of resume)")

    def extract_config(self, target: str) -> ExtractConfig:
        from eagle_core.extract import ExtractConfig

        return ExtractConfig(
            target=target,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            dtype=self.dtype,
            device=self.device,
            shard_size=self.shard_size,
        )


class TrainParams(_Section):
    """Train: draft model, TTT, optimizer, DeepSpeed."""

    draft_kind: Literal["eagle3", "eagle1"] = Field(
        "eagle3", description="Draft architecture: EAGLE-3 (fused 3 layers) or EAGLE-1"
    )
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: from extracted hidden states; online: target in the step"
    )
    ttt_steps: int = Field(7, ge=1, le=16, description="Unrolled training-time-test steps")
    feature_noise: float | None = Field(
        None,
        ge=0,
        description="Training noise on the target features fed to the draft "
        "(empty: EAGLE-1 0.2, EAGLE-3 0)",
    )
    lr: float = Field(5e-5, gt=0, lt=1.0, description="AdamW learning rate")
    batch_size: int = Field(1, ge=1, description="Micro batch per process")
    grad_accum: int = Field(1, ge=1, description="Micro batches per optimizer step")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget per micro batch, samples x longest (needs batch size > 1: "
        "its sample cap)",
    )
    epochs: int = Field(1, ge=1, description="Passes over the data (when steps is empty)")
    steps: int | None = Field(None, ge=1, description="Optimizer steps (empty: epochs x data)")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Training precision (auto: bf16 on GPU, fp32 on CPU)"
    )
    nproc: int = Field(1, ge=1, le=64, description="Processes (GPUs) on this node")
    hostfile: str = Field(
        "", description="DeepSpeed hostfile on the worker for several nodes (empty: one node)"
    )
    launcher: Literal["deepspeed", "torchrun", "inline"] = Field(
        "deepspeed", description="How training processes start (inline: in the worker)"
    )
    # the core's default is 0 (only at the end); a pipeline run must be resumable
    checkpoint_every: int = Field(
        500, ge=0, description="Steps between resumable checkpoints (0: only at the end)"
    )
    log_every: int = Field(
        10, ge=1, description="Steps between metrics records (points of the training curves)"
    )
    seed: int = Field(0, ge=0, description="Seed of draft init and data order")

    def train_config(
        self, *, store_url: str, target: str, data: list[str], vocab_map: str | None
    ) -> TrainConfig:
        from eagle_core.train import TrainConfig

        precision = self.precision
        if precision == "auto":
            import torch

            precision = "bf16" if torch.cuda.is_available() else "fp32"
        return TrainConfig(
            store=store_url,
            target=target,
            data=tuple(data),
            vocab_map=vocab_map if self.draft_kind == "eagle3" else None,
            kind=self.draft_kind,
            mode=self.mode,
            ttt_steps=self.ttt_steps,
            feature_noise=self.feature_noise,
            lr=self.lr,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            max_tokens=self.max_tokens,
            epochs=self.epochs,
            steps=self.steps,
            zero_stage=self.zero_stage,
            precision=precision,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
            seed=self.seed,
        )


class ExportParams(_Section):
    """Export: the serving checkpoint."""

    format: Literal["auto", "speculators"] = Field(
        "auto",
        description="Layout: auto = SGLang/vLLM EAGLE-3 or reference EAGLE-1; vLLM speculators",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weight dtype of the exported draft"
    )
    include_embeddings: bool | None = Field(
        None,
        description="Also write embed_tokens.weight; default: yes for speculators only",
    )

    def export_config(self, draft_kind: Literal["eagle3", "eagle1"], target: str) -> ExportConfig:
        from eagle_core.export import ExportConfig

        fmt = draft_kind if self.format == "auto" else self.format
        return ExportConfig(
            format=fmt, dtype=self.dtype, target=target, include_embeddings=self.include_embeddings
        )


class EvalParams(_Section):
    """Evaluate: real speculative decoding against the target."""

    prompts: list[str] = Field(
        default_factory=list,
        description="Held-out prompt files (jsonl/parquet; empty: the demo's held-out files)",
    )
    steps: int = Field(5, ge=1, le=16, description="Draft tokens per round (chain length)")
    mode: Literal["chain", "tree"] = Field("chain", description="Drafting: chain or EAGLE-2 tree")
    max_prompts: int = Field(16, ge=1, description="Held-out prompts per kind (chat, FIM)")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt")
    engine: Literal["ours", "vllm"] = Field(
        "ours",
        description="Who decodes: ours, or vllm (its own venv from make engines; greedy chain)",
    )
    vllm_python: str = Field(
        "",
        description="engine=vllm: the vLLM venv's python (empty: $EAGLE_PIPELINE_VLLM_PYTHON, "
        "else the make engines venv)",
    )

    def eval_config(self, *, target: str, tokenizer: str, prompts: list[str]) -> EvalConfig:
        """`prompts`: records artifact URLs the flow downloaded from `self.prompts`."""
        from eagle_core.evaluate import EvalConfig

        return EvalConfig(
            target=target,
            tokenizer=tokenizer,
            prompts=tuple(prompts),
            steps=self.steps,
            mode=self.mode,
            max_prompts=self.max_prompts,
            max_new_tokens=self.max_new_tokens,
            engine=self.engine,
            vllm_python=self.vllm_python,
        )


class ReleaseParams(_Section):
    """Release: promote the new draft under a name only when it beats the current one."""

    # defaults = eagle_core.release.ReleaseConfig's (tests/flows/test_flow_params.py checks)
    enabled: bool = Field(
        True, description="Compare with the current release; promote only a draft as good"
    )
    name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Release name: releases/NAME/current.json in the store names the export",
    )
    tolerance: float = Field(
        0.1, ge=0.0, le=10.0, description="Promote when tau_new >= tau_current - tolerance"
    )

    def release_config(self) -> ReleaseConfig:
        from eagle_core.release import ReleaseConfig

        return ReleaseConfig(name=self.name, tolerance=self.tolerance)


class StorageParams(_Section):
    """Storage: where every artifact goes (credentials come from the worker's environment)."""

    root: str = Field(
        "",
        description="Artifact root: local path or s3://bucket/prefix (empty: default root)",
    )

    @field_validator("root")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return _check_url_has_no_secret(v, "storage.root")

    def url(self) -> str:
        from storage.store import default_root

        return self.root or default_root()


# The quick preset: a few steps everywhere, for the demo smoke test and the integration tests.
QUICK: dict[str, dict[str, Any]] = {
    "data": {"max_samples": 48},
    "tokenize": {"max_length": 128},
    "vocab": {"draft_vocab_size": 256},
    "extract": {"batch_size": 8, "shard_size": 16},
    "train": {
        "steps": 6,
        "batch_size": 4,
        "checkpoint_every": 3,
        "lr": 1e-3,
        "nproc": 1,
        "launcher": "inline",  # no launcher start-up (~1 min on 2 busy cores)
        "log_every": 1,  # a training curve with a point per step, not one point
    },
    "evaluate": {"max_prompts": 2, "max_new_tokens": 16, "steps": 3},
}


class PipelineParams(_Section):
    """Everything one `retrain` run takes (the CLI's `--config pipeline.yaml`)."""

    target: str = Field(
        DEMO,
        description="Target model: local dir, Hub name, artifact URL, a .gguf file "
        "(imported first), or 'demo'",
    )
    tokenizer: str = Field("", description="Tokenizer (empty: the target's own)")
    target_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16",  # = eagle_core.import_target.ImportTargetConfig.dtype (why: there)
        description="A .gguf target's dequantized weights (bfloat16: what engines serve)",
    )
    data: DataParams = Field(
        default_factory=DataParams, description="Datasets, sample cap and seed"
    )
    regenerate: RegenerateParams = Field(
        default_factory=RegenerateParams, description="On-policy answers written by the target"
    )
    tokenize: TokenizeParams = Field(
        default_factory=TokenizeParams, description="Chat / FIM rendering and truncation"
    )
    vocab: VocabParams = Field(default_factory=VocabParams, description="Draft vocabulary")
    extract: ExtractParams = Field(
        default_factory=ExtractParams, description="Hidden-state extraction (offline mode)"
    )
    train: TrainParams = Field(
        default_factory=TrainParams, description="Draft model, TTT, optimizer and DeepSpeed"
    )
    export: ExportParams = Field(
        default_factory=ExportParams, description="Serving checkpoint layout"
    )
    evaluate: EvalParams = Field(
        default_factory=EvalParams, description="Speculative decoding evaluation"
    )
    release: ReleaseParams = Field(
        default_factory=ReleaseParams, description="Promotion of the draft a serving job uses"
    )
    storage: StorageParams = Field(
        default_factory=StorageParams,
        description="Artifact root (credentials come from the worker's environment)",
    )
    quick: bool = Field(False, description="Quick preset: a few steps everywhere (smoke test)")
    force: list[Stage] = Field(default_factory=list, description="Stages to recompute")

    @model_validator(mode="after")
    def _check(self) -> PipelineParams:
        if self.target != DEMO and not self.data.datasets:
            raise ValueError("data.datasets is empty: list at least one dataset for this target")
        if self.regenerate.enabled and self.regenerate.backend == "server":
            if not self.regenerate.server_url:
                raise ValueError("regenerate.server_url is empty for the server backend")
        return self

    def effective(self) -> PipelineParams:
        """These parameters with the quick preset applied (a no-op when quick is off).

        The preset fills only fields the user left at their defaults: `quick` plus an
        explicit `extract.shard_size` keeps that shard size. The Prefect run form submits
        every field, so a value equal to the field's default counts as left at the default.
        """
        if not self.quick:
            return self
        update: dict[str, Any] = {}
        for section, values in QUICK.items():
            current = getattr(self, section)
            fields = type(current).model_fields
            given = {
                k
                for k in current.model_fields_set
                if getattr(current, k) != fields[k].get_default(call_default_factory=True)
            }
            update[section] = current.model_copy(
                update={k: v for k, v in values.items() if k not in given}
            )
        return self.model_copy(update=update)


def load_pipeline_yaml(path: str) -> PipelineParams:
    """Read a `pipeline.yaml` (the sections above as mappings) into validated parameters."""
    import yaml

    with open(os.path.expanduser(path), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(doc).__name__}")
    return PipelineParams.model_validate(doc)


# `eagle-pipeline demo` (= `make demo`): the real pipeline on the demo target within ~30 min on
# 2 CPU cores: DeepSpeed on 2 processes, a draft vocab that fits the 8k demo vocab. Measured
# on a 2-core machine shared with other jobs (load ~12): 18 s per step at 4 x 512 tokens per
# process, hence 2 x 256 (about 4x less work per step).
DEMO_RUN: dict[str, Any] = {
    "data": {"max_samples": 1500},
    "tokenize": {"max_length": 256},
    "vocab": {"draft_vocab_size": 2048},
    "extract": {"batch_size": 16},
    "train": {
        "nproc": 2,
        "launcher": "deepspeed",
        "steps": 300,
        "batch_size": 2,
        "lr": 1e-3,  # a small draft trained briefly takes a large rate
        "checkpoint_every": 100,
    },
    "evaluate": {"max_prompts": 16, "max_new_tokens": 64},
}


def demo_params(*, quick: bool, store: str = "", force: list[str] | None = None) -> PipelineParams:
    """The parameters `eagle-pipeline demo [--quick]` runs: the demo target and its data."""
    sections = {} if quick else DEMO_RUN
    return PipelineParams.model_validate(
        {
            "target": DEMO,
            "quick": quick,
            "storage": {"root": store},
            "force": force or [],
            **sections,
        }
    )


# The demo target's quick preset: an 8-layer H=64 Llama on a few stdlib modules (the small test
# target's `SMALL_MODULES` + these), trained for a few seconds. Real enough for the whole DAG,
# small enough for the integration tests.
QUICK_EXTRA_MODULES = ("calendar", "csv", "pprint", "reprlib", "struct")
QUICK_DEMO_TARGET: dict[str, Any] = {
    "vocab_size": 1024,
    "tokenizer_corpus_chars": 200_000,
    "hidden_size": 64,
    "num_layers": 8,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "seq_len": 64,
    "batch_size": 8,
    "train_steps": 60,
    "max_train_seconds": 20.0,
    "heldout_permille": 250,
    "fim_per_file": 4,
    "max_train_samples": 64,
    "max_heldout_samples": 16,
    "eval_blocks": 4,
    "eval_fim_samples": 4,
}


def demo_target_config(quick: bool) -> Any:
    """`eagle_core.demo.DemoTargetConfig`: the full demo target, or its quick preset."""
    from eagle_core.demo import DemoTargetConfig
    from eagle_core.demo.build import SMALL_MODULES

    if not quick:
        return DemoTargetConfig()
    return DemoTargetConfig(**QUICK_DEMO_TARGET, modules=SMALL_MODULES + QUICK_EXTRA_MODULES)
