"""Loading targets and tokenizers from a local dir, a Hub name or a demo-target artifact.

A target reference is a string, one of:

- a local directory holding an HF model (`config.json`) or tokenizer;
- an artifact URL `<root>/build_demo_target/<key>` (any fsspec root): the model is its
  `model/` sub-directory, the tokenizer its `tokenizer/`; or `<root>/import_target/<key>` (a
  GGUF file imported by eagle_core.import_target): model and tokenizer are its `model/`;
- a Hub name (`org/name`): passed to `from_pretrained` as is. Offline runs
  (`HF_HUB_OFFLINE=1`) load it from the local HF cache or fail with a clear error.

`trust_remote_code` is off unless a caller passes it explicitly: a model repo's own Python
code never runs by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Literal

import torch

from eagle_core.errors import ConfigError, ModelMismatchError
from storage import ArtifactStore
from storage.errors import ArtifactError

log = logging.getLogger(__name__)

DEMO_STAGE = "build_demo_target"
# `<root>/import_target/<key>`: a GGUF file imported as one HF dir, `model/` (its tokenizer
# files included: serving engines load a target from one directory)
IMPORT_STAGE = "import_target"
TARGET_STAGES = (DEMO_STAGE, IMPORT_STAGE)
Dtype = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Config fields that do not change what the model computes (bookkeeping, generation
# defaults, how it was saved): excluded from config_hash so a re-save keeps the hash.
_VOLATILE_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "architectures",
        "_experts_implementation",
    }
)
# Downloaded artifact dirs, one per URL per process (remote roots only).
_CACHE: dict[str, str] = {}


def is_artifact_url(ref: str) -> bool:
    """True for `<root>/build_demo_target/<key>` or `<root>/import_target/<key>` (with or
    without a trailing slash)."""
    parts = ref.rstrip("/").rsplit("/", 2)
    return len(parts) == 3 and parts[1] in TARGET_STAGES


def resolve_model_dir(ref_or_path: str, sub: str = "model") -> str:
    """Turn a target reference into something `from_pretrained` accepts.

    Args:
        ref_or_path: local dir, Hub name, or artifact URL `<root>/build_demo_target/<key>`.
        sub: the artifact's sub-directory to use ("model" or "tokenizer"); for a local dir
            that holds `<sub>/` (an artifact directory given as a path) it is used too.

    Returns:
        A local directory path, or the Hub name unchanged.

    Raises:
        ConfigError: empty reference, or a path that looks local but does not exist.
        ArtifactError: the artifact URL has no manifest (never built) or lacks `<sub>/`.
    """
    if not ref_or_path or not ref_or_path.strip():
        raise ConfigError(
            "target reference is empty",
            fix="pass a local model dir, a Hub name or a demo-target artifact URL",
        )
    ref = ref_or_path.strip()
    if is_artifact_url(ref):
        return _artifact_dir(ref, sub)
    local = os.path.expanduser(ref)
    if os.path.isdir(local):
        inner = os.path.join(local, sub)
        if not os.path.exists(os.path.join(local, "config.json")) and os.path.isdir(inner):
            return os.path.abspath(inner)
        return os.path.abspath(local)
    if ref.lower().endswith(".gguf"):
        raise ConfigError(
            f"target {ref!r} is a GGUF file; the stages load a HF model directory",
            fix="import it first (`eagle-pipeline import-target --gguf FILE`; the retrain "
            "flow does it for a .gguf target) and pass the artifact URL it prints",
        )
    if "://" not in ref and (ref.startswith(("/", ".", "~")) or ref.count("/") > 1):
        raise ConfigError(
            f"target {ref!r} looks like a local path but is not a directory",
            fix="check the path, or pass a Hub name such as org/model",
        )
    if "://" in ref:
        raise ConfigError(
            f"target {ref!r} is a URL but not a demo-target artifact (<root>/{DEMO_STAGE}/<key>)",
            fix="pass the artifact URL printed by build-demo-target, or a local directory",
        )
    return ref  # a Hub name: from_pretrained resolves it (the local cache when offline)


def _artifact_dir(url: str, sub: str) -> str:
    store, stage, key = ArtifactStore.for_url(url.rstrip("/"))
    if stage == IMPORT_STAGE:
        sub = "model"  # tokenizer files sit next to the weights
    if not store.is_done(stage, key):
        raise ArtifactError(
            f"demo target {url} has no manifest (never built or still building)",
            fix="run `eagle-pipeline build-demo-target --store <root>` first",
        )
    ref = store.ref(stage, key)
    if not store.list_files(ref, prefix=f"{sub}/"):
        raise ArtifactError(
            f"artifact {url} has no {sub}/ directory",
            fix=f"pass the URL of a {DEMO_STAGE} artifact",
        )
    if store.is_local:
        return os.path.join(store.local_dir(ref, ""), sub)
    cache_key = f"{url.rstrip('/')}#{sub}"
    cached = _CACHE.get(cache_key)
    if cached is None or not os.path.isdir(cached):
        tmp = tempfile.mkdtemp(prefix="eagle-target-")
        for name in store.list_files(ref, prefix=f"{sub}/"):
            store.local_copy(ref, name, tmp)
        cached = os.path.join(tmp, sub)
        _CACHE[cache_key] = cached
    return cached


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer for a target reference (its `tokenizer/` for demo artifacts)."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(name_or_path, sub="tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a tokenizer from {name_or_path!r} ({path}): {exc}",
            fix="pass a directory with tokenizer.json / tokenizer_config.json, a Hub name "
            "available offline, or a demo-target artifact URL",
        ) from exc


def load_target(
    name_or_path: str,
    dtype: Dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """AutoModelForCausalLM in eval mode with every parameter frozen (requires_grad False).

    Args:
        name_or_path: local dir, Hub name or demo-target artifact URL.
        dtype: weights dtype ("float32", "bfloat16", "float16").
        device: torch device string.
        trust_remote_code: run the repo's own modeling code (off unless asked for).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ConfigError(
            f"dtype={dtype!r} is not one of {sorted(_DTYPES)}",
            fix="use float32 (CPU) or bfloat16 (GPU)",
        )
    path = resolve_model_dir(name_or_path, sub="model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a causal LM from {name_or_path!r} ({path}): {exc}",
            fix="pass a directory with config.json + weights, a Hub name available offline, "
            "or a demo-target artifact URL; pass trust_remote_code only for repos you trust",
        ) from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded target %s (%s, %s)", name_or_path, dtype, device)
    return model


