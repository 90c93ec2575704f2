"""`eagle-pipeline` stage subcommands chained the way a shell user chains them: each one's
last stdout line is the artifact URL the next one takes; errors exit 2 with the fix."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from storage import ArtifactStore

pytestmark = pytest.mark.slow

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"Name item {i}."},
            {"role": "assistant", "content": f"Item {i} is called thing_{i}."},
        ]
    }
    for i in range(12)
]


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    assert out, "nothing on stdout"
    return out[-1]


def test_download_tokenize_scan_vocab_chain(tmp_path, capsys, small_tokenizer_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    root = str(tmp_path / "store")

    assert main(["download", "--store", root, "--source", str(data), "--kind", "chat"]) == 0
    records = _last_line(capsys)
    assert records.startswith(root + "/download/")

    assert (
        main(
            [
                "tokenize",
                "--store",
                root,
                "--records",
                records,
                "--tokenizer",
                small_tokenizer_dir,
                "--format",
                "chat",
                "--max-length",
                "64",
            ]
        )
        == 0
    )
    tokens = _last_line(capsys)
    assert tokens.startswith(root + "/tokenize/")

    assert (
        main(["scan-vocab", "--store", root, "--tokens", tokens, "--draft-vocab-size", "32"]) == 0
    )
    vocab = _last_line(capsys)
    store, stage, key = ArtifactStore.for_url(vocab)
    assert stage == "scan_vocab" and store.ref(stage, key).counts["draft_vocab_size"] == 32

    # same inputs: the same URL again (cached), nothing new
    assert (
        main(["scan-vocab", "--store", root, "--tokens", tokens, "--draft-vocab-size", "32"]) == 0
    )
    assert _last_line(capsys) == vocab


def test_cli_errors_exit_2_with_the_fix(tmp_path, capsys):
    root = str(tmp_path / "store")
    # the form's limits apply to the command line too
    assert (
        main(
            [
                "scan-vocab",
                "--store",
                root,
                "--tokens",
                f"{root}/tokenize/abc",
                "--draft-vocab-size",
                "0",
            ]
        )
        == 2
    )
    assert "draft_vocab_size" in capsys.readouterr().err
    # an artifact of the wrong stage is named, with what to pass instead
    assert (
        main(["tokenize", "--store", root, "--records", f"{root}/tokenize/abc", "--tokenizer", "x"])
        == 2
    )
    err = capsys.readouterr().err
    assert "expected 'download'" in err and "Fix:" in err
    with pytest.raises(SystemExit) as exc:  # argparse: a closed choice
        main(["train", "--store", root, "--data", "x", "--target", "t", "--zero-stage", "5"])
    assert exc.value.code == 2
