"""Draft training with DeepSpeed: one entry point for every launcher.

    python -m eagle_core.train --config train.json [--local_rank N] [--force]

runs the same way under the `deepspeed` launcher, `torchrun`, a Kubernetes job, a Prefect task
(eagle_core/launch.py builds those command lines) or alone (a 1-rank group is made up). The
JSON holds `TrainConfig` fields; the train artifact `<root>/train/<key>/` gets
`checkpoints/step-XXXXXXXX/` (resumable), `final/draft.safetensors` (fp32 state_dict incl.
d2t/t2d), `final/draft_config.json`, `metrics.jsonl`, `loss.png` and `accuracy.png`. The last
stdout line of rank 0 is the artifact URL.

Modes:
- offline: `data` are extract_hidden artifacts; each rank reads its own micro batches
  (eagle_core/train_data.py: deterministic split by rank).
- online: `data` are tokenize artifacts; the frozen target runs inside the step (no grad,
  eagle_core.capture.capture_states) and its states are rounded to bf16 exactly as the
  extract_hidden stage stores them, so both modes train on the same numbers.

Resume: a run restarts from its latest complete checkpoint (eagle_core/checkpoint.py) with the
same data order; the key of the run does not depend on how often it saves, logs or evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from eagle_core import checkpoint as ckpt
from eagle_core.errors import ConfigError, DataError, ModelMismatchError, TrainingError
from eagle_core.metrics import METRICS_FILE, MetricsLogger, plot_metrics, read_metrics
from eagle_core.train_data import (
    BatchPrefetcher,
    CollatedBatch,
    ShardDataset,
    collate,
    count_over_budget,
    micro_batch_index,
    plan_epoch,
)
from storage import ArtifactStore, StageRef

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "train"
FINAL_WEIGHTS = "final/draft.safetensors"
FINAL_CONFIG = "final/draft_config.json"
# TrainConfig fields that change how a run is observed or stored, never what it computes: they
# stay out of the key, so a killed run restarted with another checkpoint interval still resumes.
_OPERATIONAL_FIELDS = (
    "store",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "log_every",
    "tensorboard",
    "wandb_project",
)


# The reference trainers' feature noise (TrainConfig.feature_noise, add_feature_noise):
# SafeAILab/EAGLE eagle/train/main.py trains EAGLE-1 with AddUniformNoise(std=0.2);
# its EAGLE-3 trainer (eagle/traineagle3/) adds none.
REFERENCE_FEATURE_NOISE = {"eagle1": 0.2, "eagle3": 0.0}


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run reads; JSON-able (`to_dict` / `from_dict`)."""

    store: str | None = None  # artifact root; None -> $EAGLE_PIPELINE_STORE or ./artifacts
    target: str  # local dir, Hub name or demo-target artifact URL (the frozen target)
    data: tuple[str, ...]  # artifact URLs: extract_hidden (offline) or tokenize (online)
    vocab_map: str | None = None  # scan_vocab artifact URL (EAGLE-3); None: first Vd target ids
    kind: Literal["eagle3", "eagle1"] = "eagle3"  # EAGLE-3 is the stronger draft
    mode: Literal["offline", "online"] = "offline"  # online: no hidden-state storage needed
    draft_vocab_size: int | None = None  # None: the vocab map's size (or V without a map)
    aux_layer_ids: tuple[int, ...] | None = None  # None: the shards' (offline) or default
    draft_overrides: dict[str, Any] = field(default_factory=dict)  # DraftConfig field overrides
    ttt_steps: int = 7  # EAGLE-3 default unroll depth
    ttt_decay: float = 0.8  # step k weighs decay**k
    ttt_alignment: Literal["aligned", "reference"] = "aligned"  # see eagle_core/loss.py
    # uniform noise on the target features the draft is fed in training (add_feature_noise);
    # None: the reference trainer's value for `kind` (REFERENCE_FEATURE_NOISE); 0: off
    feature_noise: float | None = None
    lr: float = 5e-5  # reference trainer's AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # reference trainer's AdamW betas
    weight_decay: float = 0.0  # the reference trainer uses none
    grad_clip: float = 0.5  # reference trainer's max grad norm
    warmup_steps: int | None = None  # None: warmup_ratio of the total steps
    warmup_ratio: float = 0.02  # short linear warmup keeps early AdamW steps small
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup
    epochs: int = 1  # passes over the data (ignored when steps is set)
    steps: int | None = None  # optimizer steps; None: epochs * steps per epoch
    batch_size: int = 1  # micro batch per process (long samples: 1 fits most GPUs)
    grad_accum: int = 1  # micro batches per optimizer step and process
    group_steps: int = 16  # length grouping window in optimizer steps; <=1: plain shuffle
    # padded tokens (samples x longest) per micro batch; None: batch_size samples each. Set,
    # micro batches hold 1 to batch_size samples (a longer sample: alone); each micro batch's
    # loss stays its per-token mean (eagle_core/loss.py), micro batches weigh the same
    max_tokens: int | None = None
    zero_stage: int = 0  # DeepSpeed ZeRO 0-3; the draft is small, 0-1 is usually enough
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 on GPUs; fp32 on CPU
    target_dtype: Literal["float32", "bfloat16"] = "float32"  # target weights (online/head)
    online_bf16_states: bool = True  # round online states to bf16 like extract_hidden stores
    seed: int = 0  # draft init and data order
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept (older ones deleted)
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end
    heldout_fraction: float = 0.05  # of the samples (by id hash) kept out of training
    heldout: tuple[str, ...] = ()  # held-out artifacts instead of a fraction of `data`
    log_every: int = 10  # steps between metrics records
    deepspeed_config: str | None = None  # a user DeepSpeed JSON merged into ours (validated)
    tensorboard: bool = False  # also write TensorBoard scalars (needs tensorboard)
    wandb_project: str | None = None  # also log to W&B (needs wandb)

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            object.__setattr__(self, "data", (self.data,))
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "heldout", tuple(self.heldout))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.aux_layer_ids is not None:
            object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))
        if not self.data:
            raise ConfigError(
                "train.data is empty",
                fix="pass extract_hidden (offline) or tokenize (online) artifact URLs",
            )
        if not self.target:
            raise ConfigError("train.target is empty", fix="pass the target model reference")
        _choice("kind", self.kind, ("eagle3", "eagle1"))
        _choice("mode", self.mode, ("offline", "online"))
        _choice("precision", self.precision, ("fp32", "bf16"))
        _choice("target_dtype", self.target_dtype, ("float32", "bfloat16"))
        _choice("schedule", self.schedule, ("cosine", "constant"))
        _choice("ttt_alignment", self.ttt_alignment, ("aligned", "reference"))
        if self.kind == "eagle1" and self.vocab_map:
            raise ConfigError(
                "train.vocab_map is set for kind=eagle1",
                fix="EAGLE-1 drafts over the full target vocab: drop vocab_map",
            )
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"train.lr={self.lr} is not in (0, 1)", fix="use 5e-5 (default)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(
                f"train.betas={self.betas} must be two values in [0, 1)", fix="use (0.9, 0.95)"
            )
        for name in ("weight_decay", "grad_clip", "min_lr_ratio", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} is negative", fix="use >= 0")
        if self.warmup_ratio >= 1.0 or self.min_lr_ratio > 1.0:
            raise ConfigError(
                "train.warmup_ratio must be < 1 and min_lr_ratio <= 1",
                fix="use warmup_ratio 0.02, min_lr_ratio 0.0",
            )
        for name in ("batch_size", "grad_accum", "epochs", "ttt_steps", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1", fix="use 1+")
        for name in ("checkpoint_every", "eval_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(
                    f"train.{name}={getattr(self, name)} is negative",
                    fix="use 0 (off) or a positive number of steps",
                )
        if self.steps is not None and self.steps < 1:
            raise ConfigError(
                f"train.steps={self.steps} must be >= 1", fix="use None to train for `epochs`"
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} is negative", fix="use 0+")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(
                f"train.zero_stage={self.zero_stage} is not 0-3", fix="use 0, 1, 2 or 3"
            )
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(
                f"train.heldout_fraction={self.heldout_fraction} is not in [0, 1)",
                fix="use 0.05, or 0 with no held-out evaluation",
            )
        if not 0.0 < self.ttt_decay <= 1.0:
            raise ConfigError(
                f"train.ttt_decay={self.ttt_decay} is not in (0, 1]", fix="use 0.8 (default)"
            )
        if self.feature_noise is not None and (
            isinstance(self.feature_noise, bool)
            or not isinstance(self.feature_noise, int | float)
            or not math.isfinite(self.feature_noise)
            or self.feature_noise < 0
        ):
            raise ConfigError(
                f"train.feature_noise={self.feature_noise!r} is not a finite number >= 0",
                fix=f"use None (the reference's: {REFERENCE_FEATURE_NOISE}), 0 (off) or e.g. 0.2",
            )
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ConfigError(
                f"train.max_tokens={self.max_tokens!r} is not an integer >= 1",
                fix="use None (batch_size samples per micro batch) or a token budget such as "
                "16384 (micro batch samples x its longest sample)",
            )
        if self.max_tokens is not None and self.batch_size == 1:
            raise ConfigError(
                f"train.max_tokens={self.max_tokens} has no effect with batch_size=1 (every "
                "micro batch is one sample already)",
                fix="set batch_size to the most samples a micro batch may hold (e.g. 16), or "
                "drop max_tokens",
            )
        if self.deepspeed_config is not None and not os.path.isfile(self.deepspeed_config):
            raise ConfigError(
                f"train.deepspeed_config={self.deepspeed_config!r} is not a file",
                fix="pass the path of a DeepSpeed JSON config, or None",
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("data", "heldout", "betas", "aux_layer_ids"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"train config has unknown fields {unknown}",
                fix=f"use fields of TrainConfig: {sorted(names)}",
            )
        return cls(**d)

    def key_params(self) -> dict[str, Any]:
        """What the key hashes: computing fields, and the DeepSpeed JSON's content (not path)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _OPERATIONAL_FIELDS}
        for k in ("data", "heldout", "vocab_map"):
            d.pop(k)  # artifact inputs: hashed by key through `inputs`, not by URL
        if self.deepspeed_config:
            d["deepspeed_config"] = load_user_deepspeed_config(self.deepspeed_config)
        # the noise the run uses: None and the kind's reference value train the same, and a
        # noiseless run keeps the key it had before this field existed
        d.pop("feature_noise")
        if self.noise_scale():
            d["feature_noise"] = self.noise_scale()
        if self.max_tokens is None:  # runs without a token budget keep their keys
            d.pop("max_tokens")
        if self.ttt_alignment == "reference":
            # 2: the reference trainers' forward (RoPE t+k, causal) and B·T averaging; runs
            # of the old shifted-mask "reference" retrain, aligned runs keep their keys
            d["ttt_reference_version"] = 2
        return d

    def noise_scale(self) -> float:
        """The feature noise this run uses (`feature_noise`, or the kind's reference value)."""
        if self.feature_noise is None:
            return REFERENCE_FEATURE_NOISE[self.kind]
        return float(self.feature_noise)

    def ttt(self) -> Any:
        from eagle_core.loss import TTTConfig

        return TTTConfig(steps=self.ttt_steps, decay=self.ttt_decay, alignment=self.ttt_alignment)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"train.{name}={value!r} is not one of {list(allowed)}",
            fix=f"use one of {list(allowed)}",
        )


# ---------------------------------------------------------------------------------------
# DeepSpeed config: ours, merged with the user's JSON, validated before any process starts
# ---------------------------------------------------------------------------------------
def load_user_deepspeed_config(path: str) -> dict[str, Any]:
    """Parse a user DeepSpeed JSON; ConfigError with line/column on a syntax error."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read DeepSpeed config {path}: {exc}",
            fix="pass an existing, readable JSON file",
        ) from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}",
            fix="fix the JSON syntax (no comments or trailing commas)",
        ) from exc
    if not isinstance(doc, dict):
        raise ConfigError(
            f"DeepSpeed config {path} is a {type(doc).__name__}, not an object",
            fix="the file must hold one JSON object",
        )
    return doc


class _KeyRecorder(dict):
    """A dict that records which keys DeepSpeedConfig looks at (to find unknown keys)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()

    def __getitem__(self, k: Any) -> Any:
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k: Any, default: Any = None) -> Any:
        self.seen.add(k)
        return super().get(k, default)

    def __contains__(self, k: Any) -> bool:
        self.seen.add(k)
        return super().__contains__(k)

    def keys(self):  # type: ignore[override]
        outer = self

        class _Keys(set):
            def __contains__(self, k: Any) -> bool:
                outer.seen.add(k)
                return set.__contains__(self, k)

        return _Keys(super().keys())


