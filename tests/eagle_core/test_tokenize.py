"""tokenize: exact masks on real BPE tokenizers, FIM families and orders, truncation, rejects."""

from __future__ import annotations

import json

import pytest
from mask_runs import masked_runs
from transformers import AutoTokenizer

from eagle_core.download import DownloadConfig, SourceSpec, download
from eagle_core.errors import ConfigError, DataError
from eagle_core.tokenize import TokenizeConfig, samples, tokenize, truncate_fim_pieces
from storage import ArtifactStore

CHATS = [
    {
        "id": "multi",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "squares"},
            {"role": "assistant", "content": "for i in range(10):\n    print(i * i)\n"},
        ],
    },
    {
        "id": "share",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "Très bien — 世界"},
        ],
    },
]
FIMS = [
    {
        "id": f"f{i}",
        "prefix": "def add(a, b):\n",
        "middle": f"    return a + b + {i}\n",
        "suffix": "\nprint(add(1, 2))\n",
    }
    for i in range(6)
]
END = {"starcoder": "<|endoftext|>", "qwen": "<|endoftext|>", "codellama": "<EOT>"}
SENT = {
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    "codellama": ("<PRE>", "<SUF>", "<MID>"),
}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def records(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    src = write_jsonl(tmp_path / "mix.jsonl", CHATS + FIMS)
    ref = download(store, DownloadConfig(sources=(SourceSpec(path=src, label="m"),), shuffle=False))
    return store, ref


@pytest.mark.parametrize("family", ["starcoder", "qwen", "codellama"])
@pytest.mark.parametrize("order", ["psm", "spm"])
def test_every_sample_masks_exactly_answers_and_middles(
    records, bpe_tokenizer_factory, family, order
):
    store, rec = records
    tdir = bpe_tokenizer_factory(family, "chatml")
    tok = AutoTokenizer.from_pretrained(tdir)
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, fim_order=order))
    got = {s["sample_id"]: s for s in samples(store, ref)}
    assert len(got) == len(CHATS) + len(FIMS)
    for c in CHATS:
        s = got[f"m/{c['id']}"]
        turns = c.get("messages") or [
            {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
            for t in c["conversations"]
        ]
        want = [t["content"] + "<|im_end|>" for t in turns if t["role"] == "assistant"]
        assert [tok.decode(r) for r in masked_runs(s["input_ids"], s["loss_mask"])] == want
    p, sx, m = SENT[family]
    for f in FIMS:
        s = got[f"m/{f['id']}"]
        assert [tok.decode(r) for r in masked_runs(s["input_ids"], s["loss_mask"])] == [
            f["middle"] + END[family]
        ]
        text = tok.decode(s["input_ids"])
        if order == "psm":
            assert text == f"{p}{f['prefix']}{sx}{f['suffix']}{m}{f['middle']}{END[family]}"
        else:
            assert text == f"{p}{sx}{f['suffix']}{m}{f['prefix']}{f['middle']}{END[family]}"
    c = ref.counts
    assert c["rows"] == 8 and c["rejected"] == 0 and c["truncated"] == 0
    assert c["tokens"] == sum(len(s["input_ids"]) for s in got.values())
    assert c["masked_tokens"] == sum(sum(s["loss_mask"]) for s in got.values())
    meta = store.manifest("tokenize", ref.key).meta
    assert meta["fim_family"] == family and meta["vocab_size"] == len(tok)
    assert meta["chat_turns_without_eot"] == 0 and meta["chat_mask"] == "offsets"
    assert sum(meta["length_hist"].values()) == 8 and meta["fim_layout"] == {order: 6}


def test_cached_rerun_and_key_depends_on_tokenizer(records, bpe_tokenizer_factory):
    store, rec = records
    a = bpe_tokenizer_factory("starcoder", "chatml")
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=a))
    mtime = store.manifest("tokenize", ref.key).created_at
    again = tokenize(store, rec, TokenizeConfig(tokenizer=a))
    assert again.key == ref.key and store.manifest("tokenize", ref.key).created_at == mtime
    other = tokenize(store, rec, TokenizeConfig(tokenizer=bpe_tokenizer_factory("qwen", "chatml")))
    assert other.key != ref.key


