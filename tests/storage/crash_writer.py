"""A sharded writer run as a real subprocess by test_storage_crash.py.

    python crash_writer.py ROOT KEY LOG_PATH crash|finish

Publishes SHARDS Parquet shards into artifact `crash_test/KEY`, skipping shards a crashed
earlier attempt journaled (`w.has`). Each shard it actually writes is appended to LOG_PATH
first. In `crash` mode it stops halfway through writing shard CRASH_AT: the temp file holds
half the bytes, "HALFWAY" is printed, and it sleeps until the test kills it with SIGKILL.
"""

from __future__ import annotations

import sys
import time

import torch

from storage import ArtifactStore, ArtifactWriter
from storage.shards import build_table, write_parquet

SHARDS = 5
CRASH_AT = 3
STAGE = "crash_test"


def shard_table(i: int):
    g = torch.Generator().manual_seed(i)
    rows = [torch.randn(4 + j, 8, generator=g).to(torch.bfloat16) for j in range(3)]
    return build_table(
        {"sample_id": [f"s{i}-{j}" for j in range(3)]}, {"hidden": rows}, metadata={"shard": i}
    )


def write_shard(w: ArtifactWriter, i: int, crash: bool) -> None:
    name = f"shard-{i:05d}.parquet"
    if not crash:
        write_parquet(w, name, shard_table(i))
        return

    def half_then_hang(path: str) -> None:
        import pyarrow.parquet as pq

        pq.write_table(shard_table(i), path)
        data = open(path, "rb").read()
        with open(path, "wb") as fh:  # a torn shard, as a killed writer leaves it
            fh.write(data[: len(data) // 2])
        print("HALFWAY", flush=True)
        time.sleep(600)

    w.write_file(name, half_then_hang, journal=True)


def main(root: str, key: str, log_path: str, mode: str) -> None:
    store = ArtifactStore(root)
    with store.publish(STAGE, key, params={"shards": SHARDS}) as w:
        for i in range(SHARDS):
            if w.has(f"shard-{i:05d}.parquet"):
                continue
            with open(log_path, "a") as log:
                log.write(f"{i}\n")
            write_shard(w, i, crash=mode == "crash" and i == CRASH_AT)
        w.counts.update(shards=SHARDS)


if __name__ == "__main__":
    main(*sys.argv[1:5])
