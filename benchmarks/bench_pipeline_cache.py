"""Cached re-run of the whole demo pipeline vs its first run.

Runs `eagle-pipeline demo --quick --store <fresh dir>` twice as a user would (a new process
each time, so interpreter start-up, imports and the Prefect start-up are in both figures),
reads the per-stage "cached"/"computed" table the CLI prints, and checks that the second run
returns the same exported draft. Target: second run <= 5% of the first, 0 stages recomputed.

Run: .venv/bin/python -m benchmarks.bench_pipeline_cache [--full]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import save

CLI = str(Path(sys.executable).with_name("eagle-pipeline"))
STAGE_LINE = re.compile(r"^(\w+)\s+(cached|computed)\s*$")


def run_demo(store: str, quick: bool) -> dict[str, object]:
    """One CLI run: wall seconds, the stage table, the exported draft URL (last stdout line)."""
    cmd = [CLI, "demo", "--store", store] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    stages = {}
    for line in proc.stderr.splitlines():
        m = STAGE_LINE.match(line.strip())
        if m:
            stages[m.group(1)] = m.group(2)
    lines = proc.stdout.strip().splitlines()
    return {"wall_s": wall, "stages": stages, "url": lines[-1] if lines else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the full demo instead of --quick")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="bench-cache-")
    try:
        first = run_demo(store, quick=not args.full)
        second = run_demo(store, quick=not args.full)
    finally:
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    recomputed = sorted(s for s, v in second["stages"].items() if v == "computed")
    ratio = second["wall_s"] / first["wall_s"]
    rows = [
        {"run": "first", "wall_s": first["wall_s"], "computed": len(first["stages"])},
        {
            "run": "second (cached)",
            "wall_s": second["wall_s"],
            "computed": len(recomputed),
            "ratio_to_first": ratio,
        },
    ]
    save(
        "pipeline_cache",
        rows,
        command=f"eagle-pipeline demo {'--quick ' if not args.full else ''}--store <tmp> (x2)",
        first_stages=first["stages"],
        second_stages=second["stages"],
        recomputed_stages=recomputed,
        same_export=first["url"] == second["url"],
        ratio=ratio,
        target="second run <= 5% of the first, 0 stages recomputed",
        met=ratio <= 0.05 and not recomputed and first["url"] == second["url"],
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )


if __name__ == "__main__":
    main()
