"""Training checkpoints: save, find the latest complete one, resume; sync to remote stores.

Layout of one checkpoint, `<run dir>/checkpoints/step-XXXXXXXX/`:

    mp_rank_00_model_states.pt, *optim_states.pt ...   DeepSpeed's own files (weights,
                                                       optimizer, lr scheduler, ZeRO partitions)
    rng_rank<r>.pt                                     python / numpy / torch RNG state per rank
    trainer_state.json                                 step, epoch, data position, counters
    complete.json                                      written LAST by rank 0, after a barrier:
                                                       the file list with sizes

A checkpoint counts only if `complete.json` exists and every file it lists is there with its
size: a run killed while saving leaves a directory without the marker, which is never picked
and is overwritten when the same step is saved again.

Where the run directory is: on a local artifact root it is the train artifact's own directory
`<root>/train/<key>/` (it is not an artifact until its manifest is written, so half-finished
runs are invisible to readers, and a restarted run finds its checkpoints there). On a remote
root (s3://...) DeepSpeed still needs a local directory: the run works in a local staging
directory, and every complete checkpoint is uploaded to `<root>/train/<key>/checkpoints/<tag>/`
(marker last); a restart on a fresh machine downloads the latest complete one first. The
staging directory is `$EAGLE_TRAIN_STAGING/<root hash>-<key>` (default: the system temp dir)
and is deleted once the artifact is published.

Several nodes: every rank writes its own ZeRO partition files into the run directory, so that
directory must be on a filesystem all nodes share (a local root on shared storage, or
EAGLE_TRAIN_STAGING on shared storage for remote roots), as DeepSpeed itself assumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eagle_core.errors import TrainingError
from storage import ArtifactStore

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


def checkpoint_tag(step: int) -> str:
    """`step-00000042`: zero-padded so names sort by step."""
    return f"step-{step:08d}"


@dataclass
class TrainerState:
    """Everything besides DeepSpeed's state that a resumed run needs.

    Attributes:
        step: optimizer steps done.
        epoch: epoch of the next micro batch.
        micro_offset: micro batches of `epoch`'s plan already consumed (all ranks together).
        samples_seen / tokens_seen: counters over the whole run (for logs and the manifest).
        world_size: ranks of the run that saved (a resume with another W keeps the data order).
    """

    step: int = 0
    epoch: int = 0
    micro_offset: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    last_loss: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        return cls(**{k: d[k] for k in d if k in cls.__dataclass_fields__})


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy and torch (CPU, and CUDA when present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _list_files(path: str) -> list[dict[str, Any]]:
    files = []
    for base, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel != COMPLETE:
                files.append({"name": rel, "size": os.path.getsize(full)})
    return sorted(files, key=lambda f: f["name"])


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine: Any, run_dir: str, state: TrainerState) -> str:
    """Save a checkpoint of `engine` (a DeepSpeed engine) at `state.step`; all ranks call this.

    Returns the checkpoint directory. The marker is written last by rank 0 after every rank
    has finished writing, so a crash anywhere leaves an incomplete (ignored) checkpoint.
    """
    rank, _world = _rank_world()
    root = os.path.join(run_dir, CHECKPOINTS)
    tag = checkpoint_tag(state.step)
    path = os.path.join(root, tag)
    if rank == 0:
        if os.path.isdir(path):  # left by a killed attempt at the same step: start clean
            shutil.rmtree(path)
        os.makedirs(root, exist_ok=True)
    _barrier()
    engine.save_checkpoint(
        root, tag=tag, client_state={"trainer_state": asdict(state)}, save_latest=False
    )
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    if rank == 0:
        _write_json_atomic(os.path.join(path, TRAINER_STATE), asdict(state))
    _barrier()
    if rank == 0:
        marker = {
            "step": state.step,
            "tag": tag,
            "world_size": state.world_size,
            "created_at": time.time(),
            "files": _list_files(path),
        }
        _write_json_atomic(os.path.join(path, COMPLETE), marker)
        log.info("checkpoint %s saved (%d files)", path, len(marker["files"]))
    _barrier()
    return path


def is_complete(path: str) -> bool:
    """True if `path` has a marker and every file the marker lists, with its size."""
    try:
        with open(os.path.join(path, COMPLETE)) as fh:
            marker = json.load(fh)
        return all(
            os.path.getsize(os.path.join(path, f["name"])) == f["size"] for f in marker["files"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint directory, complete or not, by step."""
    root = os.path.join(run_dir, CHECKPOINTS)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(root):
            m = _TAG.match(name)
            if m and os.path.isdir(os.path.join(root, name)):
                out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_latest_complete(run_dir: str) -> str | None:
    """The complete checkpoint with the highest step, or None; incomplete ones are skipped."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
        log.warning("checkpoint %s (step %d) is incomplete: skipped", path, step)
    return None


def load_checkpoint(engine: Any, path: str) -> TrainerState:
    """Restore weights, optimizer, scheduler and this rank's RNG state; returns the state."""
    if not is_complete(path):
        raise TrainingError(
            f"checkpoint {path} is incomplete (no {COMPLETE} or a file is missing)",
            fix="resume from find_latest_complete(run_dir), or delete the directory",
        )
    rank, world = _rank_world()
    root, tag = os.path.split(path.rstrip("/"))
    loaded, _client = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise TrainingError(
            f"DeepSpeed could not load checkpoint {path}",
            fix="check that the run's ZeRO stage and world size match the checkpoint's",
        )
    with open(os.path.join(path, TRAINER_STATE)) as fh:
        state = TrainerState.from_dict(json.load(fh))
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: numpy state
    else:
        log.warning(
            "no RNG state for rank %d in %s (saved by %d ranks, now %d)",
            rank,
            path,
            state.world_size,
            world,
        )
    log.info("resumed from %s (step %d, epoch %d)", path, state.step, state.epoch)
    return state


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (and incomplete older ones)."""
    ckpts = list_checkpoints(run_dir)
    complete = [p for _s, p in ckpts if is_complete(p)]
    keep_set = set(complete[-keep:]) if keep > 0 else set(complete)
    newest = complete[-1] if complete else None
    removed = []
    for _step, path in ckpts:
        if path in keep_set or (newest is not None and path > newest):
            continue  # newer incomplete dirs belong to a save in progress
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ---- remote stores ------------------------------------------------------------------------
def upload_checkpoint(store: ArtifactStore, stage: str, key: str, path: str) -> None:
    """Copy a complete local checkpoint to `<root>/<stage>/<key>/checkpoints/<tag>/`.

    The marker goes last, so a remote checkpoint without it is as incomplete as a local one.
    """
    tag = os.path.basename(path.rstrip("/"))
    for f in _list_files(path):
        store.fs.put_file(
            os.path.join(path, f["name"]),
            store.path(stage, key, f"{CHECKPOINTS}/{tag}/{f['name']}"),
        )
    store.fs.put_file(
        os.path.join(path, COMPLETE), store.path(stage, key, f"{CHECKPOINTS}/{tag}/{COMPLETE}")
    )
    log.info("checkpoint %s uploaded to %s", tag, store.url(stage, key, f"{CHECKPOINTS}/{tag}"))


def download_latest_checkpoint(
    store: ArtifactStore, stage: str, key: str, run_dir: str
) -> str | None:
    """Fetch the newest complete remote checkpoint into `run_dir` if newer than the local ones.

    Returns the latest complete local checkpoint afterwards (None if there is none).
    """
    base = store.path(stage, key, CHECKPOINTS)
    try:
        entries = store.fs.ls(base, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return find_latest_complete(run_dir)
    local = find_latest_complete(run_dir)
    local_step = int(_TAG.match(os.path.basename(local)).group(1)) if local else -1
    tags = sorted((os.path.basename(e.rstrip("/")) for e in entries), reverse=True)
    for tag in tags:
        m = _TAG.match(tag)
        if not m or int(m.group(1)) <= local_step:
            continue
        try:
            marker = json.loads(store.fs.cat_file(f"{base}/{tag}/{COMPLETE}"))
        except (FileNotFoundError, ValueError):
            continue
        dest = os.path.join(run_dir, CHECKPOINTS, tag)
        shutil.rmtree(dest, ignore_errors=True)
        for f in marker["files"]:
            target = os.path.join(dest, f["name"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                store.fs.get_file(f"{base}/{tag}/{f['name']}", target)
            except FileNotFoundError:
                break
        else:
            _write_json_atomic(os.path.join(dest, COMPLETE), marker)
            if is_complete(dest):
                log.info("downloaded checkpoint %s from %s", tag, store.url(stage, key))
                return dest
        shutil.rmtree(dest, ignore_errors=True)
    return local