def _config_dict(model_or_config: Any) -> dict[str, Any]:
    """The full `to_dict()` of a config (defaults filled in), whatever form it came in."""
    from transformers import AutoConfig

    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, str):
        config = AutoConfig.from_pretrained(resolve_model_dir(config))
    elif isinstance(config, dict):
        # a raw config.json lacks the defaults to_dict() fills in: rebuild the config object
        fields = dict(config)
        if "model_type" not in fields:
            raise ModelMismatchError(
                "config dict has no model_type",
                fix="pass a model, its config, or its full config.json",
            )
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ModelMismatchError(
        f"config_hash got a {type(model_or_config).__name__}",
        fix="pass a model, its config, a config dict or a target reference",
    )


def config_hash(model_or_config: Any) -> str:
    """Stable hash of what a target computes (its architecture config), 20 hex chars.

    Equal for the same model loaded in another dtype, process, machine or transformers
    version; different when any architectural field (sizes, layers, rope, vocab) differs.
    Shards and drafts record it and refuse to mix with another target.
    """
    cfg = _config_dict(model_or_config)
    clean = {k: v for k, v in cfg.items() if k not in _VOLATILE_KEYS}
    blob = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_same_target(expected_hash: str, model_or_config: Any, what: str) -> None:
    """Raise ModelMismatchError if `model_or_config` is not the target `what` was made for."""
    got = config_hash(model_or_config)
    if got != expected_hash:
        raise ModelMismatchError(
            f"{what} was made for target config {expected_hash}, this target is {got}",
            fix="use the target it was made for, or re-run the stages for this target",
        )
