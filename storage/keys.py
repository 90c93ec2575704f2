"""Content keys: same stage parameters + same input artifacts + same code => same key.

The key is a hash of a canonical JSON rendering, so it is stable across processes, machines
and Python versions (no `hash()`, no pickle, no dict order).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

KEY_LENGTH = 20  # hex chars (80 bits): collisions are out of reach for any realistic store


def canonical(value: Any) -> Any:
    """A JSON-able value that is equal for equal parameters, whatever their Python type.

    An artifact reference (anything with `stage`, `key` and `url`, e.g. a StageRef) counts
    only by stage and key: where the store lives and the artifact's counts never change what
    a stage computes, so they must not change downstream keys.
    """
    if _is_ref(value):
        return {"stage": value.stage, "key": value.key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__name__, **fields}
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic model
        return {"__type__": type(value).__name__, **canonical(value.model_dump())}
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return repr(value)
        return value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    raise TypeError(
        f"cannot build a content key from a {type(value).__name__}: use plain values, "
        "dataclasses, pydantic models, lists or dicts"
    )


def _is_ref(value: Any) -> bool:
    return all(hasattr(value, a) for a in ("stage", "key", "url")) and not isinstance(value, type)


def content_key(
    stage: str,
    params: Any,
    inputs: Iterable[Any] = (),
    code: str = "1",
    fingerprints: Mapping[str, Any] | None = None,
) -> str:
    """Hash of the stage name, its parameters, the keys of its inputs and its code version
    (and the fingerprints of the external inputs it reads).

    Args:
        stage: stage name (part of the key: two stages with equal parameters differ).
        params: the stage's config (dataclass, pydantic model, dict, plain values).
        inputs: StageRefs of the artifacts read (their stage and key count, not their URL),
            or plain strings such as a model name.
        code: the stage's CODE_VERSION; bump it when the stage's output changes.
        fingerprints: digests of the external inputs the stage reads itself (source files,
            Hub commits, target weights: `storage.fingerprint.digests`); empty or None
            leaves the key as it was without them.

    Returns:
        KEY_LENGTH lowercase hex characters.
    """
    doc = {
        "stage": stage,
        "params": canonical(params),
        "inputs": [canonical(i) if not isinstance(i, str) else i for i in inputs],
        "code": code,
    }
    if fingerprints:
        doc["fingerprints"] = canonical(fingerprints)
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]