def validate_deepspeed_config(conf: dict[str, Any], source: str = "DeepSpeed config") -> None:
    """Parse `conf` with DeepSpeed's own DeepSpeedConfig; unknown keys -> ConfigError.

    Unknown top-level keys are those DeepSpeedConfig never looks at; unknown keys inside
    sections (zero_optimization, bf16, ...) are rejected by DeepSpeed's pydantic models.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    rec = _KeyRecorder(copy.deepcopy(conf))
    try:
        DeepSpeedConfig(rec)
    except Exception as exc:  # DeepSpeed raises ValidationError/AssertionError/ValueError
        msg = " ".join(str(exc).split())
        raise ConfigError(
            f"{source} is rejected by DeepSpeed: {msg[:500]}",
            fix="correct the named key (see deepspeed.ai/docs/config-json)",
        ) from exc
    unknown = sorted(k for k in conf if k not in rec.seen)
    if unknown:
        raise ConfigError(
            f"{source} has unknown keys {unknown}",
            fix="remove or correct them (see deepspeed.ai/docs/config-json)",
        )


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: the user's JSON (if any) + what the train config decides.

    Keys the train config owns (batch sizes, clipping, ZeRO stage, precision) may appear in
    the JSON only with the same value (or "auto"); anything else is a ConfigError naming both.
    The optimizer is torch's AdamW (`torch_adam`), so DeepSpeed does not JIT-compile its fused
    CPU Adam (~70 s); a user "optimizer" or "scheduler" section replaces ours.
    """
    src = cfg.deepspeed_config or "train config"
    conf = load_user_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else {}
    owned = {
        "train_micro_batch_size_per_gpu": ("batch_size", cfg.batch_size),
        "gradient_accumulation_steps": ("grad_accum", cfg.grad_accum),
        "gradient_clipping": ("grad_clip", cfg.grad_clip),
    }
    for key, (fname, value) in owned.items():
        if key in conf and conf[key] != "auto" and conf[key] != value:
            raise ConfigError(
                f"DeepSpeed config {src}: {key}={conf[key]!r} conflicts with train.{fname}={value}",
                fix=f'remove {key} from the JSON (or set it to "auto"), or set train.{fname}',
            )
        conf[key] = value
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    tbs = conf.pop("train_batch_size", None)
    if tbs not in (None, "auto") and tbs != global_batch:
        raise ConfigError(
            f"DeepSpeed config {src}: train_batch_size={tbs} != batch_size {cfg.batch_size} x "
            f"grad_accum {cfg.grad_accum} x {world_size} processes = {global_batch}",
            fix="remove train_batch_size from the JSON; set train.batch_size / grad_accum",
        )
    if isinstance(conf.get("fp16"), dict) and conf["fp16"].get("enabled"):
        raise ConfigError(
            f"DeepSpeed config {src}: fp16 is enabled",
            fix="use train.precision='bf16' (fp16 loss scaling is not supported)",
        )
    bf16 = dict(conf.get("bf16") or {})
    want_bf16 = cfg.precision == "bf16"
    if "enabled" in bf16 and bf16["enabled"] not in ("auto", want_bf16):
        raise ConfigError(
            f"DeepSpeed config {src}: bf16.enabled={bf16['enabled']} conflicts with "
            f"train.precision={cfg.precision!r}",
            fix="drop bf16.enabled from the JSON and set train.precision",
        )
    bf16["enabled"] = want_bf16
    conf["bf16"] = bf16
    zero = dict(conf.get("zero_optimization") or {})
    if "stage" in zero and zero["stage"] != cfg.zero_stage:
        raise ConfigError(
            f"DeepSpeed config {src}: zero_optimization.stage={zero['stage']} conflicts with "
            f"train.zero_stage={cfg.zero_stage}",
            fix="drop the stage from the JSON and set train.zero_stage",
        )
    zero["stage"] = cfg.zero_stage
    conf["zero_optimization"] = zero
    if "optimizer" not in conf:
        conf["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        }
    elif str(conf["optimizer"].get("type", "")).lower() in ("adam", "adamw"):
        conf["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    conf.setdefault("steps_per_print", 10**9)  # we log ourselves (metrics.jsonl, tqdm)
    conf.setdefault("wall_clock_breakdown", False)
    validate_deepspeed_config(conf, f"DeepSpeed config {src}")
    return conf


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base lr at optimizer step s: linear warmup, then cosine (or flat)."""
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = int(cfg.warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never exactly 0: step 0 already learns a bit
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


# ---------------------------------------------------------------------------------------
# keys, inputs, run directory
# ---------------------------------------------------------------------------------------
@dataclass
class TrainInputs:
    data: list[StageRef]
    heldout: list[StageRef]
    vocab_map: StageRef | None

    def all(self) -> list[StageRef]:
        return [*self.data, *self.heldout, *([self.vocab_map] if self.vocab_map else [])]


def _resolve_ref(url: str, what: str) -> StageRef:
    """The StageRef of an artifact URL (its own store: inputs may live under another root)."""
    src, stage, key = ArtifactStore.for_url(url)
    if not src.is_done(stage, key):
        raise ConfigError(
            f"{what} {url} has no manifest (not built, or still running)",
            fix=f"run the stage that makes it first ({stage})",
        )
    return src.ref(stage, key)


def resolve_inputs(store: ArtifactStore, cfg: TrainConfig) -> TrainInputs:
    """StageRefs of the data, held-out and vocab-map artifacts (ConfigError if unfinished)."""
    return TrainInputs(
        data=[_resolve_ref(u, "train.data artifact") for u in cfg.data],
        heldout=[_resolve_ref(u, "train.heldout artifact") for u in cfg.heldout],
        vocab_map=_resolve_ref(cfg.vocab_map, "train.vocab_map") if cfg.vocab_map else None,
    )


def train_key(store: ArtifactStore, cfg: TrainConfig, inputs: TrainInputs | None = None) -> str:
    """Parameters, input artifacts, code, and the target's fingerprint: both modes read the
    target (online: in every step; offline: its lm_head and embeddings), so a target updated
    in place retrains."""
    from storage.fingerprint import model_fingerprint

    inputs = inputs or resolve_inputs(store, cfg)
    return store.key(
        STAGE,
        cfg.key_params(),
        inputs=inputs.all(),
        code=CODE_VERSION,
        fingerprints={"target": model_fingerprint(cfg.target)},
    )


def run_directory(store: ArtifactStore, key: str) -> str:
    """The local working directory of a run (see eagle_core/checkpoint.py for why)."""
    if store.is_local:
        return store.path(STAGE, key)
    root_id = hashlib.sha256(store.root.encode()).hexdigest()[:8]  # one staging dir per root
    staging = os.environ.get("EAGLE_TRAIN_STAGING") or os.path.join(
        tempfile.gettempdir(), "eagle-train"
    )
    return os.path.join(staging, f"{root_id}-{key}")


# ---------------------------------------------------------------------------------------
# distributed set-up
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); makes a 1-rank group when no launcher set one up.

    gloo on CPU, nccl on GPUs. Launchers (deepspeed, torchrun) set RANK / WORLD_SIZE /
    MASTER_ADDR / MASTER_PORT / LOCAL_RANK; alone, the process is rank 0 of 1.
    """
    import deepspeed

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            deepspeed.init_distributed(dist_backend=backend)  # env:// from the launcher
        else:
            # alone: a private 1-rank group on a free port. The environment is left as it is,
            # so processes started from this one do not inherit a rank or a busy port.
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
class DraftTrainModule(nn.Module):
    """What DeepSpeed wraps: the draft plus the frozen target head.

    forward returns the LossOutput's fields as a dict: ZeRO-3 finds the loss tensor inside a
    dict (not inside an unknown class) and hooks its backward. The head [V, H] is a plain
    attribute, not a parameter or buffer: DeepSpeed must neither optimise nor checkpoint nor
    cast it (the target distribution stays in the target's dtype).
    """

    def __init__(self, draft: nn.Module, target_head: Tensor, ttt: Any) -> None:
        super().__init__()
        self.draft = draft
        self.target_head = target_head
        self.ttt = ttt

    def forward(self, batch: Any) -> dict[str, Any]:
        from eagle_core.loss import compute_loss

        out = compute_loss(self.draft, batch, self.target_head, self.ttt)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}


def _loss_output(d: dict[str, Any]) -> Any:
    from eagle_core.loss import LossOutput

    return LossOutput(**d)


def _store_of(ref: StageRef) -> ArtifactStore:
    """The store an input artifact lives in (it may be another root than the run's)."""
    return ArtifactStore.for_url(ref.url)[0]


def _load_vocab_map(store: ArtifactStore, ref: StageRef) -> Any:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tensors = load_file(store.local_copy(ref, "vocab_map.safetensors", tmp))
    if "d2t" not in tensors or "t2d" not in tensors:
        raise ModelMismatchError(
            f"{ref.url}/vocab_map.safetensors lacks d2t or t2d", fix="re-run scan_vocab"
        )
    return SimpleNamespace(d2t=tensors["d2t"].long(), t2d=tensors["t2d"].bool())


@dataclass
class _Setup:
    draft: nn.Module
    draft_config: Any
    head: Tensor
    target: nn.Module | None  # kept in online mode only
    target_hash: str
    layer_ids: tuple[int, ...] | None


def build_models(
    store: ArtifactStore, cfg: TrainConfig, inputs: TrainInputs, device: torch.device
) -> _Setup:
    """Load the target, check it against the data, build the draft (seeded)."""
    from eagle_core.capture import default_aux_layer_ids, target_head_weight
    from eagle_core.draft import DraftConfig, build_draft
    from eagle_core.models import check_same_target, config_hash, load_target

    target = load_target(cfg.target, dtype=cfg.target_dtype, device=str(device))
    target_hash = config_hash(target)
    n_layers = int(target.config.get_text_config().num_hidden_layers)
    layer_ids = cfg.aux_layer_ids
    for ref in inputs.data + inputs.heldout:
        meta = _store_of(ref).manifest(ref.stage, ref.key).meta if cfg.mode == "offline" else {}
        if meta.get("target_config_hash"):
            check_same_target(meta["target_config_hash"], target, f"hidden shards {ref.url}")
        shard_ids = meta.get("aux_layer_ids")
        if shard_ids is not None and cfg.kind == "eagle3":
            shard_ids = tuple(int(i) for i in shard_ids)
            if layer_ids is None:
                layer_ids = shard_ids
            elif tuple(layer_ids) != shard_ids:
                raise ModelMismatchError(
                    f"hidden shards {ref.url} hold layers {list(shard_ids)}, "
                    f"train.aux_layer_ids={list(layer_ids)}",
                    fix="drop train.aux_layer_ids (the shards' are used) or re-extract",
                )
    if cfg.kind == "eagle3" and layer_ids is None:
        layer_ids = default_aux_layer_ids(n_layers)
    vocab_map = (
        _load_vocab_map(_store_of(inputs.vocab_map), inputs.vocab_map) if inputs.vocab_map else None
    )
    vd = cfg.draft_vocab_size
    if vocab_map is not None:
        if vd is not None and vd != vocab_map.d2t.numel():
            raise ModelMismatchError(
                f"train.draft_vocab_size={vd} but the vocab map {inputs.vocab_map.url} has "
                f"{vocab_map.d2t.numel()} tokens",
                fix="drop train.draft_vocab_size (the map's size is used)",
            )
        vd = vocab_map.d2t.numel()
    draft_cfg = DraftConfig.from_target_config(
        target.config,
        kind=cfg.kind,
        draft_vocab_size=vd,
        aux_layer_ids=layer_ids if cfg.kind == "eagle3" else None,
        **cfg.draft_overrides,
    )
    torch.manual_seed(cfg.seed)  # the draft's initial weights depend on the seed only
    draft = build_draft(draft_cfg, target_model=target, vocab_map=vocab_map).to(device)
    head = target_head_weight(target).detach().clone()  # [V, H]
    keep = cfg.mode == "online"
    return _Setup(
        draft=draft,
        draft_config=draft_cfg,
        head=head,
        target=target if keep else None,
        target_hash=target_hash,
        layer_ids=tuple(layer_ids) if layer_ids else None,
    )


def to_draft_batch(
    batch: CollatedBatch, setup: _Setup, cfg: TrainConfig, device: torch.device, dtype: torch.dtype
) -> Any:
    """CollatedBatch -> DraftBatch on `device`; online mode runs the target here (no grad)."""
    from eagle_core.capture import capture_states
    from eagle_core.loss import DraftBatch

    nb = device.type == "cuda"  # the prefetcher pins batches for CUDA: copies run async
    input_ids = batch.input_ids.to(device, non_blocking=nb)
    attention = batch.attention_mask.to(device, non_blocking=nb)
    if batch.last_hidden is not None:
        aux, last = batch.aux_hidden, batch.last_hidden
    else:
        if setup.target is None:
            raise TrainingError("online step without a target", fix="internal: report it")
        states = capture_states(setup.target, input_ids, attention, layer_ids=setup.layer_ids)
        aux, last = states.aux, states.last
        if cfg.online_bf16_states:  # the values extract_hidden would have stored
            aux, last = aux.to(torch.bfloat16), last.to(torch.bfloat16)
    return DraftBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=batch.loss_mask.to(device, non_blocking=nb),
        last_hidden=last.to(device=device, dtype=dtype, non_blocking=nb),
        aux_hidden=aux.to(device=device, dtype=dtype, non_blocking=nb)
        if cfg.kind == "eagle3"
        else None,
    )


