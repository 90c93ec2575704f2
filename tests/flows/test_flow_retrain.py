"""The retrain flow end to end against a real Prefect server and a real S3 API (moto).

One quick demo run on a fresh bucket (every stage computed), a second run of the same
parameters (every stage cached), a CLI run killed with SIGKILL in the middle of extraction
and rerun (finished shards and earlier stages reused), and the `retrain-local` deployment of
deployments/prefect.yaml applied and run by a process worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ALL_STAGES = [
    "build_demo_target",
    "download",
    "tokenize",
    "scan_vocab",
    "extract_hidden",
    "train",
    "export",
    "evaluate",
]


@pytest.fixture(scope="module")
def bucket_root(s3_endpoint: str) -> Iterator[str]:
    """One bucket for the module's runs (they share the demo target and early stages)."""
    import boto3
    import fsspec

    bucket = f"flows-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EAGLE_PIPELINE_S3_ENDPOINT", s3_endpoint)
        fsspec.config.conf.pop("s3", None)
        yield f"s3://{bucket}/artifacts"


def _params(root: str, **extra: Any) -> dict[str, Any]:
    return {"target": "demo", "quick": True, "storage": {"root": root}, **extra}


def _task_outcomes(caplog: pytest.LogCaptureFixture) -> dict[str, set[str]]:
    """stage -> {"cached", "computed"} from the tasks' outcome lines."""
    out: dict[str, set[str]] = {}
    for rec in caplog.records:
        if rec.name != "prefect.task_runs":
            continue
        msg = rec.getMessage()
        stage = msg.split(" ", 1)[0]
        if ": cached" in msg:
            out.setdefault(stage, set()).add("cached")
        elif ": computed" in msg:
            out.setdefault(stage, set()).add("computed")
    return out


