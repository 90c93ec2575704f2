"""`eagle-pipeline ui`: a local Prefect server, the deployments served, the run form's URL.

For one machine: starts `prefect server start` on 127.0.0.1 as a child process, waits for
`/api/health`, registers the `retrain` deployment (and the stage-group flows) with `serve`
(runs what the form submits, in this process's worker threads), and prints the URL of the
deployment's run form. Ctrl-C stops both.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

# a cold server (fresh database: migrations) took 20 s on an idle 2-core machine and over 90 s
# on a loaded one; EAGLE_PIPELINE_UI_START_TIMEOUT_S overrides it
HEALTH_TIMEOUT_S = 240.0


def start_server(
    port: int, env: dict[str, str] | None = None, timeout_s: float | None = None
) -> subprocess.Popen[bytes]:
    """Start `prefect server start` on loopback and wait until `/api/health` answers.

    The server's output goes to a log file (a pipe nobody reads would block it when full).
    """
    import httpx

    from storage.errors import PipelineError

    timeout_s = timeout_s or float(
        os.environ.get("EAGLE_PIPELINE_UI_START_TIMEOUT_S", HEALTH_TIMEOUT_S)
    )
    log_file = tempfile.NamedTemporaryFile(
        prefix=f"prefect-server-{port}-", suffix=".log", delete=False
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        # `--port` alone leaves the UI's API URL at its default (port 4200, or PREFECT_API_URL):
        # the pages would then call another server ("Can't connect to Server API"). Keep this:
        # tests/ui checks /ui-settings.
        env={
            **os.environ,
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_PORT": str(port),
            **(env or {}),
        },
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PipelineError(
                f"prefect server exited with status {proc.returncode}: {_tail(log_file.name)}",
                fix=f"check that port {port} is free (--port)",
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                print(f"Prefect server log: {log_file.name}", file=sys.stderr)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise PipelineError(
        f"prefect server on port {port} not healthy after {timeout_s:.0f} s "
        f"({_tail(log_file.name)})",
        fix="retry; on a slow machine raise EAGLE_PIPELINE_UI_START_TIMEOUT_S",
    )


def _tail(path: str, n: int = 2000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-n:]


def deployments(store: str = "") -> list[Any]:
    """The deployments `ui` serves: retrain (the run form) and the stage-group flows."""
    from flows.params import StorageParams
    from flows.retrain import prepare_data, release_draft, retrain

    params = {"storage": StorageParams(root=store).model_dump()} if store else {}
    return [
        retrain.to_deployment(
            name="retrain", parameters=params, description="Retrain the draft model end to end."
        ),
        prepare_data.to_deployment(name="prepare-data", parameters=params),
        release_draft.to_deployment(name="release-draft"),
    ]


def run_form_url(api_url: str, deployment_id: Any) -> str:
    """`http://host:port/api` + id -> the UI page with the deployment's custom-run form."""
    base = api_url.rstrip("/").removesuffix("/api")
    return f"{base}/deployments/deployment/{deployment_id}/run"


def serve_ui(port: int = 4200, store: str = "", open_browser: bool = False) -> str:
    """Start the server, print the run form's URL, then serve until interrupted."""
    api_url = f"http://127.0.0.1:{port}/api"
    server = start_server(port)
    os.environ["PREFECT_API_URL"] = api_url
    # serve polls the API every few seconds: one httpx INFO line each would bury the URL
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        from prefect import serve

        deps = deployments(store)
        dep_id = deps[0].apply()
        url = run_form_url(api_url, dep_id)
        print(f"Prefect UI: http://127.0.0.1:{port}  (Ctrl-C stops it)", file=sys.stderr)
        print(url, flush=True)
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        try:
            serve(*deps, print_starting_message=False)
        except KeyboardInterrupt:
            pass
        return url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
