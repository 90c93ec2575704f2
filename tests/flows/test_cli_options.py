"""The stage subcommands' options reach the stage configs: each one is run through
`flows.cli.main` on a tiny local input and read back from the artifact's manifest
(params / meta) or output; bad values exit 2 naming the option."""

from __future__ import annotations

import json

import pytest

import eagle_core.tokenize as tokenize_mod
from flows.cli import main
from storage import ArtifactStore

CHAT = [
    {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"Name item {i}."},
            {"role": "assistant", "content": f"Item {i} is thing_{i}.", "reasoning": "think"},
            {"role": "user", "content": "And again?"},
            {"role": "assistant", "content": f"Still thing_{i}."},
        ],
    }
    for i in range(6)
]
FIM = [
    {"id": f"f{i}", "prefix": f"def f{i}(x):\n", "middle": "    y = x\n", "suffix": "  return y\n"}
    for i in range(4)
]
CODE_FILE = {"id": "file0", "content": "\n".join(f"x{i} = {i}" for i in range(30)) + "\n"}
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.strip().splitlines()[-1]


def _manifest(url: str):
    store, stage, key = ArtifactStore.for_url(url)
    return store.manifest(stage, key)


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Fix:" in err or "invalid" in err
    return err


def test_download_options_reach_the_config(tmp_path, capsys):
    root = str(tmp_path / "store")
    src = _jsonl(tmp_path / "code.jsonl", [CODE_FILE, *FIM])
    url = _run(capsys, "download", "--store", root, "--source", src, "--kind", "fim",
               "--config", "python", "--revision", "v1.2", "--fim-split", "chars",
               "--no-shuffle")  # fmt: skip
    m = _manifest(url)
    (spec,) = m.params["sources"]
    assert spec["config"] == "python" and spec["revision"] == "v1.2"
    assert m.params["fim_split"] == "chars" and m.meta["fim_split"] == "chars"
    assert m.params["shuffle"] is False and m.meta["streamed"] is True
    # file order kept (no shuffle): the whole file first, then the FIM records
    store, stage, key = ArtifactStore.for_url(url)
    from storage.shards import iter_batches

    ids = [
        r["sample_id"] for b in iter_batches(store, store.ref(stage, key)) for r in b.to_pylist()
    ]
    assert ids == [f"{src}/{r['id']}" for r in [CODE_FILE, *FIM]]
    # the defaults: shuffled, lines, no config / revision
    url2 = _run(capsys, "download", "--store", root, "--source", src, "--kind", "fim")
    m2 = _manifest(url2)
    assert url2 != url and m2.params["shuffle"] is True and m2.params["fim_split"] == "lines"
    assert m2.params["sources"][0]["config"] is None
    with pytest.raises(SystemExit) as exc:  # a closed choice
        main(["download", "--store", root, "--source", src, "--fim-split", "words"])
    assert exc.value.code == 2


@pytest.fixture
def records_url(tmp_path, capsys) -> tuple[str, str]:
    root = str(tmp_path / "store")
    src = _jsonl(tmp_path / "mix.jsonl", [*CHAT, *FIM])
    return root, _run(capsys, "download", "--store", root, "--source", src, "--no-shuffle")


def test_tokenize_options_reach_the_config(records_url, tmp_path, capsys, small_tokenizer_dir):
    root, records = records_url
    base = ["tokenize", "--store", root, "--records", records, "--tokenizer",
            small_tokenizer_dir, "--format", "auto", "--max-length", "96"]  # fmt: skip
    plain = _manifest(_run(capsys, *base))
    assert plain.params["chat_template"] is None and plain.params["keep_reasoning"] is True
    assert plain.meta["fim_family"] == "starcoder"

    tmpl = tmp_path / "chatml.jinja"
    tmpl.write_text(TEMPLATE)
    url = _run(capsys, *base, "--chat-template", str(tmpl), "--chat-mask", "offsets",
               "--last-turn-only", "--no-reasoning", "--fim-tokens", "starcoder")  # fmt: skip
    m = _manifest(url)
    assert m.params["chat_template"] == TEMPLATE  # the file's text: the key follows its content
    assert m.params["chat_mask"] == "offsets" and m.meta["chat_mask"] == "offsets"
    assert m.params["last_turn_only"] is True and m.params["keep_reasoning"] is False
    assert m.params["fim_tokens"] == ["<fim_prefix>", "<fim_suffix>", "<fim_middle>",
                                      "<|endoftext|>"]  # fmt: skip
    assert m.meta["fim_family"] == "explicit"
    # last-turn-only masks fewer tokens than every answer
    assert m.counts["masked_tokens"] < plain.counts["masked_tokens"]

    explicit = "<fim_prefix>,<fim_suffix>,<fim_middle>,<|endoftext|>"
    m3 = _manifest(_run(capsys, *base, "--fim-tokens", explicit, "--no-keep-reasoning"))
    assert m3.params["fim_tokens"] == explicit.split(",") and m3.params["keep_reasoning"] is False


