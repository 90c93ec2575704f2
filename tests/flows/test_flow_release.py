"""The release stage inside the retrain flow, against a real Prefect server and moto S3, and
the `eagle-pipeline release` commands.

The target is `constant_target(300)` (tests/release_models.py: greedy decoding emits token
300 everywhere), so a release of `constant_draft(300)` accepts every proposal, and a draft
trained for one step accepts next to none: "a worse draft is kept" is measured, not hoped
for. Sequence on one bucket: the first run promotes its draft; a hand promotion (the
rollback command) makes the constant draft current; a run with a one-step draft keeps it,
completes with "kept the current release: τ ... < ... − 0.1" as its state message, a
WARNING line and the comparison artifact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHATS = [
    {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"Write a function that adds {i}."},
            {"role": "assistant", "content": f"def add_{i}(x):\n    return x + {i}\n"},
        ],
    }
    for i in range(12)
]
FIMS = [
    {"id": f"f{i}", "prefix": f"def f{i}(a):\n    ", "middle": f"return a * {i}", "suffix": "\n"}
    for i in range(12)
]


def test_scheduled_deployments_name_their_release():
    """Every deployment's parameters are a valid run form; the scheduled ones release."""
    from flows.params import PipelineParams

    doc = yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())
    scheduled = 0
    for dep in doc["deployments"]:
        params = PipelineParams.model_validate(dep.get("parameters") or {})
        if dep.get("schedules"):
            scheduled += 1
            assert params.release.enabled and params.release.name != "", dep["name"]
    assert scheduled >= 2


@pytest.fixture(scope="module")
def bucket_root(s3_endpoint: str) -> Iterator[str]:
    import boto3
    import fsspec

    bucket = f"release-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EAGLE_PIPELINE_S3_ENDPOINT", s3_endpoint)
        fsspec.config.conf.pop("s3", None)
        yield f"s3://{bucket}/artifacts"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    return {a.key: a for a in asyncio.run(read()) if a.key}


