"""A credential typed into a URL argument of a stage subcommand (`--store`, `--source`,
`--records`) appears nowhere: not in the error text, not in any log record (caplog, with
-v debug logging), not on stdout or stderr, also when run as a real process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid

import pytest
from reliability_helpers import REPO, chat_rows, write_jsonl

from flows.cli import main


@pytest.fixture
def canary() -> str:
    return f"canary{uuid.uuid4().hex}"


def _run(argv: list[str], capsys, caplog) -> tuple[int, str]:
    caplog.set_level(logging.DEBUG)
    rc = main(["-v", *argv])
    out, err = capsys.readouterr()
    return rc, "\n".join([out, err, caplog.text, *(r.getMessage() for r in caplog.records)])


def test_s3_store_with_credentials(tmp_path, capsys, caplog, canary) -> None:
    src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(3))
    for store in (f"s3://AKIAEXAMPLE:{canary}/x+y@bucket/p", f"s3://bucket/p?token={canary}"):
        rc, text = _run(["download", "--store", store, "--source", src], capsys, caplog)
        assert rc == 2 and "carries credentials" in text and "Fix:" in text
        assert canary not in text, store
        caplog.clear()


def test_http_store_source_and_records_with_credentials(tmp_path, capsys, caplog, canary):
    """Nothing listens on port 9: the CLI reports storage / network trouble or a missing
    artifact, naming the URL with its credentials masked."""
    src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(3))
    local = str(tmp_path / "store")
    cases = [
        # a (read-only) http root with basic auth, used to write: refused by the server side
        (["download", "--store", f"https://u:{canary}@127.0.0.1:9/root", "--source", src],
         (3,)),
        # a signed data URL
        (["download", "--store", local, "--source",
          f"https://127.0.0.1:9/data.jsonl?X-Amz-Signature={canary}&v=1"], (2, 3)),
        # an artifact URL on an http root with a token as the user name
        (["tokenize", "--store", local, "--tokenizer", "t", "--records",
          f"https://{canary}@127.0.0.1:9/root/download/abc"], (2, 3)),
    ]  # fmt: skip
    for argv, codes in cases:
        rc, text = _run(argv, capsys, caplog)
        assert rc in codes, text[-2000:]
        assert "***" in text and "Fix:" in text
        assert canary not in text, argv
        caplog.clear()


def test_a_published_artifact_url_is_printed_masked(tmp_path, capsys, caplog, canary):
    """A store root that works with credentials in it (memory:// takes any name): the stage
    runs, and stdout's URL (what the next command would take) is masked, with a note."""
    src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(3))
    store = f"memory://user:{canary}@bucket{uuid.uuid4().hex[:6]}/root"
    rc, text = _run(["download", "--store", store, "--source", src], capsys, caplog)
    assert rc == 0, text[-2000:]
    assert "/download/" in capsys_out(text) and "credentials masked" in text
    assert canary not in text
    # a query string cannot be part of a root (stage/key are appended after it)
    rc, text = _run(["download", "--store", f"https://h/root?sig={canary}", "--source", src],
                    capsys, caplog)  # fmt: skip
    assert rc == 2 and "query string" in text and "sig=***" in text and canary not in text


def capsys_out(text: str) -> str:
    """The stdout part of _run's text (its first block)."""
    return text.split("\n", 1)[0]


@pytest.mark.slow  # a real process (~5 s): the root handler of -v prints to the real stderr
def test_subprocess_stderr_with_debug_logging(tmp_path, canary) -> None:
    src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(3))
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "-v", "download", "--source", src,
         "--store", f"https://u:{canary}@127.0.0.1:9/root"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    assert "DEBUG" in r.stderr and "https://***@127.0.0.1:9/root" in r.stderr
    assert canary not in r.stdout and canary not in r.stderr