@pytest.mark.slow  # a worker process starts (~9 s on 2 busy cores)
def test_tokenize_num_proc_is_passed_on(records_url, capsys, small_tokenizer_dir, monkeypatch):
    root, records = records_url
    seen: list[int] = []
    real = tokenize_mod.tokenize

    def spy(*args, **kwargs):  # the real stage runs; only the argument is recorded
        seen.append(kwargs["num_proc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize_mod, "tokenize", spy)
    base = ["tokenize", "--store", root, "--records", records, "--tokenizer",
            small_tokenizer_dir, "--format", "auto", "--max-length", "64"]  # fmt: skip
    one = _run(capsys, *base)
    two = _run(capsys, *base, "--num-proc", "2", "--force")
    assert seen == [1, 2]
    assert one == two  # not part of the key: same artifact, recomputed


def test_tokenize_bad_options_exit_2(records_url, tmp_path, capsys, small_tokenizer_dir):
    root, records = records_url
    base = ["tokenize", "--store", root, "--records", records, "--tokenizer",
            small_tokenizer_dir, "--format", "auto"]  # fmt: skip
    assert "--num-proc=0" in _fails(capsys, *base, "--num-proc", "0")
    err = _fails(capsys, *base, "--fim-tokens", "nosuchfamily")
    assert "--fim-tokens" in err and "starcoder" in err
    assert "fim_tokens" in _fails(capsys, *base, "--fim-tokens", "<a>,<b>,<c>,<d>")
    assert "no such file" in _fails(capsys, *base, "--chat-template", str(tmp_path / "x.jinja"))
    (tmp_path / "empty.jinja").write_text(" \n")
    assert "is empty" in _fails(capsys, *base, "--chat-template", str(tmp_path / "empty.jinja"))
    with pytest.raises(SystemExit) as exc:
        main([*base, "--chat-mask", "tokens"])
    assert exc.value.code == 2


def test_scan_vocab_target_vocab_size(records_url, capsys, small_tokenizer_dir):
    root, records = records_url
    tokens = _run(capsys, "tokenize", "--store", root, "--records", records, "--tokenizer",
                  small_tokenizer_dir, "--max-length", "64")  # fmt: skip
    v = len(__import__("transformers").AutoTokenizer.from_pretrained(small_tokenizer_dir))
    url = _run(capsys, "scan-vocab", "--store", root, "--tokens", tokens,
               "--draft-vocab-size", "32", "--target-vocab-size", str(v + 64))  # fmt: skip
    m = _manifest(url)
    assert m.params["target_vocab_size"] == v + 64
    from eagle_core.vocab import VocabMap

    store, stage, key = ArtifactStore.for_url(url)
    with __import__("tempfile").TemporaryDirectory() as d:
        vm = VocabMap.load(store.local_copy(store.ref(stage, key), "vocab_map.safetensors", d))
    assert vm.vocab_size == v + 64 and vm.draft_vocab_size == 32
    err = _fails(capsys, "scan-vocab", "--store", root, "--tokens", tokens,
                 "--target-vocab-size", "0")  # fmt: skip
    assert "target_vocab_size" in err


def test_export_include_embeddings_flag(tmp_path, capsys, small_target_dir):
    """--include-embeddings / --no-include-embeddings reach ExportConfig; without either the
    layout decides (speculators: yes, eagle3: no)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from eagle_core.draft import DraftConfig, build_draft
    from eagle_core.models import load_target

    root = str(tmp_path / "store")
    store = ArtifactStore(root)
    model = load_target(small_target_dir)
    torch.manual_seed(0)
    cfg = DraftConfig.from_target_config(model.config, draft_vocab_size=256)
    draft = build_draft(cfg, target_model=model)
    with store.publish("train", "run") as w:
        w.write_file("final/draft.safetensors", lambda p: save_file(dict(draft.state_dict()), p))
        w.write_json("final/draft_config.json", cfg.to_dict())
        w.meta.update(target=small_target_dir)
    base = ["export", "--store", root, "--train", store.url("train", "run")]

    def embeds(*extra: str) -> bool:
        url = _run(capsys, *base, *extra)
        s, stage, key = ArtifactStore.for_url(url)
        path = s.local_copy(s.ref(stage, key), "model.safetensors", str(tmp_path / key))
        with safe_open(path, framework="pt") as fh:
            return "embed_tokens.weight" in fh.keys()  # noqa: SIM118

    assert embeds() is False  # eagle3 default
    assert embeds("--include-embeddings") is True
    assert embeds("--format", "speculators") is True  # the speculators default
    assert embeds("--format", "speculators", "--no-include-embeddings") is False
