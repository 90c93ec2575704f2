"""The thin tasks under a real Prefect server: the store's manifest is the cache, `force`
recomputes, and no secret reaches parameters, logs, manifests or UI artifacts."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from prefect import flow

from eagle_core.download import DownloadConfig, SourceSpec
from storage import ArtifactStore
from tasks.download import download

pytestmark = pytest.mark.slow

CHAT = [
    {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"what is {i}+{i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ],
    }
    for i in range(6)
]


@flow(name="test-download")
def _download_flow(cfg: DownloadConfig, store_url: str, force: bool = False) -> dict:
    return download(cfg, store_url, force=force).to_dict()


def _outcomes(caplog: pytest.LogCaptureFixture, stage: str) -> list[str]:
    out = []
    for rec in caplog.records:
        if rec.name != "prefect.task_runs":  # the task's outcome line, not the core's
            continue
        msg = rec.getMessage()
        if msg.startswith(f"{stage} ") and (": cached" in msg or ": computed" in msg):
            out.append("cached" if ": cached" in msg else "computed")
    return out


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_download_task_cached_then_forced(prefect_server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = _jsonl(tmp_path / "chat.jsonl", CHAT)
    cfg = DownloadConfig(sources=(SourceSpec(path=src, kind="chat"),))
    root = str(tmp_path / "store")
    store = ArtifactStore(root)

    first = _download_flow(cfg, root)
    t1 = store.manifest("download", first["key"]).created_at
    second = _download_flow(cfg, root)
    assert store.manifest("download", second["key"]).created_at == t1  # nothing rewritten
    forced = _download_flow(cfg, root, force=True)
    assert first["key"] == second["key"] == forced["key"]
    assert store.manifest("download", forced["key"]).created_at > t1
    assert first["counts"] == forced["counts"]
    assert _outcomes(caplog, "download") == ["computed", "cached", "computed"]


def test_no_secret_in_parameters_logs_manifests_or_artifacts(
    prefect_server, s3_root, s3_endpoint, tmp_path, caplog, monkeypatch
):
    canary = f"canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    caplog.set_level(logging.DEBUG)
    src = _jsonl(tmp_path / "chat.jsonl", CHAT)
    cfg = DownloadConfig(sources=(SourceSpec(path=src, kind="chat"),))

    state = _download_flow(cfg, s3_root, return_state=True)
    ref = state.result()
    assert ref["url"].startswith("s3://")

    # every object the run wrote to the bucket
    import boto3

    bucket = s3_root.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys)
    for k in keys:
        assert canary.encode() not in s3.get_object(Bucket=bucket, Key=k)["Body"].read(), k

    # what the Prefect server holds about the run: parameters, logs, artifacts
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run_id = state.state_details.flow_run_id

    async def server_side() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
        assert logs, "the run's logs reached the server"
        assert arts, "the run's artifacts reached the server"
        return json.dumps(
            [
                run.model_dump(mode="json"),
                [r.model_dump(mode="json") for r in runs],
                [x.model_dump(mode="json") for x in logs],
                [a.model_dump(mode="json") for a in arts],
            ]
        )

    server_text = asyncio.run(server_side())
    assert canary not in server_text
    assert "computed" in server_text  # the outcome line is in the run's log
    assert canary not in caplog.text
