"""The separate venvs of the real engines and peers (vLLM, speculators, SpecForge).

Each is built once per machine by `.ci/engine-venv NAME` (`make engines` builds all of
them before `make test`); a test asks for one with `engine_python(NAME)` and drives it as
its own program (a subprocess), as production does. A missing venv is built here; a build
that fails FAILS the test with the script's own message: these checks never skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def engine_python(name: str) -> str:
    """The python of engine venv `name` (built on first use, minutes; then instant)."""
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "engine-venv"), name],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        pytest.fail(
            f".ci/engine-venv {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n"
            f"Fix: run `make engines` and read its error",
            pytrace=False,
        )
    return proc.stdout.strip().splitlines()[-1]
