"""`eagle-pipeline evaluate --prompts s3://...` reads prompt files from a real S3 API server
(moto, loopback) through `$EAGLE_PIPELINE_S3_ENDPOINT`, the variable the artifact store
uses: the bucket exists only there, so a read that ignored it could not find the file."""

from __future__ import annotations

import json

import boto3
import pytest

from flows.cli import main
from storage import ArtifactStore

pytestmark = pytest.mark.slow  # the small target decodes a few prompts (~10 s)

CHAT = {
    "id": "c1",
    "messages": [
        {"role": "user", "content": "Write add(a, b)."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
}
FIM = {"id": "f1", "prefix": "def add(a, b):\n    ", "middle": "return a + b", "suffix": "\n"}


def test_evaluate_reads_s3_prompts_through_the_store_endpoint(
    tmp_path,
    capsys,
    s3_root,
    s3_endpoint,
    small_target_dir,
    small_tokenizer_dir,
    export_untrained_draft,
):
    bucket = s3_root.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="heldout/chat.jsonl", Body=json.dumps(CHAT) + "\n")
    s3.put_object(Bucket=bucket, Key="heldout/fim.jsonl", Body=json.dumps(FIM) + "\n")
    root = str(tmp_path / "store")
    exp = export_untrained_draft(ArtifactStore(root), small_target_dir).url
    base = ["evaluate", "--store", root, "--export", exp, "--target", small_target_dir,
            "--tokenizer", small_tokenizer_dir, "--max-prompts", "1", "--max-new-tokens", "6",
            "--steps", "2"]  # fmt: skip

    rc = main([*base, "--prompts", f"s3://{bucket}/heldout/chat.jsonl"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    store, stage, key = ArtifactStore.for_url(out.strip().splitlines()[-1])
    report = store.read_json(store.ref(stage, key), "report.json")
    assert set(report["kinds"]) == {"chat"} and report["all"]["prompts"] == 1

    # a directory of prompt files on S3: every .jsonl in it, in name order
    rc = main([*base, "--prompts", f"s3://{bucket}/heldout/"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    store, stage, key = ArtifactStore.for_url(out.strip().splitlines()[-1])
    report = store.read_json(store.ref(stage, key), "report.json")
    assert set(report["kinds"]) == {"chat", "fim"}

    # a missing S3 file is a clear error naming it, not a network error
    rc = main([*base, "--prompts", f"s3://{bucket}/heldout/nope.jsonl"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.jsonl does not exist" in err and "Fix:" in err