def _noise_seed(seed: int, epoch: int, sample_id: str) -> int:
    """The noise generator seed of one sample in one epoch (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniform_feature_noise(
    lengths: list[int], shape: tuple[int, int, int], scale: float, seeds: list[int], device: Any
) -> Tensor:
    """The reference EAGLE-1 trainer's uniform feature noise, one sample at a time.

    SafeAILab/EAGLE eagle/train/main.py, `AddUniformNoise.__call__`, on one sample's
    [1, len, H] hidden states: `(torch.rand_like(tensor) - 0.5) * std * 512 / tensor.shape[1]`.
    So for sample b, t < len_b: noise[b, t, :] = (u - 0.5) * scale * 512 / len_b with
    u ~ U[0, 1): uniform in [-scale * 256 / len_b, scale * 256 / len_b), wider on short
    samples. Padding (t >= len_b) gets 0.

    Args:
        lengths: [B] each sample's token count (its attention_mask sum).
        shape: (B, T, W) of the features; W = H (EAGLE-1) or A*H (EAGLE-3 aux states).
        scale: the reference's `std` (TrainConfig.feature_noise).
        seeds: [B] one generator seed per sample (the same noise wherever it is drawn).
        device: where the noise is drawn.

    Returns:
        [B, T, W] float32 noise.
    """
    b, t, w = shape
    noise = torch.zeros(shape, dtype=torch.float32, device=device)
    for i in range(b):
        n = int(lengths[i])
        if n <= 0:
            continue
        gen = torch.Generator(device=device).manual_seed(int(seeds[i]))
        u = torch.rand((n, w), generator=gen, device=device, dtype=torch.float32)
        noise[i, :n] = (u - 0.5) * (scale * 512.0 / n)
    return noise


def add_feature_noise(
    batch: Any, sample_ids: list[str], scale: float, *, seed: int, epoch: int
) -> Any:
    """A training batch whose draft INPUT features carry uniform noise (uniform_feature_noise).

    EAGLE-1: the draft is fed `input_last_hidden` = last_hidden + noise, while the target
    distribution and the feature-regression targets keep the clean last_hidden (as in the
    reference, which takes its targets before adding the noise). EAGLE-3: aux_hidden, which
    only feeds the draft's fc, gets the noise. Held-out evaluation never calls this. The noise
    of a sample depends on (seed, epoch, sample id) only: not on the batch, rank or a resume.

    Args:
        batch: a DraftBatch (eagle_core/loss.py) from to_draft_batch.
        sample_ids: [B] the batch's sample ids.
        scale: TrainConfig.noise_scale(); 0 returns `batch` unchanged.
        seed: the run's seed.
        epoch: the epoch the batch belongs to.
    """
    if scale == 0:
        return batch
    eagle3 = batch.aux_hidden is not None
    feats = batch.aux_hidden if eagle3 else batch.last_hidden  # [B, T, W]
    noise = uniform_feature_noise(
        batch.attention_mask.sum(dim=1).tolist(),
        tuple(feats.shape),
        scale,
        [_noise_seed(seed, epoch, sid) for sid in sample_ids],
        feats.device,
    )
    noisy = (feats.float() + noise).to(feats.dtype)
    if eagle3:
        return dataclasses.replace(batch, aux_hidden=noisy)
    return dataclasses.replace(batch, input_last_hidden=noisy)


def _final_state_dict(engine: Any, draft: nn.Module, zero_stage: int) -> dict[str, Tensor]:
    """The draft's full state_dict in fp32 (bool/int buffers keep their dtype); all ranks call."""
    params = list(draft.parameters())
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        sd = draft.state_dict()
        return {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in sd.items()
        }


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
@dataclass
class _StepStats:
    loss_sum: float = 0.0
    micro: int = 0
    tokens: int = 0
    samples: int = 0
    hits: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    cond_hits: list[float] = field(default_factory=list)  # serving-faithful chains (loss.py)
    cond_roots: list[float] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)

    def add(self, out: Any, batch: CollatedBatch, loss: float | None = None) -> None:
        """Count one micro batch; `loss` is out.loss as a float when the caller has it."""
        k = len(out.step_acc)
        if not self.hits:
            self.hits, self.counts = [0.0] * k, [0.0] * k
        self.loss_sum += float(out.loss.detach()) if loss is None else loss
        self.micro += 1
        self.tokens += batch.num_tokens
        self.samples += len(batch.sample_ids)
        self.sample_ids.extend(batch.sample_ids)
        for i in range(k):
            self.hits[i] += out.step_acc[i] * out.step_count[i]
            self.counts[i] += out.step_count[i]
        if out.step_cond_roots:
            if not self.cond_roots:
                self.cond_hits, self.cond_roots = [0.0] * k, [0.0] * k
            for i in range(k):
                self.cond_hits[i] += out.step_cond_hits[i]
                self.cond_roots[i] += out.step_cond_roots[i]

    def reduce(self, device: torch.device, ttt_steps: int) -> dict[str, Any]:
        n = ttt_steps
        hits = self.hits or [0.0] * n
        counts = self.counts or [0.0] * n
        cond_hits = self.cond_hits or [0.0] * n
        cond_roots = self.cond_roots or [0.0] * n
        vals = _all_reduce_sum(
            [self.loss_sum, self.micro, self.tokens, self.samples, *hits, *counts]
            + [*cond_hits, *cond_roots],
            device,
        )
        loss_sum, micro, tokens, samples = vals[:4]
        h, c = vals[4 : 4 + n], vals[4 + n : 4 + 2 * n]
        ch, cr = vals[4 + 2 * n : 4 + 3 * n], vals[4 + 3 * n :]
        return {
            "loss": loss_sum / max(micro, 1.0),
            "tokens": int(tokens),
            "samples": int(samples),
            "step_acc": [hi / ci if ci else 0.0 for hi, ci in zip(h, c, strict=True)],
            "step_count": [int(ci) for ci in c],
            # None: no chain reached that step (the rate is unknown, not 0)
            "step_cond_acc": [hi / ri if ri else None for hi, ri in zip(ch, cr, strict=True)],
            "step_cond_roots": [int(ri) for ri in cr],
        }


