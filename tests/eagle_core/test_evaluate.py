"""The evaluate stage end to end on the small target: prompts from jsonl (chat + FIM), an
exported draft, report.json / report.md / acceptance.png, τ from the counted events."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from eagle_core.errors import ConfigError, DataError
from eagle_core.evaluate import (
    EvalConfig,
    EvalPrompt,
    chat_prompt_ids,
    evaluate,
    fim_prompt_ids,
    load_prompts,
    stop_token_ids,
)
from eagle_core.models import load_target
from storage import ArtifactStore

CHATS = [
    {
        "id": "c1",
        "messages": [
            {"role": "user", "content": "Write add(a, b)."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ],
    },
    {
        "id": "c2",
        "conversations": [
            {"from": "human", "value": "What is os.path.join?"},
            {"from": "gpt", "value": "It joins paths."},
        ],
    },
    {"id": "c3", "messages": [{"role": "user", "content": "no answer yet"}]},
]
FIMS = [
    {"id": "f1", "prefix": "def add(a, b):\n    ", "middle": "return a + b", "suffix": "\n"},
    {"id": "f2", "prefix": "import os\n", "middle": "import sys\n", "suffix": "print(1)\n"},
]


def test_prompt_building(small_tokenizer_dir: str, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    msgs = CHATS[0]["messages"]
    ids = chat_prompt_ids(tok, msgs)
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "return a + b" not in text
    assert chat_prompt_ids(tok, CHATS[2]["messages"]) is None
    fim = tok.decode(fim_prompt_ids(tok, "def f():\n", "\nx = 1\n"))
    assert fim == "<fim_prefix>def f():\n<fim_suffix>\nx = 1\n<fim_middle>"
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHATS + FIMS))
    prompts, skipped = load_prompts(EvalConfig(prompts=str(path), max_prompts=5), tok, "")
    assert [(p.sample_id, p.kind) for p in prompts] == [
        ("c1", "chat"),
        ("c2", "chat"),
        ("f1", "fim"),
        ("f2", "fim"),
    ]
    assert skipped == {"no_assistant_turn": 1}  # the record normaliser refused it
    # a records artifact (what the download stage writes) as the source
    from eagle_core.records import normalize_record, records_table
    from storage.shards import write_parquet

    store = ArtifactStore(str(tmp_path / "store"))
    recs = [normalize_record(r, sample_id=r["id"], source="t") for r in CHATS[:2] + FIMS]
    with store.publish("download", "heldout") as w:
        write_parquet(w, "shard-00000.parquet", records_table(recs))
    url = store.url("download", "heldout")
    from_artifact, _ = load_prompts(EvalConfig(prompts=(url,), max_prompts=5), tok, "")
    assert from_artifact == prompts
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps(CHATS[2]) + "\n")
    with pytest.raises(DataError, match="no usable"):
        load_prompts(EvalConfig(prompts=str(empty)), tok, "")


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="steps"):
        EvalConfig(steps=0)
    with pytest.raises(ConfigError, match="tree"):
        EvalConfig(mode="tree", temperature=0.5)
    assert EvalConfig(prompts="a.jsonl").prompts == ("a.jsonl",)


@pytest.mark.slow
def test_evaluate_stage(
    small_target_dir: str, small_tokenizer_dir: str, tmp_path, export_untrained_draft
) -> None:
    """The default prompt source: the held-out files of a demo-target artifact (published
    here from the small target), with the target given as that artifact's URL."""
    store = ArtifactStore(str(tmp_path / "store"))
    with store.publish("build_demo_target", "demo") as w:
        w.add_dir(small_target_dir, prefix="model")
        w.add_dir(small_tokenizer_dir, prefix="tokenizer")
        w.write_bytes(
            "data/chat_openai.heldout.jsonl", "".join(json.dumps(r) + "\n" for r in CHATS).encode()
        )
        w.write_bytes(
            "data/fim.heldout.jsonl", "".join(json.dumps(r) + "\n" for r in FIMS).encode()
        )
        w.write_bytes("data/files.heldout.jsonl", b'{"content": "x = 1\\n"}\n')
    demo_url = store.url("build_demo_target", "demo")
    exp = export_untrained_draft(store, demo_url, target=demo_url)
    cfg = EvalConfig(max_prompts=2, max_new_tokens=12, steps=3)  # target from the export
    calls: list[tuple[int, int]] = []
    ref = evaluate(store, exp, cfg, progress=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (4, 4)
    report = store.read_json(ref, "report.json")
    assert set(report["kinds"]) == {"chat", "fim"}
    for s in [*report["kinds"].values(), report["all"]]:
        # an untrained draft is still lossless; τ comes from the counted events
        assert s["lossless"] == s["lossless_checked"] == s["prompts"]
        assert s["tau"] == pytest.approx(1 + s["accepted_tokens"] / s["verify_forwards"])
        assert len(s["accept_rate_per_position"]) == 3
        assert s["target_forwards"] == s["verify_forwards"] + s["prompts"]
        assert s["draft_time_s"] > 0 and s["target_time_s"] > 0 and s["speedup"] > 0
    assert report["all"]["prompts"] == 4
    md = store.read_bytes(ref, "report.md").decode()
    assert "| chat | 2 |" in md and "| fim | 2 |" in md and "acc@3" in md
    assert store.read_bytes(ref, "acceptance.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert ref.counts["prompts"] == 4 and ref.counts["lossless"] == 4
    assert evaluate(store, exp, cfg).key == ref.key  # cached
    # explicit prompts: part of the key, same measurements
    prompts = [EvalPrompt("x", "fim", tuple(range(5, 15)))]
    ref2 = evaluate(store, exp, cfg, prompts=prompts)
    assert ref2.key != ref.key
    assert set(store.read_json(ref2, "report.json")["kinds"]) == {"fim"}


def test_divergence_reports_position_and_margin(small_target_dir: str) -> None:
    from eagle_core.evaluate import divergence
    from eagle_core.speculate import greedy_generate

    target = load_target(small_target_dir)
    prompt = EvalPrompt("p", "fim", (5, 17, 33, 40))
    base = greedy_generate(target, torch.tensor([prompt.input_ids]), 4)
    other = (base[2] + 1) % target.config.vocab_size
    d = divergence(target, prompt, base, [*base[:2], other, base[3]])
    assert d["position"] == 2 and d["greedy_token"] == base[2]
    assert d["speculative_token"] == other and d["logit_margin"] > 0  # greedy = the argmax
    assert divergence(target, prompt, base, base[:3]) == {"sample_id": "p", "position": 3}


def test_stop_tokens_follow_the_generation_config(
    small_target_dir: str, small_tokenizer_dir: str
) -> None:
    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    target = load_target(small_target_dir, dtype="float32", device="cpu")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # the small target (build_small_target) ships both, like chat models
    assert stop_token_ids(target, tok) == (tok.eos_token_id, im_end)
    target.generation_config.eos_token_id = tok.eos_token_id
    assert stop_token_ids(target, tok) == (tok.eos_token_id,)
    target.generation_config.eos_token_id = [im_end, tok.eos_token_id]
    assert stop_token_ids(target, tok) == (im_end, tok.eos_token_id)
    target.generation_config.eos_token_id = im_end
    assert stop_token_ids(target, tok) == (im_end, tok.eos_token_id)
