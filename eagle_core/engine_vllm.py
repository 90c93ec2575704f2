"""`evaluate --engine vllm`: the acceptance measured by the engine users serve with.

vLLM runs as its own program in its own venv (`.ci/engine-venv vllm`; it pins its own
transformers), driven by `eagle_core/engines/vllm_driver.py` over JSON files. One driver
process starts two offline engines in turn (measured: vLLM 0.32 CPU frees one before the
next): the target alone (the greedy baseline) and the target with the exported EAGLE-3
draft (`speculative_config={"method": "eagle3", "num_speculative_tokens": steps}`). Both
decode every prompt alone, greedily, from the same token ids our evaluate uses.

The report has the shape of `eagle_core.evaluate.measure`'s, from vLLM's own counters:

- verify_forwards = `vllm:spec_decode_num_drafts` (one draft per request per engine step,
  each verified by one target forward), accepted_tokens = `num_accepted_tokens`, so
  τ = 1 + accepted / drafts, vLLM's "mean acceptance length". It is our τ (tokens per
  verify forward) except at the end of a generation: vLLM drafts and counts a full chain
  in the last step even when max_tokens or a stop token cuts it, our evaluate counts only
  the emitted proposals of a cut round. Long generations make the difference small.
- acc@k = `num_accepted_tokens_per_pos[k-1]` / drafts (same meaning as ours);
- lossless: speculative output == the engine's own greedy output, token for token;
- speedup = baseline wall time / speculative wall time (tokens per second ratio), of
  vLLM on this device; draft/target forward times are not exposed (None).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eagle_core.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

ENV_PYTHON = "EAGLE_PIPELINE_VLLM_PYTHON"
DRIVER = Path(__file__).resolve().parent / "engines" / "vllm_driver.py"
_REPO = Path(__file__).resolve().parents[1]
# engine start ~20-50 s each on 2 CPU cores, plus the prompts; a hung engine must not hang
# the stage forever
DRIVER_TIMEOUT_S = 3600


class EngineError(PipelineError):
    """The serving engine (a separate program) failed."""


def default_vllm_python() -> str | None:
    """The python of the venv `.ci/engine-venv vllm` builds, if it is built.

    Same location rule as that script: `$EAGLE_PIPELINE_ENGINES` (default
    ~/.cache/eagle-pipeline/engines) / `vllm-<sha256(pin files)[:12]>`.
    """
    req = _REPO / "deployments" / "engines" / "vllm.txt"
    if not req.is_file():
        return None  # an installed package without the repo's pin files
    blob = req.read_bytes()
    nodeps = req.with_name("vllm.nodeps.txt")
    if nodeps.is_file():
        blob += nodeps.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    root = os.environ.get("EAGLE_PIPELINE_ENGINES") or os.path.expanduser(
        "~/.cache/eagle-pipeline/engines"
    )
    venv = Path(root) / f"vllm-{digest}"
    if not (venv / ".installed").is_file():
        return None
    return str(venv / "bin" / "python")


def vllm_python(explicit: str = "") -> str:
    """Where vLLM's python is: `explicit` (--vllm-python), else $EAGLE_PIPELINE_VLLM_PYTHON,
    else the venv `.ci/engine-venv vllm` builds.

    Raises:
        ConfigError: none of them exists.
    """
    for source, path in (
        ("--vllm-python", explicit),
        (f"${ENV_PYTHON}", os.environ.get(ENV_PYTHON, "")),
    ):
        if path:
            if not os.access(path, os.X_OK):
                raise ConfigError(
                    f"evaluate: the vLLM python {path!r} ({source}) is not an executable",
                    fix="point it at the python of a venv with vllm installed, e.g. the one "
                    "`.ci/engine-venv vllm` prints",
                )
            return path
    found = default_vllm_python()
    if found is None:
        raise ConfigError(
            "evaluate.engine='vllm' but no vLLM venv is installed",
            fix="run `make engines` (or `.ci/engine-venv vllm`; ~2-5 min once), or pass "
            f"--vllm-python / set ${ENV_PYTHON} to a python that has vllm",
        )
    return found


def run_driver(python: str, request: dict[str, Any], timeout_s: float = DRIVER_TIMEOUT_S) -> dict:
    """Run vllm_driver.py with `python` on `request`; its RESULT document.

    Raises:
        EngineError: the driver failed or timed out (the message ends with its log tail).
    """
    with tempfile.TemporaryDirectory(prefix="eagle-vllm-") as tmp:
        req_path, res_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(req_path, "w") as fh:
            json.dump(request, fh)
        log_path = os.path.join(tmp, "driver.log")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # our packages must not shadow the engine venv's
        try:
            with open(log_path, "w") as log_fh:
                proc = subprocess.run(
                    [python, str(DRIVER), req_path, res_path],
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=timeout_s,
                    cwd=tmp,
                )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout_s:.0f} s"
        if rc != 0 or not os.path.exists(res_path):
            with open(log_path, errors="replace") as fh:
                tail = fh.read()[-3000:]
            raise EngineError(
                f"vLLM driver ({python}) failed ({rc}); its log ends:\n{tail}\n",
                fix="read the log above; check that the vLLM venv works "
                "(`make engines`) and that the target's head dim is >= 32 (vLLM's CPU "
                "attention)",
            )
        with open(res_path) as fh:
            return json.load(fh)


def _kind_summary(
    idx: list[int], base: dict, spec: dict, prompts: Sequence[Any], steps: int
) -> dict[str, Any]:
    drafts = sum(spec["counters"][i]["num_drafts"] for i in idx)
    accepted = sum(spec["counters"][i]["num_accepted_tokens"] for i in idx)
    per_pos = [sum(spec["counters"][i]["accepted_per_pos"][k] for i in idx) for k in range(steps)]
    cond = [
        (c / (drafts if k == 0 else per_pos[k - 1]))
        if (drafts if k == 0 else per_pos[k - 1])
        else None
        for k, c in enumerate(per_pos)
    ]
    emitted = sum(len(spec["outputs"][i]) for i in idx)
    base_tokens = sum(len(base["outputs"][i]) for i in idx)
    t_spec = sum(spec["wall_s"][i] for i in idx)
    t_base = sum(base["wall_s"][i] for i in idx)
    mismatched = [prompts[i].sample_id for i in idx if spec["outputs"][i] != base["outputs"][i]]
    return {
        "prompts": len(idx),
        "tau": 1 + accepted / drafts if drafts else None,
        "verify_forwards": drafts,
        "accepted_tokens": accepted,
        "emitted_tokens": emitted,
        "accept_rate_per_position": [c / drafts if drafts else None for c in per_pos],
        "conditional_accept_rate_per_position": cond,
        "accept_counts_per_position": per_pos,
        "draft_time_s": None,
        "target_time_s": None,
        "draft_ms_per_forward": None,
        "target_ms_per_forward": None,
        "speculative_wall_s": t_spec,
        "baseline_wall_s": t_base,
        "speculative_tokens_per_s": emitted / t_spec if t_spec else None,
        "baseline_tokens_per_s": base_tokens / t_base if t_base else None,
        "speedup": (emitted / t_spec) / (base_tokens / t_base)
        if t_spec and t_base and base_tokens
        else None,
        "lossless": len(idx) - len(mismatched),
        "lossless_checked": len(idx),
        "mismatched_sample_ids": mismatched,
        "divergences": [],
        "vllm_counters": {
            "num_drafts": drafts,
            "num_draft_tokens": sum(spec["counters"][i]["num_draft_tokens"] for i in idx),
            "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": per_pos,
        },
    }


def measure_vllm(
    target_dir: str,
    draft_dir: str,
    prompts: Sequence[Any],
    cfg: Any,
    eos_token_id: Sequence[int],
    python: str,
) -> dict[str, Any]:
    """Baseline and speculative decoding of `prompts` (EvalPrompt) by vLLM; a report shaped
    like `eagle_core.evaluate.measure`'s (see the module docstring for each number).

    Args:
        target_dir: a local HF model dir or a Hub name (vLLM loads it).
        draft_dir: a local exported draft (`eagle3` or `speculators` layout).
        cfg: the EvalConfig (steps, max_new_tokens, dtype, seed).
        eos_token_id: where generation stops (stop_token_ids, as our evaluate stops).
        python: the vLLM venv's python (`vllm_python()`).
    """
    if not prompts:
        raise ConfigError("evaluate: no prompts for vLLM", fix="pass held-out prompts")
    request = {
        "target": target_dir,
        "dtype": cfg.dtype,
        "max_tokens": cfg.max_new_tokens,
        "stop_token_ids": [int(e) for e in eos_token_id],
        "seed": cfg.seed,
        "prompts": [
            {"id": p.sample_id, "kind": p.kind, "input_ids": list(p.input_ids)} for p in prompts
        ],
        "runs": [
            {"name": "baseline"},
            {
                "name": "speculative",
                "draft": draft_dir,
                "method": "eagle3",
                "num_speculative_tokens": cfg.steps,
            },
        ],
    }
    log.info(
        "evaluate: vLLM (%s) decodes %d prompts, plain and with the draft", python, len(prompts)
    )
    result = run_driver(python, request)
    base, spec = result["runs"]
    kinds: dict[str, Any] = {}
    for kind in ("chat", "fim"):
        idx = [i for i, p in enumerate(prompts) if p.kind == kind]
        if idx:
            kinds[kind] = _kind_summary(idx, base, spec, prompts, cfg.steps)
    every = list(range(len(prompts)))
    return {
        "engine": "vllm",
        "vllm_version": result["vllm_version"],
        "engine_start_s": {
            "baseline": base["engine_start_s"],
            "speculative": spec["engine_start_s"],
        },
        "mode": "chain",
        "steps": cfg.steps,
        "temperature": 0.0,
        "max_new_tokens": cfg.max_new_tokens,
        "device": f"vllm {result['vllm_version']} (cpu)",
        "kinds": kinds,
        "all": _kind_summary(every, base, spec, prompts, cfg.steps),
        "finish_reasons": {
            "baseline": base["finish_reasons"],
            "speculative": spec["finish_reasons"],
        },
    }