def _run_log_line(flow_run_id: Any, prefix: str, timeout_s: float = 30.0) -> Any:
    """The first log line of the flow run starting with `prefix`, read from the server (logs
    are shipped in batches, so it may take a moment to arrive)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )

    deadline = time.monotonic() + timeout_s
    while True:
        logs = asyncio.run(read())
        found = [x for x in logs if x.message.startswith(prefix)]
        if found or time.monotonic() > deadline:
            assert found, [x.message[:100] for x in logs][-20:]
            return found[0]
        time.sleep(1.0)


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> list[str]:
    from flows.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.strip().splitlines()


@pytest.mark.slow
def test_release_in_the_retrain_flow(
    prefect_server, bucket_root, small_target_dir, small_tokenizer_dir, tmp_path, capsys
):
    from eagle_core.release import history, promote
    from flows.retrain import retrain
    from storage import ArtifactStore
    from tests.release_models import STEPS, constant_draft, constant_target

    target = constant_target(small_target_dir, str(tmp_path / "t300"), 300)
    params = {
        "target": target,
        "tokenizer": small_tokenizer_dir,
        "data": {
            "datasets": [
                {"path": _jsonl(tmp_path / "chat.jsonl", CHATS), "kind": "chat"},
                {"path": _jsonl(tmp_path / "fim.jsonl", FIMS), "kind": "fim"},
            ]
        },
        "evaluate": {
            "prompts": [_jsonl(tmp_path / "heldout.jsonl", CHATS[:2] + FIMS[:2])],
            "steps": STEPS,
        },
        "release": {"name": "serving", "tolerance": 0.1},
        "quick": True,
        "storage": {"root": bucket_root},
    }
    store = ArtifactStore(bucket_root)

    # 1. no release yet: the first draft is promoted, and the UI says so
    first = retrain(**params, return_state=True)
    assert first.is_completed(), first
    r1 = first.result()
    rel = r1["release"]
    assert rel["promoted"] and rel["action"] == "promote" and rel["name"] == "serving"
    assert rel["reason"].startswith("promoted: first release (τ ")
    assert rel["export_url"] == r1["export_url"]
    assert first.message == f"release serving: {rel['reason']}"
    arts = _run_artifacts(first.state_details.flow_run_id)
    assert "release-decision" in arts, sorted(arts)
    assert "first release" in str(arts["release-decision"].data)
    pointer = json.loads(store.fs.cat_file(f"{store.root_path}/releases/serving/current.json"))
    assert pointer["export_url"] == r1["export_url"]
    assert pointer["flow_run_id"] == str(first.state_details.flow_run_id)
    assert pointer["keys"]["train"] and pointer["keys"]["download"]
    if hasattr(store, "lineage_fingerprints"):  # the stages record input fingerprints
        assert pointer["fingerprints"]["target"]["digest"]
        assert len(pointer["fingerprints"]["data"]) == 3  # chat, FIM, held-out prompts

    # 2. a hand promotion: the constant draft of this target (the CLI's is tested below; it
    # configures the root logger, so it runs after the log lines are checked)
    best = constant_draft(store, target, 300)
    assert promote(store, "serving", best.url)["action"] == "manual"

    # 3. a deliberately worse draft (one training step): kept out, and the run says why
    worse = retrain(**{**params, "train": {"steps": 1}}, return_state=True)
    assert worse.is_completed(), worse
    r2 = worse.result()
    rel = r2["release"]
    assert r2["export_url"] != r1["export_url"]
    assert rel["action"] == "keep" and not rel["promoted"], rel
    assert rel["tau_current"] > 3.0 and rel["tau_new"] < rel["tau_current"] - 0.1
    assert rel["reason"] == (
        f"kept the current release: τ {rel['tau_new']:.2f} < {rel['tau_current']:.2f} − 0.1"
    )
    assert rel["export_url"] == best.url  # still what serving reads
    assert worse.message == f"release serving: {rel['reason']}"
    # the run's own log (what the UI shows): a WARNING, not a silent success
    line = _run_log_line(worse.state_details.flow_run_id, "retrain: release serving: kept")
    assert line.level == logging.WARNING and rel["reason"] in line.message
    table = str(_run_artifacts(worse.state_details.flow_run_id)["release-decision"].data)
    assert f"{rel['tau_new']:.3f}" in table and f"{rel['tau_current']:.3f}" in table
    assert "acceptance @1" in table and "kept the current release" in table

    # the CLI: the current export URL is the last stdout line of show and history
    shown = _cli(capsys, "release", "show", "serving", "--store", bucket_root)
    assert shown[-1] == best.url and any("manual promotion by" in x for x in shown)
    lines = _cli(capsys, "release", "history", "serving", "--store", bucket_root)
    assert lines[-1] == best.url
    actions = [ln.split()[2] for ln in lines[:-1] if not ln.startswith(" ")]
    assert actions == ["promote", "manual", "keep"]
    assert "kept the current release" in "\n".join(lines)
    # rollback to the first run's draft
    argv = ["release", "promote", "serving", "--export", r1["export_url"], "--reason", "rollback"]
    assert _cli(capsys, *argv, "--store", bucket_root)[-1] == r1["export_url"]
    shown = _cli(capsys, "release", "show", "serving", "--store", bucket_root)
    assert shown[-1] == r1["export_url"]
    last = history(store, "serving")[-1]
    assert (last["action"], last["reason"], last["tau"]) == ("manual", "rollback", r1["tau"])


def test_run_command_release_options():
    from flows.cli import build_parser

    ns = build_parser().parse_args(["run", "--release", "llama-chat", "--no-release-stage"])
    assert (ns.release, ns.release_enabled) == ("llama-chat", False)
    ns = build_parser().parse_args(["run"])
    assert (ns.release, ns.release_enabled) == (None, None)  # the config's values stay
    for action in ("show", "history"):
        ns = build_parser().parse_args(["release", action, "r1", "--store", "/s"])
        assert (ns.name, ns.store) == ("r1", "/s")
    ns = build_parser().parse_args(["release", "promote", "r1", "--export", "/s/export/k"])
    assert ns.export == "/s/export/k"


def test_release_show_without_release_exits_2(tmp_path, capsys):
    from flows.cli import main

    rc = main(["release", "show", "nothing-yet", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "has no promoted export yet" in err and "release promote" in err
    rc = main(["release", "show", "../x", "--store", str(tmp_path / "s")])
    assert rc == 2 and "release name" in capsys.readouterr().err
