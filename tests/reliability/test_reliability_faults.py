"""Fault tests: real processes, real SIGKILLs, a real S3 server on loopback that goes away,
a real full disk, a real crash of one DeepSpeed rank.

What tests/storage already covers is not repeated: atomic publish, SIGKILL + resume of one
sharded write (test_storage_crash.py), concurrent writers of one key inside one process,
permission denied / read-only roots, unknown protocols (test_storage_publish.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from reliability_helpers import REPO, chat_rows, fim_rows, verify_all, write_jsonl

from storage import ArtifactStore, StoreError

pytestmark = pytest.mark.slow


# ---- SIGKILL at >= 10 points across download, tokenize, scan_vocab, extract, train, export --
def test_sigkill_at_random_points_of_every_stage_then_rerun_equals_a_clean_run(
    tmp_path, small_tokenizer_dir, small_target_dir
):
    """tests/reliability/sigkill_driver.py forks the pipeline, kills it at seeded random
    points of each stage, verifies every manifest after each kill, and reruns."""
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "reliability", "sigkill_driver.py"),
         str(tmp_path), small_tokenizer_dir, small_target_dir, "0"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    points = res["points"]
    assert len(points) >= 10
    assert {p["stage"] for p in points} == {
        "download", "tokenize", "scan_vocab", "extract_hidden", "train", "export"
    }  # fmt: skip
    killed = [p for p in points if p["killed"]]
    # a kill may come after a (resumed, so shorter) stage finished; most must land
    assert len(killed) >= 6, points
    for stage in ("download", "tokenize", "extract_hidden", "train"):
        assert any(p["stage"] == stage for p in killed), (stage, points)
    assert any(not p["published_before_kill"] for p in killed)

    clean, rerun = res["clean"], res["killed"]
    # same artifacts: stage and content key of every one
    assert sorted(clean) == sorted(rerun)
    assert {a.split("/")[0] for a in clean} == {p["stage"] for p in points}
    # same bytes, file by file, but for what records when or where it ran
    clean_root, killed_root = str(tmp_path / "clean"), str(tmp_path / "killed")
    for art, files in clean.items():
        stage = art.split("/")[0]
        assert sorted(files) == sorted(rerun[art]), art
        for name, sha in files.items():
            if sha == rerun[art][name]:
                continue
            a = (tmp_path / "clean" / art / name).read_text()
            b = (tmp_path / "killed" / art / name).read_text()
            if stage == "export" and name == "README.md":  # names the training run's URL
                assert a.replace(clean_root, killed_root) == b
            elif stage == "train" and name.endswith("complete.json"):  # created_at
                assert _drop(json.loads(a), "created_at") == _drop(json.loads(b), "created_at")
            elif stage == "train" and name == "metrics.jsonl":  # tokens/s are wall-clock
                assert _metrics(a) == _metrics(b)
            else:
                pytest.fail(f"{art}/{name} differs between the clean and the killed run")
    train = next(a for a in clean if a.startswith("train/"))
    assert clean[train]["final/draft.safetensors"] == rerun[train]["final/draft.safetensors"]


def _drop(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _metrics(text: str) -> list[dict]:
    wall = ("tokens_per_s", "time", "elapsed_s", "step_s", "wall_s", "samples_per_s")
    return [_drop(json.loads(line), *wall) for line in text.splitlines() if line.strip()]


# ---- the S3 server goes away mid-upload and comes back ----------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_server_stops_mid_upload_and_comes_back(tmp_path, monkeypatch):
    """The download stage writes 80 shards to S3; after the 3rd shard's journal entry the
    server stops for 4 s. The stage either rides it out (s3fs/botocore retries) or fails with
    an error and no manifest; a rerun completes and only uploads what was missing."""
    import boto3
    from moto.server import ThreadedMotoServer

    from eagle_core.download import DownloadConfig, SourceSpec, download, download_key

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="outage")
        monkeypatch.setenv("EAGLE_PIPELINE_S3_ENDPOINT", endpoint)
        store = ArtifactStore("s3://outage/root")
        src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(160))
        cfg = DownloadConfig(sources=(SourceSpec(path=src),), shard_size=2, shuffle=False)
        key = download_key(store, cfg)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["ref"] = download(store, cfg)
            except BaseException as exc:  # noqa: BLE001 - judged below
                outcome["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        prefix = f"root/download/{key}/_journal/"
        deadline = time.time() + 120
        while True:
            got = s3.list_objects_v2(Bucket="outage", Prefix=prefix).get("KeyCount", 0)
            if got >= 3 or not t.is_alive():
                break
            assert time.time() < deadline, "no shard journaled in 120 s"
            time.sleep(0.005)
        assert t.is_alive(), "the stage finished before the outage could start"
        server.stop()
        time.sleep(4.0)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # moto keeps its state
        server.start()
        t.join(300)
        assert not t.is_alive()
        if "error" in outcome:
            err = outcome["error"]
            # transient I/O trouble (what the tasks retry and the CLI reports in one line)
            from flows.cli import _is_io_trouble

            assert isinstance(err, StoreError) or _is_io_trouble(err), repr(err)
            assert not store.is_done("download", key)
            journaled = s3.list_objects_v2(Bucket="outage", Prefix=prefix).get("KeyCount", 0)
            assert journaled >= 3  # finished shards survive the failure
        ref = download(store, cfg)  # the rerun (or a cached return)
        assert ref.key == key and store.is_done("download", key)
        assert ref.counts["rows"] == 160 and ref.counts["shards"] == 80
        store.verify(ref)
        logging.getLogger(__name__).info("outage outcome: %s", sorted(outcome))
    finally:
        server.stop()


# ---- two runs of the same stages at once on one root --------------------------------------------
CONCURRENT_DRIVER = """
import contextlib, io, json, sys
from flows.cli import main
store, chat, fim, tok = json.loads(sys.argv[1])
def run(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--store", store]) == 0, argv
    return buf.getvalue().strip().splitlines()[-1]
records = run("download", "--source", chat, "--source", fim)
tokens = run("tokenize", "--records", records, "--tokenizer", tok)
vocab = run("scan-vocab", "--tokens", tokens, "--draft-vocab-size", "64")
print("URLS " + json.dumps([records, tokens, vocab]))
"""


def test_two_runs_of_the_same_stages_at_once_on_one_root(tmp_path, small_tokenizer_dir):
    """Two processes run download -> tokenize -> scan_vocab on the same root at the same
    time. Both finish with the same artifact URLs; every manifest verifies. (Writers of one
    key write temp files named by host+pid and rename them; the manifest is written last,
    so the later writer republishes identical content: see storage/store.py.)"""
    root = str(tmp_path / "root")
    chat = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(24))
    fim = write_jsonl(str(tmp_path / "fim.jsonl"), fim_rows(16))
    args = json.dumps([root, chat, fim, small_tokenizer_dir])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_DRIVER, args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    urls = [json.loads(out.split("URLS ", 1)[1]) for out, _ in outs]
    assert urls[0] == urls[1]
    store = ArtifactStore(root)
    arts = verify_all(store)
    assert {s for s, _ in arts} == {"download", "tokenize", "scan_vocab"} and len(arts) == 3
    leftovers = [p for p in store.fs.find(root) if "/.tmp-" in p or "/_journal/" in p]
    assert leftovers == []


# ---- disk full, file-size limit --------------------------------------------------------------
def _big_chat_rows(n: int) -> list[dict]:
    return [
        {**r, "messages": [r["messages"][0],
                           {"role": "assistant", "content": os.urandom(2000).hex()}]}
        for r in chat_rows(n)
    ]  # fmt: skip


def test_disk_full_is_a_store_error_naming_the_path(tmp_path):
    """A 256 KiB tmpfs as the artifact root (needs root to mount; skipped otherwise)."""
    from eagle_core.download import config_from_options, download

    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        src = write_jsonl(str(tmp_path / "big.jsonl"), _big_chat_rows(200))
        store = ArtifactStore(str(mnt / "root"))
        with pytest.raises(StoreError) as exc:
            download(store, config_from_options([src]))
        msg = str(exc.value)
        assert "disk full" in msg and str(mnt / "root" / "download") in msg and "Fix:" in msg
        assert not store.fs.glob(f"{store.root_path}/download/*/manifest.json")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


FSIZE_DRIVER = """
import resource, sys
from flows.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # ulimit -f: EFBIG past 300 kB
sys.exit(main(["download", "--source", sys.argv[1], "--store", sys.argv[2]]))
"""


def test_file_size_limit_is_a_clear_cli_error_naming_the_path(tmp_path):
    src = write_jsonl(str(tmp_path / "big.jsonl"), _big_chat_rows(200))
    root = str(tmp_path / "root")
    r = subprocess.run([sys.executable, "-c", FSIZE_DRIVER, src, root], cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "file size limit exceeded" in r.stderr and f"{root}/download/" in r.stderr
    assert not ArtifactStore(root).fs.glob(f"{root}/download/*/manifest.json")


# ---- one DeepSpeed rank crashes --------------------------------------------------------------
# Put on PYTHONPATH of the training processes only: in the rank named by
# RELIABILITY_CRASH_RANK, the N-th loss computation raises (a real, unexpected exception in a
# real rank; nothing in eagle_core is patched in the test process).
SITECUSTOMIZE = """
import os
if os.environ.get("RANK") == os.environ.get("RELIABILITY_CRASH_RANK") and os.environ.get("RANK"):
    import eagle_core.loss as _loss
    _real, _calls = _loss.compute_loss, [0]
    def compute_loss(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["RELIABILITY_CRASH_AT_CALL"]):
            raise RuntimeError("injected crash: the GPU fell off the bus")
        return _real(*args, **kwargs)
    _loss.compute_loss = compute_loss
"""


def test_crash_on_one_rank_is_reported_with_its_lines_and_the_rerun_resumes(
    tmp_path, monkeypatch, caplog, small_tokenizer_dir, small_target_dir
):
    from eagle_core import checkpoint as ckpt
    from eagle_core.download import config_from_options, download
    from eagle_core.errors import TrainingError
    from eagle_core.extract import ExtractConfig, extract_hidden
    from eagle_core.launch import launch_training
    from eagle_core.tokenize import TokenizeConfig, tokenize
    from eagle_core.train import TrainConfig, run_directory, train_key
    from eagle_core.vocab import VocabConfig, scan_vocab

    store = ArtifactStore(str(tmp_path / "store"))
    records = download(store, config_from_options([write_jsonl(str(tmp_path / "c.jsonl"),
                                                               chat_rows(16))]))  # fmt: skip
    tokens = tokenize(store, records, TokenizeConfig(tokenizer=small_tokenizer_dir))
    vocab = scan_vocab(store, [tokens], VocabConfig(draft_vocab_size=64))
    hidden = extract_hidden(store, tokens, ExtractConfig(target=small_target_dir, batch_size=8))
    cfg = TrainConfig(
        store=store.root, target=small_target_dir, data=(hidden.url,), vocab_map=vocab.url,
        steps=3, batch_size=1, ttt_steps=2, heldout_fraction=0.0, checkpoint_every=1,
        keep_checkpoints=5, log_every=1,
    )  # fmt: skip
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), REPO]))
    monkeypatch.setenv("RELIABILITY_CRASH_RANK", "1")
    monkeypatch.setenv("RELIABILITY_CRASH_AT_CALL", "3")  # step 3: steps 1-2 are checkpointed
    caplog.set_level(logging.INFO)
    with pytest.raises(TrainingError) as exc:
        launch_training(cfg, nproc=2, launcher="torchrun")
    msg = str(exc.value)
    assert re.search(r"rank 1 failed", msg), msg
    assert "injected crash: the GPU fell off the bus" in msg  # rank 1's own last lines
    assert "Fix:" in msg
    key = train_key(store, cfg)
    assert not store.is_done("train", key)
    latest = ckpt.find_latest_complete(run_directory(store, key))
    assert latest is not None and latest.endswith(ckpt.checkpoint_tag(2)), latest

    monkeypatch.delenv("RELIABILITY_CRASH_RANK")
    caplog.clear()
    ref = launch_training(cfg, nproc=2, launcher="torchrun")
    assert ref.key == key and store.is_done("train", key)
    assert ref.counts["steps"] == 3
    assert re.search(r"resumed from \S*step-00000002 \(step 2", caplog.text), caplog.text[-3000:]
    store.verify(ref)


def test_unreachable_s3_endpoint_is_a_clear_cli_error(tmp_path):
    """Nothing listens on the endpoint (the outage outlasted every retry): the CLI says what
    failed and that a rerun is safe, exits 3 (transient), and prints no traceback."""
    src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(2))
    env = {**os.environ, "EAGLE_PIPELINE_S3_ENDPOINT": f"http://127.0.0.1:{_free_port()}",
           "AWS_MAX_ATTEMPTS": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "flows.cli", "download", "--source", src,
                        "--store", "s3://down/root"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "storage or network error" in r.stderr and "rerun" in r.stderr and "Fix:" in r.stderr