def _run_artifacts(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    return asyncio.run(read())


@pytest.fixture(scope="module")
def first_run(prefect_server: str, bucket_root: str) -> dict[str, Any]:
    from flows.retrain import retrain

    state = retrain(**_params(bucket_root), return_state=True)
    assert state.is_completed(), state
    return {"result": state.result(), "flow_run_id": state.state_details.flow_run_id}


def test_quick_demo_end_to_end_on_s3(first_run, bucket_root):
    from storage import ArtifactStore

    result = first_run["result"]
    assert set(result["cached"]) == set(ALL_STAGES)
    assert not any(result["cached"].values()), result["cached"]  # fresh bucket: all computed
    # chat + FIM training data and their held-out prompt files, downloaded in parallel
    assert len(result["refs"]["download"]) == 4
    export_url = result["export_url"]
    assert export_url.startswith(bucket_root + "/export/")
    store, stage, key = ArtifactStore.for_url(export_url)
    files = store.list_files(store.ref(stage, key))
    assert {"config.json", "model.safetensors"} <= set(files)
    config = json.loads(store.read_bytes(store.ref(stage, key), "config.json"))
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert isinstance(result["tau"], float) and result["tau"] >= 1.0

    # what the UI shows for this run
    arts = {a.key: a for a in _run_artifacts(first_run["flow_run_id"]) if a.key}
    for key_ in (
        "download-counts",
        "tokenize-counts",
        "scan-vocab-coverage",
        "train-curves",
        "train-step-accuracy",
        "export-link",
        "evaluate-summary",
        "evaluate-report",
    ):
        assert key_ in arts, f"artifact {key_} missing: {sorted(arts)}"
    assert "data:image/png;base64," in str(arts["train-curves"].data)
    assert "tau" in str(arts["evaluate-summary"].data)
    assert arts["export-link"].data.startswith("[exported draft](" + export_url) or (
        export_url in str(arts["export-link"].data)
    )


def test_second_run_recomputes_nothing(first_run, bucket_root, caplog):
    from flows.retrain import retrain

    caplog.set_level(logging.INFO)
    again = retrain(**_params(bucket_root))
    assert all(again["cached"].values()), again["cached"]
    assert again["refs"] == first_run["result"]["refs"]  # same keys, same URLs
    outcomes = _task_outcomes(caplog)
    assert set(outcomes) == set(ALL_STAGES)
    assert all(o == {"cached"} for o in outcomes.values()), outcomes


def _journaled_shards(fs: Any, root: str) -> dict[str, list[str]]:
    """extract_hidden key -> journal entries present (finished shards of unfinished runs)."""
    out: dict[str, list[str]] = {}
    base = root.removeprefix("s3://") + "/extract_hidden"
    try:
        keys = fs.ls(base, detail=False, refresh=True)
    except FileNotFoundError:
        return out
    for k in keys:
        try:
            out[k.rsplit("/", 1)[-1]] = fs.ls(k + "/_journal", detail=False, refresh=True)
        except FileNotFoundError:
            continue
    return out


def test_sigkill_during_extraction_then_rerun(
    first_run, bucket_root, prefect_server, tmp_path, s3_endpoint, caplog
):
    """Kill the CLI while it extracts; the rerun reuses every earlier stage and the shards
    journaled before the kill, and ends with the keys an uninterrupted run would have."""
    import s3fs

    from flows.params import PipelineParams, load_pipeline_yaml
    from flows.retrain import retrain
    from storage import ArtifactStore

    # small shards (many resume points), otherwise the first run's parameters: the demo
    # target, downloads, tokenization and vocab are the first run's (cached) artifacts
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(
        f"target: demo\nquick: true\nstorage: {{root: '{bucket_root}'}}\n"
        "extract: {shard_size: 2, batch_size: 2}\n"
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "EAGLE_PIPELINE_S3_ENDPOINT": s3_endpoint,
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    before = set(_journaled_shards(fs, bucket_root))
    killed_key, journal = None, []
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = {
                k: v for k, v in _journaled_shards(fs, bucket_root).items() if k not in before and v
            }
            if found:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_key, journal = next(iter(found.items()))
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert killed_key, f"extraction never started or finished too fast:\n{out[-3000:]}"
    store = ArtifactStore(bucket_root)
    assert not store.is_done("extract_hidden", killed_key), "killed before its manifest"
    shard_names = [j.rsplit("/", 1)[-1].removesuffix(".json") for j in journal]
    mtimes = {
        n: fs.info(f"{store.path('extract_hidden', killed_key)}/{n}", refresh=True)["LastModified"]
        for n in shard_names
    }

    caplog.set_level(logging.INFO)
    params = load_pipeline_yaml(str(cfg_path))
    assert isinstance(params, PipelineParams)
    rerun = retrain(**{name: getattr(params, name) for name in type(params).model_fields})
    for stage in ("build_demo_target", "download", "tokenize", "scan_vocab"):
        assert rerun["cached"][stage], f"{stage} was recomputed after the kill"
        assert rerun["refs"][stage] == first_run["result"]["refs"][stage]
    assert not rerun["cached"]["extract_hidden"]
    assert killed_key in [r["key"] for r in rerun["refs"]["extract_hidden"]]
    for n, mtime in mtimes.items():  # journaled shards were reused, not rewritten
        info = fs.info(f"{store.path('extract_hidden', killed_key)}/{n}", refresh=True)
        assert info["LastModified"] == mtime, n
    assert store.is_done("extract_hidden", killed_key)
    outcomes = _task_outcomes(caplog)
    for stage in ("download", "tokenize", "scan_vocab"):
        assert outcomes[stage] == {"cached"}, (stage, outcomes[stage])


def test_deployment_runs_through_a_process_worker(
    first_run, bucket_root, prefect_server, s3_endpoint, tmp_path
):
    """`prefect deploy` of deployments/prefect.yaml, then a process worker runs it."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "EAGLE_PIPELINE_HOME": str(REPO),
        "EAGLE_PIPELINE_S3_ENDPOINT": s3_endpoint,
        "OMP_NUM_THREADS": "1",
    }
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]

    def cli(*args: str, timeout: int = 300) -> str:
        done = subprocess.run(
            [*prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    cli("work-pool", "create", "eagle-process", "--type", "process", "--overwrite")
    cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "retrain-local")

    run = run_deployment("retrain/retrain-local", parameters=_params(bucket_root), timeout=0)
    worker = subprocess.run(
        [*prefect, "worker", "start", "--pool", "eagle-process", "--run-once"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    async def final_state() -> Any:
        async with get_client() as client:
            return (await client.read_flow_run(run.id)).state

    state = asyncio.run(final_state())
    assert state is not None and state.is_completed(), (
        f"{state}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    )
