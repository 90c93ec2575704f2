"""Side-by-side measurement: every figure a benchmark reports is a ratio of two things timed in
the same process run, each repeated, taking the median (these machines are noisy)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(
    a: Callable[[], Any], b: Callable[[], Any], repeats: int = 5
) -> tuple[float, float]:
    """Median times of a and b, alternating runs so machine noise hits both alike."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def device_label() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def save(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """Print a short table and write benchmarks/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    import __main__

    module = getattr(getattr(__main__, "__spec__", None), "name", None) or sys.argv[0]
    doc = {
        "benchmark": name,
        # the exact command line, budget options included (`command` may be a summary)
        "invoked": f"python -m {module} {shlex.join(sys.argv[1:])}".strip(),
        "device": device_label(),
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        **extra,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n## {name}  ({doc['device']})")
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(_fmt(r.get(k)) for k in keys))
    print(f"-> {path}")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
