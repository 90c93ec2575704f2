"""Start `python -m eagle_core.train` on N processes and turn its outcome into a StageRef.

    launch_training(cfg, nproc=2, launcher="deepspeed")   # or "torchrun", or "inline"

- `build_command` makes the command line: the `deepspeed` launcher (this node, or the nodes
  of a hostfile: `hostname slots=N` lines), or `torchrun` (this node).
- Everything that can be checked before processes start is checked here: the train config,
  its input artifacts, and the DeepSpeed JSON (merged and validated by DeepSpeed's own
  parser: unknown keys are errors). A finished run with the same key returns at once.
- The processes' output is streamed line by line to this module's logger. Each rank's lines
  carry a `[rank N]` prefix (eagle_core.train sets it), so the last 20 lines of every rank are
  kept; a non-zero exit becomes a TrainingError naming the failing rank with its last lines.
- `launcher="inline"` trains in this process (1 rank), which skips a second Python start-up.

Child environment: OMP_NUM_THREADS=1 unless set (N processes share the cores), and
TORCH_EXTENSIONS_DIR is passed on as set (the Makefile points it into the venv) so DeepSpeed's
shm comm op is built once per machine, not once per run.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from typing import Literal

from eagle_core.errors import ConfigError, TrainingError
from eagle_core.train import (
    STAGE,
    TrainConfig,
    _free_port,
    build_deepspeed_config,
    resolve_inputs,
    run_training,
    train_key,
)
from storage import ArtifactStore, StageRef

log = logging.getLogger(__name__)

Launcher = Literal["deepspeed", "torchrun", "inline"]
TAIL_LINES = 20  # lines of the failing rank quoted in the error
_RANK_LINE = re.compile(r"^\[rank ?(\d+)\]:? ?")
_FAILED = re.compile(r"ERROR (?:eagle_core\.train|__main__): FAILED( \(caused by another rank\))?")


def hostfile_slots(path: str) -> int:
    """Total `slots=N` of a DeepSpeed hostfile (`hostname slots=N` per line, # comments)."""
    total = 0
    try:
        with open(path) as fh:
            lines = fh.readlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read hostfile {path}: {exc}",
            fix="pass an existing hostfile with `hostname slots=N` lines",
        ) from exc
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ConfigError(
                f"hostfile {path}:{n}: {line!r} is not `hostname slots=N`",
                fix="write one `hostname slots=N` per line",
            )
        total += int(m.group(2))
    if not total:
        raise ConfigError(f"hostfile {path} lists no slots", fix="add `hostname slots=N` lines")
    return total


