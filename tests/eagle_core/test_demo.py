"""The build_demo_target stage and its stdlib datasets (real stdlib text, real store)."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle_core.demo import STAGE, DemoTargetConfig, build_demo_target
from eagle_core.demo.build import CODE_VERSION, SMALL_MODULES, data_files, make_data, stage_params
from eagle_core.demo.corpus import (
    chat_samples,
    fim_samples,
    list_stdlib_files,
    module_name,
    read_sources,
    split_of,
    to_sharegpt,
)
from eagle_core.errors import ConfigError
from storage import ArtifactStore

TINY = dict(
    vocab_size=600,
    tokenizer_corpus_chars=200_000,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    seq_len=32,
    batch_size=4,
    train_steps=3,
    max_train_seconds=30.0,
    heldout_permille=300,
    fim_per_file=3,
    max_train_samples=20,
    max_heldout_samples=8,
    eval_blocks=2,
    eval_fim_samples=2,
    modules=SMALL_MODULES,
)


@pytest.fixture(scope="module")
def sources():
    files, rejects = read_sources(modules=list(SMALL_MODULES))
    assert len(files) == len(SMALL_MODULES) and sum(rejects.values()) == 0
    return files


def test_stdlib_listing_skips_tests_and_site_packages() -> None:
    paths = list_stdlib_files()
    assert "json/__init__.py" in paths and "textwrap.py" in paths
    assert not [p for p in paths if p.startswith(("test/", "site-packages/"))]
    assert paths == sorted(paths)
    assert module_name("json/__init__.py") == "json"
    assert module_name("email/mime/text.py") == "email.mime.text"


def test_split_is_deterministic_and_roughly_sized() -> None:
    mods = [module_name(p) for p in list_stdlib_files()]
    held = [m for m in mods if split_of(m, 100) == "heldout"]
    assert held == [m for m in mods if split_of(m, 100) == "heldout"]
    assert 0.04 < len(held) / len(mods) < 0.2


def test_chat_samples_come_from_the_module(sources) -> None:
    heapq = next(f for f in sources if f.module == "heapq")
    samples = list(chat_samples(heapq, seed=0))
    assert samples == list(chat_samples(heapq, seed=0))
    doc = next(s for s in samples if s["id"].startswith("heapq:heappush:"))
    assert doc["messages"][-2]["content"].startswith("What does the function `heappush`")
    assert doc["messages"][-1]["content"] == "Push item onto heap, maintaining the heap invariant."
    body = next(s for s in samples if s["id"].endswith(":body"))
    answer = body["messages"][-1]["content"]
    assert answer.startswith("```python\ndef ") and answer.endswith("\n```")
    sg = to_sharegpt(body)
    assert [t["from"] for t in sg["conversations"]][-2:] == ["human", "gpt"]
    assert sg["conversations"][-1]["value"] == answer


def test_fim_samples_are_slices_of_the_file(sources) -> None:
    for f in sources:
        samples = list(fim_samples(f, seed=3, per_file=5))
        assert samples == list(fim_samples(f, seed=3, per_file=5))
        assert len({s["id"] for s in samples}) == len(samples)  # ids are unique
        for s in samples:
            assert s["middle"].strip()
            assert s["prefix"] + s["middle"] + s["suffix"] in f.text
    assert list(fim_samples(sources[0], seed=3, per_file=5)) != list(
        fim_samples(sources[0], seed=4, per_file=5)
    )


def test_data_files_disjoint_and_in_user_formats(sources) -> None:
    cfg = DemoTargetConfig(**TINY)
    files = data_files(make_data(sources, cfg), cfg)
    assert files == data_files(make_data(sources, cfg), cfg)  # byte-identical
    assert sorted(files) == sorted(
        f"{kind}.{split}.jsonl"
        for kind in ("chat_sharegpt", "chat_openai", "fim", "files")
        for split in ("train", "heldout")
    )
    rows = {n: [json.loads(line) for line in b.decode().splitlines()] for n, b in files.items()}
    assert all(rows.values()), [n for n, r in rows.items() if not r]
    mods = {}
    for split in ("train", "heldout"):
        paths = {r["path"] for r in rows[f"files.{split}.jsonl"]}
        mods[split] = {module_name(p) for p in paths}
        for r in rows[f"fim.{split}.jsonl"]:
            assert set(r) == {"id", "prefix", "middle", "suffix"}
            assert r["id"].split(":")[0] in mods[split]
        for r in rows[f"chat_openai.{split}.jsonl"]:
            assert r["messages"][-1]["role"] == "assistant"
            assert r["id"].split(":")[0] in mods[split]
        for r in rows[f"chat_sharegpt.{split}.jsonl"]:
            assert r["conversations"][-1]["from"] == "gpt"
            assert r["id"].split(":")[0] in mods[split]
    assert mods["train"] and mods["heldout"] and not mods["train"] & mods["heldout"]
    for name, rs in rows.items():
        if not name.startswith("files"):
            assert len({r["id"] for r in rs}) == len(rs), name
    ids_sg = {r["id"] for r in rows["chat_sharegpt.train.jsonl"]}
    ids_oa = {r["id"] for r in rows["chat_openai.train.jsonl"]}
    assert not ids_sg & ids_oa


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fim_family", "gpt"),
        ("vocab_size", 100),
        ("num_kv_heads", 3),
        ("heldout_permille", 0),
        ("mix_fim", -1.0),
        ("max_train_seconds", 0.0),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        DemoTargetConfig(**{field: value})


def test_key_depends_on_config() -> None:
    base = DemoTargetConfig(**TINY)
    key = ArtifactStore.key
    store = ArtifactStore.__new__(ArtifactStore)
    k0 = key(store, STAGE, stage_params(base), code=CODE_VERSION)
    assert k0 == key(store, STAGE, stage_params(DemoTargetConfig(**TINY)), code=CODE_VERSION)
    other = DemoTargetConfig(**{**TINY, "seed": 1})
    assert k0 != key(store, STAGE, stage_params(other), code=CODE_VERSION)
    assert stage_params(base)["python"].count(".") == 2


@pytest.mark.slow
def test_build_demo_target_deterministic_cached_and_loadable(tmp_path) -> None:
    cfg = DemoTargetConfig(**TINY)
    store_a = ArtifactStore(str(tmp_path / "a"))
    seen: list[tuple[int, int]] = []
    ref = build_demo_target(store_a, cfg, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (3, 3)
    m = store_a.manifest(STAGE, ref.key)
    assert 0.0 <= ref.counts["heldout_accuracy"] <= 1.0 and ref.counts["heldout_loss"] > 0
    assert m.meta["fim_example"]["middle"] and "completion" in m.meta["fim_example"]
    assert m.meta["vocab_size"] == 600 and m.meta["train_steps"] == 3

    # cached: same key, manifest untouched, nothing rebuilt
    again = build_demo_target(store_a, cfg, progress=lambda i, n: seen.append((-1, -1)))
    assert again.key == ref.key and (-1, -1) not in seen
    assert store_a.manifest(STAGE, ref.key).created_at == m.created_at

    # the outputs are standard HF directories
    root = store_a.local_dir(ref, str(tmp_path / "unused"))
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(root, "model"))
    assert model.config.vocab_size == len(tok) == 600
    assert model.config.num_hidden_layers == 2
    assert os.path.isfile(os.path.join(root, "model", "model.safetensors"))
    # model/ is complete on its own (`vllm serve <artifact>/model`, HF tools): the same
    # tokenizer and chat template, and chat turns end generation
    model_dir = os.path.join(root, "model")
    tok_m = AutoTokenizer.from_pretrained(model_dir)
    assert tok_m.get_vocab() == tok.get_vocab() and tok_m.chat_template == tok.chat_template
    assert tok_m.eos_token == "<|endoftext|>" and tok_m.pad_token == "<|pad|>"
    with open(os.path.join(model_dir, "tokenizer_config.json")) as fh:
        assert json.load(fh)["chat_template"] == tok.chat_template  # older readers look here
    eos = model.generation_config.eos_token_id
    assert tok_m.convert_ids_to_tokens(eos) == ["<|endoftext|>", "<|im_end|>"]

    # a second build elsewhere: same tokenizer and data bytes, same model up to float noise
    store_b = ArtifactStore(str(tmp_path / "b"))
    ref_b = build_demo_target(store_b, cfg)
    assert ref_b.key == ref.key
    mb = store_b.manifest(STAGE, ref_b.key)
    for name, entry in m.files.items():
        if name.startswith(("tokenizer/", "data/")):
            assert mb.files[name].sha256 == entry.sha256, name
    model_b = AutoModelForCausalLM.from_pretrained(
        os.path.join(store_b.local_dir(ref_b, ""), "model")
    )
    for (n, a), (_, b) in zip(
        model.state_dict().items(), model_b.state_dict().items(), strict=True
    ):
        assert (a - b).abs().max().item() < 1e-5, n


def test_pack_blocks_and_time_cap() -> None:
    import torch

    from eagle_core.demo.lm import LMShape, build_llama, pack_blocks, train_lm
    from eagle_core.errors import DataError

    blocks = pack_blocks([[5, 6, 7], [8, 9]], eos_id=0, seq_len=3)
    assert blocks.tolist() == [[5, 6, 7, 0]]  # the stream's tail shorter than a block is cut
    with pytest.raises(DataError, match="less than one block"):
        pack_blocks([[1, 2]], eos_id=0, seq_len=16)
    shape = LMShape(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = build_llama(shape, 32, seed=0, bos_id=None, eos_id=0, pad_id=None)
    data = torch.randint(0, 32, (8, 9))
    res = train_lm(
        model, data, steps=50, batch_size=2, lr=1e-3, seed=0, max_seconds=1e-6, show_bar=False
    )
    assert res.steps == 1 and res.stopped_by_time
    res = train_lm(model, data, steps=2, batch_size=2, lr=1e-3, seed=0, show_bar=False)
    assert res.steps == 2 and not res.stopped_by_time and not model.training


def test_all_cores_raises_torch_threads_for_the_block_only() -> None:
    import torch

    from eagle_core.demo.build import all_cores

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with all_cores() as n:
            assert n == torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