def test_fim_rate_mixes_plain_samples(records, bpe_tokenizer_factory):
    store, rec = records
    tdir = bpe_tokenizer_factory("qwen", "chatml")
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, format="fim", fim_rate=0.5, seed=1))
    meta = store.manifest("tokenize", ref.key).meta
    assert meta["fim_layout"]["psm"] + meta["fim_layout"]["plain"] == 6
    assert 0 < meta["fim_layout"]["plain"] < 6
    tok = AutoTokenizer.from_pretrained(tdir)
    fim_id = tok.convert_tokens_to_ids("<|fim_prefix|>")
    for s in samples(store, ref):
        if s["input_ids"][0] != fim_id:  # plain: whole file + end, all learned
            assert all(s["loss_mask"])
            assert tok.decode(s["input_ids"]).endswith("\nprint(add(1, 2))\n<|endoftext|>")
    # format="fim": the chats are counted as kind mismatches
    assert ref.counts["rejected_by_reason"] == {"kind_mismatch": 2}


def test_truncation_keeps_the_middle_and_rejects_lossless(tmp_path, bpe_tokenizer_factory):
    store = ArtifactStore(str(tmp_path / "store"))
    long_prefix = "".join(f"x{i} = {i}\n" for i in range(200))
    rows = [
        {"id": "longfim", "prefix": long_prefix, "middle": "y = 1\n", "suffix": long_prefix},
        {
            "id": "longchat",
            "messages": [
                {"role": "user", "content": long_prefix},
                {"role": "assistant", "content": "ok"},
            ],
        },
        {
            "id": "short",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        },
    ]
    rec = download(
        store,
        DownloadConfig(
            sources=(SourceSpec(path=write_jsonl(tmp_path / "l.jsonl", rows), label="l"),)
        ),
    )
    tdir = bpe_tokenizer_factory("starcoder", "chatml")
    tok = AutoTokenizer.from_pretrained(tdir)
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, max_length=64))
    got = {s["sample_id"]: s for s in samples(store, ref)}
    assert set(got) == {"l/longfim", "l/short"}
    s = got["l/longfim"]
    assert len(s["input_ids"]) == 64
    assert (
        tok.decode([t for t, m in zip(s["input_ids"], s["loss_mask"], strict=True) if m])
        == "y = 1\n<|endoftext|>"
    )
    text = tok.decode(s["input_ids"])
    assert "x199 = 199\n<fim_suffix>x0 = 0\n" in text  # prefix keeps its end, suffix its start
    assert ref.counts["truncated"] == 1
    assert ref.counts["rejected_by_reason"] == {"no_loss_tokens": 1}
    examples = store.manifest("tokenize", ref.key).meta["reject_examples"]
    assert examples["no_loss_tokens"] == ["l/longchat: truncated away"]


def test_truncate_fim_pieces_budget():
    p, m, s, t = truncate_fim_pieces(list(range(10)), [100, 101], list(range(20, 30)), 14)
    assert t and len(p) + len(m) + len(s) + 4 == 14
    assert p == [6, 7, 8, 9] and s == [20, 21, 22, 23]
    p, m, s, t = truncate_fim_pieces([1], [2], [3], 100)
    assert not t and (p, m, s) == ([1], [2], [3])