def build_command(
    cfg_path: str,
    nproc: int,
    launcher: Launcher = "deepspeed",
    hostfile: str | None = None,
    master_port: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The command that starts training.

    Args:
        cfg_path: the TrainConfig JSON.
        nproc: processes per node (GPUs per node; CPU processes on CPU).
        launcher: "deepspeed" or "torchrun".
        hostfile: DeepSpeed hostfile for several nodes (deepspeed only; its slots decide the
            processes per node).
        master_port: rendezvous port (default: DeepSpeed's / torchrun's 29500).
        python: the interpreter (default: this one).
    """
    py = python or sys.executable
    if nproc < 1:
        raise ConfigError(f"nproc={nproc} must be >= 1", fix="use 1 or more processes")
    script = ["eagle_core.train", "--config", cfg_path]
    if launcher == "deepspeed":
        cmd = [py, "-m", "deepspeed.launcher.runner"]
        if hostfile:
            cmd += ["--hostfile", hostfile]
        else:
            cmd += ["--num_gpus", str(nproc)]
        if master_port:
            cmd += ["--master_port", str(master_port)]
        return [*cmd, "--module", *script]
    if launcher == "torchrun":
        if hostfile:
            raise ConfigError(
                "a hostfile was given with launcher='torchrun'",
                fix="use launcher='deepspeed' for hostfiles, or start torchrun on every node "
                "yourself with --nnodes/--node-rank/--rdzv-endpoint",
            )
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if master_port:
            cmd += ["--master_port", str(master_port)]
        return [*cmd, "-m", *script]
    raise ConfigError(
        f"launcher={launcher!r} is unknown", fix="use 'deepspeed', 'torchrun' or 'inline'"
    )


def launch_training(
    cfg: TrainConfig,
    nproc: int = 1,
    launcher: Launcher = "inline",
    *,
    store: ArtifactStore | None = None,
    hostfile: str | None = None,
    master_port: int | None = None,
    force: bool = False,
    extra_args: list[str] | None = None,
) -> StageRef:
    """Train the draft of `cfg` on `nproc` processes; returns the train artifact.

    Args:
        cfg: the run (its `store` is the artifact root unless `store` is given).
        nproc: processes on this node (ignored with a hostfile: its slots count).
        launcher: "deepspeed", "torchrun", or "inline" (this process; nproc must be 1).
        store: artifact store (default: ArtifactStore(cfg.store)).
        hostfile: several nodes (deepspeed launcher).
        master_port: rendezvous port (default: a free one on this node).
        force: retrain from scratch.
        extra_args: more arguments for eagle_core.train (debug flags).

    Raises:
        ConfigError: bad config, unfinished inputs, invalid DeepSpeed JSON (before any start).
        TrainingError: a process failed (the failing rank and its last log lines).
    """
    store = store or ArtifactStore(cfg.store)
    cfg = dataclasses.replace(cfg, store=store.root)
    world = hostfile_slots(hostfile) if hostfile else nproc
    build_deepspeed_config(cfg, world)  # validates the merged DeepSpeed config now
    inputs = resolve_inputs(store, cfg)
    key = train_key(store, cfg, inputs)
    if store.is_done(STAGE, key) and not force:
        log.info("train %s: cached", key)
        return store.ref(STAGE, key)
    if launcher == "inline":
        if nproc != 1 or hostfile:
            raise ConfigError(
                f"launcher='inline' runs 1 process, nproc={nproc} was asked",
                fix="use launcher='deepspeed' or 'torchrun' for several processes",
            )
        return run_training(store, cfg, force=force)
    with tempfile.TemporaryDirectory(prefix="eagle-train-") as tmp:
        cfg_path = os.path.join(tmp, "train_config.json")
        with open(cfg_path, "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=1)
        port = master_port or _free_port()
        cmd = build_command(cfg_path, nproc, launcher, hostfile, port)
        cmd += ["--force"] if force else []
        cmd += list(extra_args or [])
        run_command(cmd, launcher=launcher, nproc=world)
    if not store.is_done(STAGE, key):
        raise TrainingError(
            f"training exited cleanly but {store.url(STAGE, key)} has no manifest",
            fix="check the training log above (a debug stop flag?) and rerun to resume",
        )
    return store.ref(STAGE, key)


def child_env() -> dict[str, str]:
    # a launcher sets each process's rank and rendezvous; never inherit this process's own
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are written
    return env  # TORCH_EXTENSIONS_DIR (the shm op cache) passes through unchanged


def run_command(cmd: list[str], *, launcher: str = "deepspeed", nproc: int = 1) -> None:
    """Run a training command, streaming its output; TrainingError on a non-zero exit."""
    log.info("launching: %s", " ".join(cmd))
    tails: dict[int | None, collections.deque[str]] = collections.defaultdict(
        lambda: collections.deque(maxlen=TAIL_LINES)
    )
    failed: list[int] = []  # ranks that logged their own error, in order
    consequences: list[int] = []  # ranks that stopped because another failed
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=child_env(),
        errors="replace",
    )
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            m = _RANK_LINE.match(line)
            rank = int(m.group(1)) if m else None
            tails[rank].append(line[m.end() :] if m else line)
            f = _FAILED.search(line) if rank is not None else None
            if f and rank not in failed and rank not in consequences:
                (consequences if f.group(1) else failed).append(rank)
            log.info("%s", line)
        rc = proc.wait()
    if rc == 0:
        return
    failed += consequences
    if failed:
        rank: int | None = failed[0]
        where = f"rank {rank} failed" + (f" (then ranks {failed[1:]})" if failed[1:] else "")
    else:  # killed (OOM, signal) before it could log: show the ranks that were seen
        ranked = [r for r in tails if r is not None]
        rank = ranked[-1] if ranked else None
        where = "no rank reported an error (killed by a signal or out of memory?)"
    lines = "\n".join(tails.get(rank, tails.get(None, [])))
    raise TrainingError(
        f"training with {launcher} on {nproc} process(es) exited with code {rc}; {where}. "
        f"Last lines of rank {rank}:\n{lines}",
        fix="fix the error shown; a rerun resumes from the latest complete checkpoint",
    )
