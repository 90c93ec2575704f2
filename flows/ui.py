"""`eagle-pipeline ui`: a local Prefect server, the deployments served, the run form's URL.

For one machine: starts `prefect server start` on 127.0.0.1 as a child process, waits for
`/api/health`, registers the `retrain` deployment (and the stage-group flows) with `serve`
(runs what the form submits, in this process's worker threads), and prints the URL of the
deployment's run form. Ctrl-C stops both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

HEALTH_TIMEOUT_S = 90.0  # a cold server on a loaded 2-core machine takes ~20 s


def start_server(
    port: int, env: dict[str, str] | None = None, timeout_s: float = HEALTH_TIMEOUT_S
) -> subprocess.Popen[bytes]:
    """Start `prefect server start` on loopback and wait until `/api/health` answers."""
    import httpx

    from storage.errors import PipelineError

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
        # the pages would then call another server
        env={
            **os.environ,
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_PORT": str(port),
            **(env or {}),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise PipelineError(
                f"prefect server exited with status {proc.returncode}: {err}",
                fix=f"check that port {port} is free (--port)",
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise PipelineError(
        f"prefect server on port {port} not healthy after {timeout_s:.0f} s",
        fix="retry, or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    )


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