def _grad_norm(engine: Any) -> float | None:
    """The global gradient norm DeepSpeed reports for the last optimizer step (before
    clipping): ZeRO 1-3 and bf16 report it; fp32 ZeRO 0 (torch AdamW, no wrapper) does not."""
    gn = engine.get_global_grad_norm()
    if gn is None:
        return None
    return float(gn.item() if isinstance(gn, Tensor) else gn)


def _param_grad_norm(engine: Any) -> float | None:
    """Global grad norm from the parameters' .grad, before engine.step() clips them (fp32
    ZeRO 0 keeps them there, and DeepSpeed reports no norm then). None when grads live
    elsewhere (ZeRO 1-3 partitions)."""
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    if not grads or engine.zero_optimization_stage() != 0:
        return None
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))


class PeerFailure(TrainingError):
    """This rank stops because another rank failed (the launcher reports the other one)."""


def _check_finite(out: Any, batch: CollatedBatch, step: int, device: torch.device) -> float:
    """Stop every rank when any rank's loss is NaN/inf; the raising rank names its samples.

    Returns the loss as a float: the one device-to-host read of it per micro batch."""
    loss = float(out.loss.detach())
    bad_here = not math.isfinite(loss)
    bad = _all_reduce_sum([1.0 if bad_here else 0.0], device)[0]
    if bad_here:
        raise TrainingError(
            f"non-finite loss {loss} at step {step + 1} on the batch of samples {batch.sample_ids}",
            fix="inspect those samples (their hidden states may hold NaN/inf), lower train.lr, "
            "or use precision='fp32'; the last complete checkpoint is kept and a rerun "
            "resumes from it",
        )
    if bad:
        raise PeerFailure(
            f"non-finite loss at step {step + 1} on another rank",
            fix="see that rank's error for the samples; the last complete checkpoint is kept",
        )


