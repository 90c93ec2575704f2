"""`eagle-pipeline ui`: a real Prefect server on loopback, the retrain deployment served,
the run form's URL printed, and the form's schema as the UI receives it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_retrain_run_form(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ui",
            "--port",
            str(port),
            "--store",
            str(tmp_path / "store"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not url:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if "/deployments/deployment/" in line:
                url = line.strip()
        assert url, f"no run-form URL printed:\n{proc.stderr.read()[-3000:]}"
        assert url.startswith(f"http://127.0.0.1:{port}/deployments/deployment/")
        assert url.endswith("/run")
        dep_id = url.rsplit("/", 2)[-2]

        # the UI (a single-page app: deep links are routed in the browser, see tests/ui)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200
        dep = httpx.get(f"http://127.0.0.1:{port}/api/deployments/{dep_id}", timeout=30).json()
        assert dep["name"] == "retrain"
        schema = dep["parameter_openapi_schema"]
        props = schema["properties"]
        assert list(props)[:14] == [
            "target",
            "tokenizer",
            "data",
            "regenerate",
            "tokenize",
            "vocab",
            "extract",
            "train",
            "export",
            "evaluate",
            "release",
            "storage",
            "quick",
            "force",
        ]
        assert props["target"]["description"].startswith("Target model")
        defs = schema["definitions"]
        assert defs["VocabParams"]["properties"]["draft_vocab_size"]["minimum"] == 1
        assert defs["TrainParams"]["properties"]["draft_kind"]["enum"] == ["eagle3", "eagle1"]
        assert dep["parameters"]["storage"]["root"] == str(tmp_path / "store")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
