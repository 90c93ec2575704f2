"""SIGKILL the pipeline at random points of every stage, rerun, compare with a clean run.

    python tests/reliability/sigkill_driver.py <workdir> <tokenizer_dir> <target_dir> <seed>

One interpreter imports torch / transformers / DeepSpeed once; every pipeline run is a
forked child process (so a kill costs no new interpreter start). The parent never initialises
torch.distributed; a child that trains makes its own 1-rank gloo group.

1. Reference: a child runs download -> tokenize -> scan_vocab -> extract_hidden -> train ->
   export into <workdir>/clean, timing each stage.
2. Killed: for each stage, KILLS[stage] times: a child runs the pipeline up to that stage
   (earlier stages are cached), tells the parent when the stage starts, and is SIGKILLed
   after a seeded random delay within that stage's reference time. After every kill, every
   manifest under the root must verify (no listed file missing or different). Then the stage
   is run to completion and the next stage's kills begin.
3. Prints one JSON line: the kill points, and {stage/key: {file: sha256}} of both roots.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402,F401  (imported once, before forking)
from reliability_helpers import chat_rows, fim_rows, verify_all, write_jsonl  # noqa: E402

from eagle_core.download import DownloadConfig, SourceSpec, download  # noqa: E402
from eagle_core.export import ExportConfig, export  # noqa: E402
from eagle_core.extract import ExtractConfig, extract_hidden  # noqa: E402
from eagle_core.tokenize import TokenizeConfig, tokenize  # noqa: E402
from eagle_core.train import TrainConfig, train_main  # noqa: E402
from eagle_core.vocab import VocabConfig, scan_vocab  # noqa: E402
from storage import ArtifactStore  # noqa: E402

STAGES = ("download", "tokenize", "scan_vocab", "extract_hidden", "train", "export")
KILLS = {"download": 2, "tokenize": 2, "scan_vocab": 1, "extract_hidden": 2, "train": 2,
         "export": 1}  # fmt: skip


def run_pipeline(root: str, data: list[str], tok: str, target: str, upto: int, notify) -> None:
    """Stages 0..upto into `root`; notify(i) right before stage i runs."""
    store = ArtifactStore(root)
    notify(0)
    sources = tuple(SourceSpec(path=p) for p in data)
    records = download(store, DownloadConfig(sources=sources, shard_size=8))
    if upto < 1:
        return
    notify(1)
    tokens = tokenize(store, records, TokenizeConfig(tokenizer=tok, shard_size=8))
    if upto < 2:
        return
    notify(2)
    vocab = scan_vocab(store, [tokens], VocabConfig(draft_vocab_size=128))
    if upto < 3:
        return
    notify(3)
    hidden = extract_hidden(store, tokens, ExtractConfig(target=target, batch_size=4, shard_size=8))
    if upto < 4:
        return
    notify(4)
    cfg = TrainConfig(
        store=store.root, target=target, data=(hidden.url,), vocab_map=vocab.url, steps=4,
        batch_size=2, ttt_steps=2, heldout_fraction=0.0, checkpoint_every=1, keep_checkpoints=2,
        log_every=1, seed=1,
    )  # fmt: skip
    run = train_main(cfg, step_delay_s=0.2)
    if upto < 5:
        return
    notify(5)
    export(store, run, ExportConfig(target=target, dtype="float32"))


def fork_run(root, data, tok, target, upto, kill_after=None) -> dict:
    """Run stages 0..upto in a forked child; SIGKILL it `kill_after` s after stage `upto`
    starts (None: let it finish). Returns what happened and per-stage start times."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        t0 = time.monotonic()

        def notify(i: int) -> None:
            os.write(w, f"{i} {time.monotonic() - t0:.4f}\n".encode())

        code = 0
        try:
            run_pipeline(root, data, tok, target, upto, notify)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    starts: dict[int, float] = {}
    t_parent = time.monotonic()
    with os.fdopen(r, "r") as fh:
        for line in fh:  # until stage `upto` starts, or the child exits (EOF)
            i, t = line.split()
            starts[int(i)] = float(t)
            if int(i) == upto and kill_after is not None:
                break
    killed, status = False, None
    if kill_after is not None and upto in starts:
        deadline = time.monotonic() + kill_after
        while True:
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:  # finished before the kill
                status = st
                break
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    if status is None:
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if not killed and code != 0:
        raise SystemExit(f"pipeline child up to {STAGES[upto]} failed with exit code {code}")
    return {"killed": killed, "starts": starts, "exit": code,
            "elapsed": time.monotonic() - t_parent}  # fmt: skip


def main() -> None:
    workdir, tok, target, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    data = [
        write_jsonl(os.path.join(workdir, "chat.jsonl"), chat_rows(24)),
        write_jsonl(os.path.join(workdir, "fim.jsonl"), fim_rows(16)),
    ]
    clean, killed = os.path.join(workdir, "clean"), os.path.join(workdir, "killed")
    # 1. the uninterrupted run, timing each stage (start of the next one = end of this one)
    t0 = time.monotonic()
    ref = fork_run(clean, data, tok, target, len(STAGES) - 1)
    total = time.monotonic() - t0
    bounds = [ref["starts"][i] for i in range(len(STAGES))] + [ref["elapsed"]]
    durations = {s: max(bounds[i + 1] - bounds[i], 0.05) for i, s in enumerate(STAGES)}
    # 2. kills at seeded random points of each stage, then the stage to completion
    points = []
    for i, stage in enumerate(STAGES):
        remaining = durations[stage]  # a rerun resumes: less is left after each kill
        landed, attempt = 0, 0
        # stage times vary with the machine's load between the clean run and these: a stage
        # that finished before every planned kill gets up to 3 more, each sooner
        while attempt < KILLS[stage] or (not landed and attempt < KILLS[stage] + 3):
            late = max(0, attempt - KILLS[stage] + 1)
            delay = rng.uniform(0.05, 0.85) * remaining * 0.3**late
            attempt += 1
            out = fork_run(killed, data, tok, target, i, kill_after=delay)
            remaining = max(remaining - 0.5 * delay, 0.2)
            verify_all(ArtifactStore(killed))  # no manifest lists a missing / different file
            done = ArtifactStore(killed).fs.glob(f"{killed}/{stage}/*/manifest.json")
            points.append({"stage": stage, "delay_s": round(delay, 3), "killed": out["killed"],
                           "published_before_kill": bool(done)})  # fmt: skip
            landed += out["killed"]
        fork_run(killed, data, tok, target, i)
    result = {
        "durations": durations,
        "reference_s": total,
        "points": points,
        "clean": {f"{s}/{k}": v for (s, k), v in verify_all(ArtifactStore(clean)).items()},
        "killed": {f"{s}/{k}": v for (s, k), v in verify_all(ArtifactStore(killed)).items()},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