def test_pretokenized_pass_through_and_vocab_check(tmp_path, bpe_tokenizer_factory):
    store = ArtifactStore(str(tmp_path / "store"))
    rows = [
        {"id": "a", "input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
        {"id": "b", "input_ids": [5, 99999], "loss_mask": [1, 1]},
        {"id": "c", "input_ids": [5, 6], "loss_mask": [0, 0]},
    ]
    rec = download(
        store,
        DownloadConfig(
            sources=(SourceSpec(path=write_jsonl(tmp_path / "t.jsonl", rows), label="t"),),
            shuffle=False,
        ),
    )
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=bpe_tokenizer_factory("none")))
    assert [(s["input_ids"], s["loss_mask"]) for s in samples(store, ref)] == [
        ([5, 6, 7], [0, 1, 1])
    ]
    assert ref.counts["rejected_by_reason"] == {"token_out_of_vocab": 1, "no_loss_tokens": 1}


def test_fim_data_without_fim_tokens_is_a_config_error(records, bpe_tokenizer_factory):
    store, rec = records
    tdir = bpe_tokenizer_factory("none", "chatml")
    with pytest.raises(ConfigError, match="no FIM tokens"):
        tokenize(store, rec, TokenizeConfig(tokenizer=tdir))
    # chat-only tokenization of the same records works (FIM rows are counted mismatches)
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, format="chat"))
    assert ref.counts["rows"] == 2
    with pytest.raises(DataError, match="no sample left"):
        tokenize(store, rec, TokenizeConfig(tokenizer=tdir, format="tokens"))


def test_config_validation():
    with pytest.raises(ConfigError, match="fim_rate"):
        TokenizeConfig(tokenizer="x", fim_rate=1.5)
    with pytest.raises(ConfigError, match="fim_order"):
        TokenizeConfig(tokenizer="x", fim_order="pms")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="format"):
        TokenizeConfig(tokenizer="x", format="text")  # type: ignore[arg-type]


def test_resume_after_crash_equals_fresh_run(tmp_path, bpe_tokenizer_factory):
    store = ArtifactStore(str(tmp_path / "store"))
    src = write_jsonl(tmp_path / "mix.jsonl", CHATS + FIMS)
    rec = download(store, DownloadConfig(sources=(SourceSpec(path=src, label="m"),)))
    cfg = TokenizeConfig(tokenizer=bpe_tokenizer_factory("starcoder", "chatml"), shard_size=3)
    calls = []

    def crash(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        tokenize(store, rec, cfg, progress=crash)
    ref = tokenize(store, rec, cfg)
    fresh_store = ArtifactStore(str(tmp_path / "fresh"))
    rec2 = download(fresh_store, DownloadConfig(sources=(SourceSpec(path=src, label="m"),)))
    fresh = tokenize(fresh_store, rec2, cfg)
    assert ref.key == fresh.key and ref.counts == fresh.counts
    assert list(samples(store, ref)) == list(samples(fresh_store, fresh))
    assert len(store.list_files(ref, suffix=".parquet")) == 3


@pytest.mark.slow  # worker processes (forkserver/spawn when other threads exist: imports)
def test_num_proc_gives_identical_output(records, bpe_tokenizer_factory):
    store, rec = records
    cfg = TokenizeConfig(tokenizer=bpe_tokenizer_factory("qwen", "chatml"), shard_size=2)
    one = tokenize(store, rec, cfg)
    rows_one = list(samples(store, one))
    two = tokenize(store, rec, cfg, force=True, num_proc=2)
    assert two.key == one.key and list(samples(store, two)) == rows_one


@pytest.mark.slow  # builds the session's small target (tokenizer + briefly trained Llama)
def test_demo_tokenizer_generation_and_offsets_masks_agree(records, small_tokenizer_dir):
    """The project's own tokenizer: {% generation %} template and StarCoder FIM tokens."""
    store, rec = records
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    gen = tokenize(store, rec, TokenizeConfig(tokenizer=small_tokenizer_dir))
    off = tokenize(store, rec, TokenizeConfig(tokenizer=small_tokenizer_dir, chat_mask="offsets"))
    meta = store.manifest("tokenize", gen.key).meta
    assert meta["chat_mask"] == "generation" and meta["fim_family"] == "starcoder"
    a, b = list(samples(store, gen)), list(samples(store, off))
    assert a == b and len(a) == len(CHATS) + len(FIMS)
    by_id = {s["sample_id"]: s for s in a}
    for f in FIMS:
        s = by_id[f"m/{f['id']}"]
        assert [tok.decode(r) for r in masked_runs(s["input_ids"], s["loss_mask"])] == [
            f["middle"] + "<|endoftext|>"
        ]
    s = by_id["m/multi"]
    assert [tok.decode(r) for r in masked_runs(s["input_ids"], s["loss_mask"])] == [
        t["content"] + "<|im_end|>" for t in CHATS[0]["messages"] if t["role"] == "assistant"
    ]


def test_template_rejects_are_counted_by_the_stage(records, bpe_tokenizer_factory):
    store, rec = records
    picky = (
        "{% if messages | length > 2 %}{{ raise_exception('too many turns') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    tdir = bpe_tokenizer_factory("starcoder", "chatml")
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, format="chat", chat_template=picky))
    assert ref.counts["rows"] == 1
    assert ref.counts["rejected_by_reason"] == {"template_error": 1, "kind_mismatch": 6}
    ex = store.manifest("tokenize", ref.key).meta["reject_examples"]["template_error"]
    assert ex[0].startswith("m/multi:") and "too many turns" in ex[0]


