"""Runs INSIDE the vLLM venv (`.ci/engine-venv vllm`) as its own program: never imports
eagle_core (that venv has vLLM's own transformers, not ours), only vLLM and the standard
library. `eagle_core/engine_vllm.py` writes the request, starts this script with that
venv's python and reads the result:

    <vllm venv>/bin/python vllm_driver.py REQUEST.json RESULT.json

REQUEST: {"target": model dir, "dtype", "max_tokens", "stop_token_ids": [...],
"prompts": [{"id", "kind", "input_ids"}], "runs": [{"name", "draft": dir | null,
"method": "eagle3", "num_speculative_tokens": k}], "seed", "warmup"}.

Every run is one `vllm.LLM` (offline engine, greedy) that decodes every prompt ALONE
(batch 1, as the project's own evaluate does, so wall times compare), in request order.
Speculative runs read vLLM's spec-decode counters (`LLM.get_metrics()`) before and after
each prompt, so each prompt's numbers are its own (the warm-up prompt is not counted).

RESULT: {"vllm_version", "runs": [{"name", "engine_start_s", "outputs": [[ids]],
"finish_reasons", "wall_s" per prompt, "counters": per prompt {"num_drafts",
"num_draft_tokens", "num_accepted_tokens", "accepted_per_pos": [...]} (speculative runs)}]}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

# CPU build defaults (vLLM reads them at import): 1 GiB of KV cache is plenty for a test
# target and leaves memory to the caller; "nobind" because CI machines share their cores
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_counters(llm, k: int) -> dict:
    """vLLM's cumulative spec-decode counters (summed over label sets)."""
    out = {name: 0 for name in COUNTERS.values()}
    out["accepted_per_pos"] = [0] * k
    for m in llm.get_metrics():
        if m.name in COUNTERS:
            out[COUNTERS[m.name]] += int(m.value)
        elif m.name == PER_POS:
            for i, v in enumerate(m.values[:k]):
                out["accepted_per_pos"][i] += int(v)
    return out


def diff(after: dict, before: dict) -> dict:
    return {
        k: [a - b for a, b in zip(v, before[k], strict=True)]
        if isinstance(v, list)
        else v - before[k]
        for k, v in after.items()
    }


def run_one(req: dict, run: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    k = int(run.get("num_speculative_tokens") or 0)
    kwargs = dict(
        model=req["target"],
        dtype=req.get("dtype", "float32"),
        seed=int(req.get("seed", 0)),
        # prompts arrive as token ids and outputs leave as ids: no tokenizer is needed, so a
        # model directory without tokenizer files works and no detokenisation is timed
        skip_tokenizer_init=True,
        disable_log_stats=False,  # get_metrics() needs the stat loggers
        enforce_eager=True,
    )
    if req.get("max_model_len"):
        kwargs["max_model_len"] = int(req["max_model_len"])
    if run.get("draft"):
        kwargs["speculative_config"] = {
            "method": run.get("method", "eagle3"),
            "model": run["draft"],
            "num_speculative_tokens": k,
        }
    started = time.perf_counter()
    llm = LLM(**kwargs)
    engine_start_s = time.perf_counter() - started
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=int(req["max_tokens"]),
        stop_token_ids=list(req.get("stop_token_ids") or []),
        detokenize=False,
        seed=int(req.get("seed", 0)),
    )
    prompts = req["prompts"]
    if req.get("warmup", True) and prompts:  # first-call costs stay out of the timings
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0]["input_ids"])], sp, use_tqdm=False)
    outputs, finish, wall, counters = [], [], [], []
    before = read_counters(llm, k) if k else None
    for p in prompts:
        t0 = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p["input_ids"])], sp, use_tqdm=False)
        wall.append(time.perf_counter() - t0)
        out = res[0].outputs[0]
        outputs.append([int(t) for t in out.token_ids])
        finish.append(out.finish_reason)
        if k:  # this prompt's own counts: the counters are cumulative over the engine's life
            after = read_counters(llm, k)
            counters.append(diff(after, before))
            before = after
    result = {
        "name": run["name"],
        "engine_start_s": engine_start_s,
        "outputs": outputs,
        "finish_reasons": finish,
        "wall_s": wall,
        "counters": counters,
    }
    del llm
    gc.collect()
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: vllm_driver.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        req = json.load(fh)
    import vllm

    runs = [run_one(req, run) for run in req["runs"]]
    with open(argv[2] + ".tmp", "w") as fh:
        json.dump({"vllm_version": vllm.__version__, "runs": runs}, fh)
    os.replace(argv[2] + ".tmp", argv[2])  # the caller sees a result only once it is whole
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