def _evaluate(
    engine: Any,
    data: ShardDataset,
    setup: _Setup,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Held-out loss and per-TTT-step accuracy (length-sorted batches; every rank runs the same
    number of forwards, so ZeRO-3 gathers stay in step)."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    per_rank = math.ceil(len(batches) / world)
    stats = _StepStats()
    engine.eval()
    with torch.no_grad():
        for j in range(per_rank):
            idx = j * world + rank
            real = idx < len(batches)
            mb = collate([data[i] for i in batches[min(idx, len(batches) - 1)]], dtype)
            out = _loss_output(engine(to_draft_batch(mb, setup, cfg, device, dtype)))
            if real:
                stats.add(out, mb)
    engine.train()
    res = stats.reduce(device, cfg.ttt_steps)
    return {
        "loss": res["loss"],
        "step_acc": res["step_acc"],
        # serving-faithful conditional acceptance per step (eagle_core/loss.py) and the
        # number of chains it was measured on
        "step_cond_acc": res["step_cond_acc"],
        "step_cond_roots": res["step_cond_roots"],
        "tokens": res["tokens"],
        "samples": res["samples"],
    }


def train_main(
    cfg: TrainConfig,
    *,
    force: bool = False,
    stop_after_step: int | None = None,
    step_delay_s: float = 0.0,
) -> StageRef | None:
    """Train (or resume) the run of `cfg` in this process, one rank of a DeepSpeed job.

    Args:
        cfg: the run's config.
        force: ignore a finished artifact and existing checkpoints; train from scratch.
        stop_after_step: debug: exit after saving a checkpoint at this step (simulates a
            crash; a rerun resumes from it). Returns None then.
        step_delay_s: debug: sleep after each step (gives kill tests time to act).

    Returns:
        The published train artifact (all ranks), or None when stopped early.
    """
    import deepspeed

    store = ArtifactStore(cfg.store)
    inputs = resolve_inputs(store, cfg)
    key = train_key(store, cfg, inputs)
    if store.is_done(STAGE, key) and not force:  # every rank sees it: all return at once
        log.info("train %s: cached", key)
        return store.ref(STAGE, key)
    rank, world, local_rank = init_distributed()
    device = _device(local_rank)
    ds_config = build_deepspeed_config(cfg, world)
    run_dir = run_directory(store, key)
    if rank == 0:
        if force:
            shutil.rmtree(os.path.join(run_dir, ckpt.CHECKPOINTS), ignore_errors=True)
        os.makedirs(run_dir, exist_ok=True)
        if not store.is_local and not force:
            ckpt.download_latest_checkpoint(store, STAGE, key, run_dir)
    ckpt._barrier()
    log.info("train %s: %s %s, %d process(es), run dir %s", key, cfg.kind, cfg.mode, world, run_dir)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    setup = build_models(store, cfg, inputs, device)
    offline = cfg.mode == "offline"
    heldout_fraction = 0.0 if inputs.heldout else cfg.heldout_fraction
    train_data = ShardDataset(
        None,
        inputs.data,
        hidden=offline,
        split="train",
        heldout_fraction=heldout_fraction,
        seed=cfg.seed,
    )
    heldout_data = None
    if inputs.heldout:
        heldout_data = ShardDataset(None, inputs.heldout, hidden=offline)
    elif heldout_fraction > 0:
        with contextlib.suppress(DataError):  # a tiny data set may have no held-out sample
            heldout_data = ShardDataset(
                None,
                inputs.data,
                hidden=offline,
                split="heldout",
                heldout_fraction=heldout_fraction,
                seed=cfg.seed,
            )
    if heldout_data is None:
        log.warning("train %s: no held-out samples: evaluation is off", key)
    if offline:
        _check_hidden_widths(train_data, setup)

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    noise = cfg.noise_scale()  # training forwards only, never held-out evaluation
    setup.head = setup.head.to(device)
    module = DraftTrainModule(setup.draft, setup.head, cfg.ttt())
    plan0 = _plan(train_data, cfg, 0, world)
    steps_per_epoch = len(plan0) // (world * cfg.grad_accum)
    total_steps = cfg.steps or _epoch_steps_total(train_data, cfg, world, plan0)
    if cfg.max_tokens is not None:
        over = count_over_budget(plan0, train_data.lengths, cfg.max_tokens)
        log.log(
            logging.WARNING if over else logging.INFO,
            "train %s: max_tokens=%d: %d micro batches in epoch 0 (%d of them one sample "
            "longer than max_tokens)",
            key,
            cfg.max_tokens,
            len(plan0),
            over,
        )
    scheduler = None
    if "scheduler" not in ds_config:
        fn = lr_lambda(cfg, total_steps)

        def scheduler(opt: Any) -> Any:
            return torch.optim.lr_scheduler.LambdaLR(opt, fn)

    engine, _opt, _, _sched = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=scheduler,
    )

    if world == 1 and not engine.zero_optimization():
        # one process: DeepSpeed's gradient all-reduce (flatten every gradient into a buffer,
        # all-reduce it over the 1-rank group, copy it back) changes nothing; skip it
        engine.enable_backward_allreduce = False
    # the logged grad norm: DeepSpeed's own (get_global_grad_norm) where it reports one, else
    # computed here from the gradients before engine.step(); it is known after the first step
    # which of the two this run has
    own_norm_needed = True

    state = ckpt.TrainerState(world_size=world)
    latest = None if force else ckpt.find_latest_complete(run_dir)
    if latest is not None:
        state = ckpt.load_checkpoint(engine, latest)
        state.world_size = world
    metrics = None
    if rank == 0:
        metrics = MetricsLogger(
            os.path.join(run_dir, METRICS_FILE),
            resume_step=state.step if latest else None,
            tensorboard_dir=os.path.join(run_dir, "tensorboard") if cfg.tensorboard else None,
            wandb_project=cfg.wandb_project,
            run_name=f"train-{key}",
        )
    log.info(
        "train %s: %d train samples, %d steps/epoch, %d steps (starting at %d), feature noise %g",
        key,
        len(train_data),
        steps_per_epoch,
        total_steps,
        state.step,
        noise,
    )

    bar = None
    if rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=None,
            dynamic_ncols=True,
        )
    last_eval: dict[str, Any] | None = None
    last_saved = state.step if latest else -1
    batches: BatchPrefetcher | None = None
    try:
        if heldout_data is not None and cfg.eval_every and state.step == 0:
            # the untrained draft's numbers: the baseline the curves start from
            first = _evaluate(engine, heldout_data, setup, cfg, device, dtype, rank, world)
            if metrics is not None:
                metrics.log({"kind": "eval", "step": 0, **first})
        while state.step < total_steps:
            plan = plan0 if state.epoch == 0 else _plan(train_data, cfg, state.epoch, world)
            per_step = world * cfg.grad_accum
            n_steps = len(plan) // per_step
            s_first = state.micro_offset // per_step
            s_end = min(n_steps, s_first + total_steps - state.step)  # steps run this epoch
            if batches is not None:
                batches.close()
            # this rank's micro batches, read and collated one ahead while the step trains
            batches = BatchPrefetcher(
                train_data,
                [
                    plan[micro_batch_index(s, a, rank, world, cfg.grad_accum)]
                    for s in range(s_first, s_end)
                    for a in range(cfg.grad_accum)
                ],
                dtype,
                depth=1,
                pin_memory=device.type == "cuda",
            )
            for s in range(s_first, n_steps):
                if state.step >= total_steps:
                    break
                t0 = time.perf_counter()
                stats = _StepStats()
                own_norm = None
                for a in range(cfg.grad_accum):
                    mb = next(batches)
                    batch = to_draft_batch(mb, setup, cfg, device, dtype)
                    batch = add_feature_noise(
                        batch, mb.sample_ids, noise, seed=cfg.seed, epoch=state.epoch
                    )
                    out = _loss_output(engine(batch))
                    loss = _check_finite(out, mb, state.step, device)
                    engine.backward(out.loss)
                    if a == cfg.grad_accum - 1 and own_norm_needed:
                        own_norm = _param_grad_norm(engine)  # grads are all-reduced by now
                    engine.step()
                    stats.add(out, mb, loss)
                grad_norm = _grad_norm(engine)
                if grad_norm is None:
                    grad_norm = own_norm
                else:
                    own_norm_needed = False
                if grad_norm is not None and not math.isfinite(grad_norm):
                    raise TrainingError(
                        f"non-finite gradient norm {grad_norm} at step {state.step + 1} "
                        f"(samples of this rank: {stats.sample_ids})",
                        fix="lower train.lr or use precision='fp32'; the last complete "
                        "checkpoint is kept and a rerun resumes from it",
                    )
                res = stats.reduce(device, cfg.ttt_steps)
                dt = time.perf_counter() - t0
                state.step += 1
                state.micro_offset = (s + 1) * per_step
                state.samples_seen += res["samples"]
                state.tokens_seen += res["tokens"]
                state.last_loss = res["loss"]
                lr = engine.get_lr()[0] if engine.get_lr() else cfg.lr
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{res['loss']:.3f}", tok_s=f"{res['tokens'] / dt:.0f}")
                if metrics is not None and (
                    state.step % cfg.log_every == 0 or state.step == total_steps
                ):
                    metrics.log(
                        {
                            "kind": "train",
                            "step": state.step,
                            "epoch": state.epoch,
                            "loss": res["loss"],
                            "lr": lr,
                            "step_acc": res["step_acc"],
                            "grad_norm": grad_norm,
                            "tokens_per_s": res["tokens"] / dt,
                            "tokens": res["tokens"],
                            "samples": res["samples"],
                        }
                    )
                if (
                    heldout_data is not None
                    and cfg.eval_every
                    and (state.step % cfg.eval_every == 0 and state.step != total_steps)
                ):
                    last_eval = _evaluate(
                        engine, heldout_data, setup, cfg, device, dtype, rank, world
                    )
                    if metrics is not None:
                        metrics.log({"kind": "eval", "step": state.step, **last_eval})
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    _save(engine, run_dir, state, cfg, store, key, rank)
                    last_saved = state.step
                    if stop_after_step is not None and state.step >= stop_after_step:
                        log.warning("train %s: stopping after step %d (debug)", key, state.step)
                        return None
                if step_delay_s:
                    time.sleep(step_delay_s)
            else:
                state.epoch += 1
                state.micro_offset = 0
        if heldout_data is not None:
            last_eval = _evaluate(engine, heldout_data, setup, cfg, device, dtype, rank, world)
            if metrics is not None:
                metrics.log({"kind": "eval", "step": state.step, **last_eval})
        if last_saved != state.step:
            _save(engine, run_dir, state, cfg, store, key, rank)
        sd = _final_state_dict(engine, setup.draft, cfg.zero_stage)
    finally:
        if batches is not None:
            batches.close()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()

    if rank == 0:
        _publish(
            store,
            key,
            cfg,
            inputs,
            run_dir,
            sd,
            setup,
            state,
            last_eval,
            world,
            len(train_data),
            len(heldout_data) if heldout_data else 0,
        )
        if not store.is_local:  # everything is in the store now: free the staging disk
            shutil.rmtree(run_dir, ignore_errors=True)
    ckpt._barrier()
    return store.ref(STAGE, key)