@pytest.mark.slow  # moto round trips: several seconds on a busy 2-core machine
def test_all_data_stages_on_an_s3_store(tmp_path, s3_root, bpe_tokenizer_factory):
    from eagle_core.vocab import VocabConfig, VocabMap, scan_vocab

    store = ArtifactStore(s3_root)
    src = write_jsonl(tmp_path / "mix.jsonl", CHATS + FIMS)
    rec = download(store, DownloadConfig(sources=(SourceSpec(path=src, label="m"),)))
    assert rec.url.startswith("s3://")
    cfg = TokenizeConfig(tokenizer=bpe_tokenizer_factory("starcoder", "chatml"), shard_size=4)
    tok = tokenize(store, rec, cfg)
    assert tok.counts["rows"] == 8 and len(list(samples(store, tok))) == 8
    voc = scan_vocab(store, tok, VocabConfig(draft_vocab_size=16))
    vmap = VocabMap.from_artifact(store, voc, str(tmp_path))
    assert vmap.draft_vocab_size == 16 and 0 < voc.counts["coverage"] <= 1
    assert tokenize(store, rec, cfg).key == tok.key


def test_chat_data_without_a_template_is_a_config_error(records, bpe_tokenizer_factory):
    store, rec = records
    tdir = bpe_tokenizer_factory("starcoder", "none")
    with pytest.raises(ConfigError, match="no chat template"):
        tokenize(store, rec, TokenizeConfig(tokenizer=tdir))
    # an explicit template fixes it
    tmpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    ref = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, chat_template=tmpl))
    assert ref.counts["rows"] == 8


def test_loss_on_all_trains_every_token_but_the_first(records, bpe_tokenizer_factory):
    store, rec = records
    tdir = bpe_tokenizer_factory("starcoder", "chatml")
    answer = tokenize(store, rec, TokenizeConfig(tokenizer=tdir))
    every = tokenize(store, rec, TokenizeConfig(tokenizer=tdir, loss_on="all"))
    assert every.key != answer.key
    a = {s["sample_id"]: s for s in samples(store, answer)}
    b = {s["sample_id"]: s for s in samples(store, every)}
    assert a.keys() == b.keys()
    for sid, s in b.items():
        assert s["input_ids"] == a[sid]["input_ids"]  # same tokens, only the mask differs
        assert s["loss_mask"] == [0] + [1] * (len(s["input_ids"]) - 1)
    assert every.counts["masked_tokens"] == sum(len(s["input_ids"]) - 1 for s in b.values())
    assert every.counts["masked_tokens"] > 2 * answer.counts["masked_tokens"]
    with pytest.raises(ConfigError, match="loss_on"):
        TokenizeConfig(tokenizer=tdir, loss_on="prompt")
