"""Security: no secret leaks, no remote code unless asked, no path escapes the artifact root.

The Prefect side (flow-run parameters, logs and artifacts on a real Prefect server) is
tested in tests/tasks/test_task_stages.py::test_no_secret_in_parameters_logs_manifests_or_artifacts;
here the stages run as the CLI in subprocesses with debug logging, against a real S3 API
server on loopback, with canary values in every credential variable.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import pytest
from reliability_helpers import REPO, chat_rows, fim_rows, write_jsonl

from eagle_core.errors import ConfigError
from storage import ArtifactError, ArtifactStore

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "OPENAI_API_KEY",
               "EAGLE_API_KEY", "WANDB_API_KEY")  # fmt: skip

# the CLI's main() once per stage in one interpreter (each torch start costs ~10 s here)
CLI_DRIVER = """
import contextlib, io, json, sys
from flows.cli import main
store, src, tok, tgt, missing = json.loads(sys.argv[1])
def run(rc_want, *argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["-v", *argv, "--store", store])
    sys.stdout.write(buf.getvalue())
    assert rc == rc_want, (argv, rc)
    return buf.getvalue().strip().splitlines()[-1] if rc == 0 else ""
records = run(0, "download", "--source", src)
tokens = run(0, "tokenize", "--records", records, "--tokenizer", tok)
run(0, "scan-vocab", "--tokens", tokens, "--draft-vocab-size", "64")
run(0, "extract", "--tokens", tokens, "--target", tgt)
run(2, "tokenize", "--records", records, "--tokenizer", missing)
print("ALL-DONE")
"""


def _bucket_objects(s3_endpoint: str, root: str) -> dict[str, bytes]:
    import boto3

    bucket = root.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


@pytest.mark.slow
def test_canary_secrets_appear_in_no_log_manifest_or_artifact(
    tmp_path, s3_root, s3_endpoint, small_tokenizer_dir, small_target_dir
):
    canaries = {v: f"canary{i}-{uuid.uuid4().hex}" for i, v in enumerate(SECRET_VARS)}
    # moto accepts any secret key: the canary is the credential the S3 client really signs with
    env = {**canaries, "AWS_ACCESS_KEY_ID": "testing", "EAGLE_PIPELINE_S3_ENDPOINT": s3_endpoint}
    src = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(6))
    args = json.dumps([s3_root, src, small_tokenizer_dir, small_target_dir, str(tmp_path / "no")])
    r = subprocess.run(
        [sys.executable, "-c", CLI_DRIVER, args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )
    assert r.returncode == 0 and "ALL-DONE" in r.stdout, r.stderr[-3000:]
    outputs = [r.stdout, r.stderr]

    objects = _bucket_objects(s3_endpoint, s3_root)
    manifests = [k for k in objects if k.endswith("manifest.json")]
    assert len(manifests) == 4, sorted(objects)
    assert "DEBUG" in r.stderr  # -v worked
    for name, value in canaries.items():
        for text in outputs:
            assert value not in text, f"{name} leaked into the CLI output"
        for key, body in objects.items():
            assert value.encode() not in body, f"{name} leaked into s3 object {key}"


def test_credentials_in_a_url_parameter_are_refused_and_not_echoed(capsys):
    """A credential typed into the run form's root URL is refused; the error does not
    repeat it (stderr of the CLI ends up in CI logs)."""
    from flows.cli import main

    secret = f"c{uuid.uuid4().hex[:8]}"  # short: pydantic elides the middle of long inputs
    rc = main(["run", "--store", f"s3://AKIAXXXX:{secret}@bucket/p"])
    err = capsys.readouterr().err
    assert rc == 2 and "credentials" in err and "storage.root" in err
    assert secret not in err


# ---- remote code ----------------------------------------------------------------------------
def _custom_code_repo(src_dir: str, dest: pathlib.Path, marker: pathlib.Path) -> str:
    """A copy of a model dir whose config asks for its own (marker-writing) Python code."""
    shutil.copytree(src_dir, dest)
    (dest / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
    )
    (dest / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaForCausalLM\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    cfg = json.loads((dest / "config.json").read_text())
    cfg["model_type"] = "evil_llama"
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


def test_remote_code_never_runs_through_the_stages(tmp_path, small_target_dir, small_tokenizer_dir):
    from eagle_core.download import config_from_options, download
    from eagle_core.extract import ExtractConfig, extract_hidden
    from eagle_core.tokenize import TokenizeConfig, tokenize

    marker = tmp_path / "remote_code_ran"
    repo = _custom_code_repo(small_target_dir, tmp_path / "evil", marker)
    store = ArtifactStore(str(tmp_path / "store"))
    records = download(store, config_from_options([write_jsonl(str(tmp_path / "c.jsonl"),
                                                               chat_rows(4))]))  # fmt: skip
    tokens = tokenize(store, records, TokenizeConfig(tokenizer=small_tokenizer_dir))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        extract_hidden(store, tokens, ExtractConfig(target=repo))
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default_everywhere():
    """Every function that takes `trust_remote_code` defaults it to False, no config or form
    field turns it on by default, and no call passes a literal True."""
    import dataclasses
    import importlib
    import pkgutil

    import eagle_core

    mods = [importlib.import_module(f"eagle_core.{m.name}")
            for m in pkgutil.iter_modules(eagle_core.__path__) if not m.ispkg]  # fmt: skip
    seen = 0
    for mod in mods:
        for _, obj in inspect.getmembers(mod):
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                p = inspect.signature(obj).parameters.get("trust_remote_code")
                if p is not None:
                    seen += 1
                    assert p.default is False, f"{mod.__name__}.{obj.__name__}"
            if dataclasses.is_dataclass(obj) and isinstance(obj, type):
                for f in dataclasses.fields(obj):
                    if "remote_code" in f.name:
                        assert f.default is False, f"{obj.__name__}.{f.name}"
    assert seen >= 1
    for folder in ("eagle_core", "tasks", "flows"):
        for path in pathlib.Path(REPO, folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                    is_true = isinstance(node.value, ast.Constant) and node.value.value is True
                    assert not is_true, f"{path}: trust_remote_code=True"


# ---- paths built from data --------------------------------------------------------------------
def test_sample_ids_and_dataset_names_cannot_escape_the_artifact_root(tmp_path):
    """Ids and source labels full of `../` and `/` stay data: every file the stages write is
    under the root; names built from them are refused by the store (tests/storage:
    test_path_escaping_names_refused covers the store's own check)."""
    from eagle_core.download import DownloadConfig, SourceSpec, download
    from storage.shards import iter_batches

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    rows = [{**r, "id": f"../../outside/{r['id']}"} for r in chat_rows(3)]
    rows += [{**r, "id": f"/etc/{r['id']}"} for r in fim_rows(3)]
    src = write_jsonl(str(tmp_path / "data.jsonl"), rows)
    store = ArtifactStore(str(root))
    cfg = DownloadConfig(sources=(SourceSpec(path=src, label="../../outside/evil"),))
    ref = download(store, cfg)
    assert list(outside.iterdir()) == []
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(root in p.parents or p == pathlib.Path(src) for p in written), written
    ids = [
        i for b in iter_batches(store, ref, columns=["sample_id"]) for i in b.column(0).to_pylist()
    ]
    assert len(ids) == 6 and any("../../outside" in i for i in ids)  # kept as data, not paths
    for bad in ("../../outside/x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ArtifactError, match="not a safe relative name"):
            store.path("download", ref.key, bad)
        with pytest.raises(ArtifactError):
            store.path(bad, ref.key)
    with pytest.raises(ArtifactError):
        ArtifactStore.for_url(str(root / "download" / ".."))
    assert os.listdir(outside) == []