def _plan(data: ShardDataset, cfg: TrainConfig, epoch: int, world: int) -> list[list[int]]:
    return plan_epoch(
        data.blocks,
        data.lengths,
        epoch=epoch,
        seed=cfg.seed,
        micro_batch_size=cfg.batch_size,
        world_size=world,
        grad_accum=cfg.grad_accum,
        group_steps=cfg.group_steps,
        max_tokens=cfg.max_tokens,
    )


def _epoch_steps_total(
    data: ShardDataset, cfg: TrainConfig, world: int, plan0: list[list[int]]
) -> int:
    """Optimizer steps of `cfg.epochs` epochs: the sum of each epoch's own plan's steps (with
    a token budget plans differ in length between epochs; without, all equal epoch 0's)."""
    per_step = world * cfg.grad_accum
    if cfg.max_tokens is None:
        return cfg.epochs * (len(plan0) // per_step)
    return sum(
        len(plan0 if e == 0 else _plan(data, cfg, e, world)) // per_step for e in range(cfg.epochs)
    )


def _check_hidden_widths(data: ShardDataset, setup: _Setup) -> None:
    spec = data.hidden_spec()
    h = setup.draft_config.hidden_size
    want = {"last_hidden": (h,)}
    if setup.draft_config.kind == "eagle3":
        want["aux_hidden"] = (setup.draft_config.num_aux * h,)
    for col, shape in want.items():
        if spec.get(col) != shape:
            raise ModelMismatchError(
                f"hidden shards hold {col} of width {spec.get(col)}, the draft needs {shape}",
                fix="extract hidden states with the same target and layer ids",
            )


def _save(
    engine: Any,
    run_dir: str,
    state: ckpt.TrainerState,
    cfg: TrainConfig,
    store: ArtifactStore,
    key: str,
    rank: int,
) -> None:
    path = ckpt.save_checkpoint(engine, run_dir, state)
    if rank == 0:
        if not store.is_local:
            ckpt.upload_checkpoint(store, STAGE, key, path)
        if cfg.keep_checkpoints:
            ckpt.prune_checkpoints(run_dir, cfg.keep_checkpoints)
    ckpt._barrier()


def _publish(
    store: ArtifactStore,
    key: str,
    cfg: TrainConfig,
    inputs: TrainInputs,
    run_dir: str,
    sd: dict[str, Tensor],
    setup: _Setup,
    state: ckpt.TrainerState,
    last_eval: dict[str, Any] | None,
    world: int,
    n_train: int,
    n_heldout: int,
) -> None:
    """Write final weights, config, metrics and plots; list the kept checkpoints; manifest."""
    from safetensors.torch import save_file

    metrics_path = os.path.join(run_dir, METRICS_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot_metrics(metrics_path, tmp)
        with store.publish(STAGE, key, params=cfg.key_params(), inputs=inputs.all()) as w:
            w.write_file(FINAL_WEIGHTS, lambda p: save_file(sd, p, metadata={"format": "pt"}))
            w.write_json(FINAL_CONFIG, setup.draft_config.to_dict())
            w.write_file(METRICS_FILE, lambda p: shutil.copyfile(metrics_path, p))
            for path in plots:
                w.write_file(os.path.basename(path), lambda p, src=path: shutil.copyfile(src, p))
            for _step, path in ckpt.list_checkpoints(run_dir):
                if ckpt.is_complete(path):
                    w.add_dir(path, prefix=f"{ckpt.CHECKPOINTS}/{os.path.basename(path)}")
            train_records = [r for r in read_metrics(metrics_path) if r.get("kind") == "train"]
            w.counts.update(
                steps=state.step,
                epochs_done=state.epoch,
                samples_seen=state.samples_seen,
                tokens_seen=state.tokens_seen,
                train_samples=n_train,
                heldout_samples=n_heldout,
                final_loss=state.last_loss,
                final_step_acc=train_records[-1]["step_acc"] if train_records else None,
                heldout_loss=last_eval["loss"] if last_eval else None,
                heldout_step_acc=last_eval["step_acc"] if last_eval else None,
                heldout_step_cond_acc=last_eval["step_cond_acc"] if last_eval else None,
                heldout_step_cond_roots=last_eval["step_cond_roots"] if last_eval else None,
            )
            w.meta.update(
                kind=cfg.kind,
                mode=cfg.mode,
                target=cfg.target,
                target_config_hash=setup.target_hash,
                aux_layer_ids=list(setup.draft_config.aux_layer_ids),
                draft_vocab_size=setup.draft_config.draft_vocab_size,
                world_size=world,
                zero_stage=cfg.zero_stage,
                precision=cfg.precision,
            )
    log.info(
        "train %s: published %s (%d steps, final loss %s)",
        key,
        store.url(STAGE, key),
        state.step,
        state.last_loss,
    )


def run_training(store: ArtifactStore | None, cfg: TrainConfig, force: bool = False) -> StageRef:
    """Train in this process (1 rank, or the current distributed group); cached by key."""
    if store is not None and cfg.store != store.root:
        cfg = dataclasses.replace(cfg, store=store.root)
    ref = train_main(cfg, force=force)
    assert ref is not None  # only debug stops return None
    return ref


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
class _RankFormatter(logging.Formatter):
    """Prefixes EVERY line (tracebacks included) with `[rank N]`, so launch.py can tell ranks
    apart in the merged output."""

    def __init__(self, rank: int) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.prefix = f"[rank {rank}] "

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.prefix + line for line in super().format(record).splitlines())


def read_config(path: str) -> TrainConfig:
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read train config {path}: {exc}",
            fix="pass a JSON file written by eagle_core.launch",
        ) from exc
    return TrainConfig.from_dict(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eagle_core.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="TrainConfig JSON")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    parser.add_argument("--force", action="store_true", help="retrain from scratch")
    parser.add_argument(
        "--stop-after-step",
        type=int,
        default=None,
        help="debug: exit after the checkpoint at this step (simulated crash)",
    )
    parser.add_argument(
        "--step-delay-s", type=float, default=0.0, help="debug: sleep after each step"
    )
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(rank))
    root = logging.getLogger()
    if not root.handlers:  # a plain process (launcher child); leave an embedding app's alone
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    was_initialized = dist.is_initialized()
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = read_config(args.config)
        ref = train_main(
            cfg,
            force=args.force,
            stop_after_step=args.stop_after_step,
            step_delay_s=args.step_delay_s,
        )
    except PeerFailure:
        log.exception("FAILED (caused by another rank)")
        return 1
    except Exception:
        log.exception("FAILED")
        return 1
    finally:
        if dist.is_initialized() and not was_initialized:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    if ref is not None and rank == 0:
        sys.stdout.write(ref.url + "\n")  # the CLI contract: last stdout line = artifact URL
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
