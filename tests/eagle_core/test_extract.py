"""extract_hidden: bit-exact round trip, resume per shard, rejects, compatibility, and
online (target in the step) == offline (from the written shards) loss."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
import torch
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

from eagle_core.capture import capture_states, target_head_weight
from eagle_core.draft import DraftConfig, build_draft
from eagle_core.errors import ConfigError, ModelMismatchError
from eagle_core.extract import (
    ExtractConfig,
    check_compatible,
    extract_hidden,
    extract_key,
    iter_hidden_samples,
    plan_batches,
    plan_shards,
)
from eagle_core.loss import DraftBatch, TTTConfig, compute_loss
from storage import ArtifactStore
from storage.shards import build_table, write_parquet

V, H = 70, 32
LENGTHS = [7, 12, 3, 9, 12, 5]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = tiny_llama_config(V, hidden_size=H, initializer_range=0.2)
    path = str(tmp_path_factory.mktemp("target"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _tokens(store: ArtifactStore, rows: list[tuple[str, list[int], list[int]]], tag: str = ""):
    key = store.key("tokenize", {"test": tag or "tokens", "n": len(rows)})
    table = build_table(
        {
            "sample_id": [r[0] for r in rows],
            "source": ["test"] * len(rows),
            "input_ids": pa.array([r[1] for r in rows], type=pa.list_(pa.int32())),
            "loss_mask": pa.array([r[2] for r in rows], type=pa.list_(pa.int8())),
        }
    )
    with store.publish("tokenize", key) as w:
        write_parquet(w, "shard-00000.parquet", table)
    return store.ref("tokenize", key)


def _rows(seed: int = 0) -> list[tuple[str, list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            f"s{i}",
            torch.randint(0, V, (n,), generator=g).tolist(),
            (torch.rand(n, generator=g) < 0.6).int().tolist(),
        )
        for i, n in enumerate(LENGTHS)
    ]


def test_plans() -> None:
    assert plan_shards([3, 9, 5, 9], shard_size=2, shard_max_tokens=100) == [[1, 3], [2, 0]]
    assert plan_shards([3, 9, 5, 9], shard_size=10, shard_max_tokens=14) == [[1], [3, 2], [0]]
    assert plan_batches([9, 9, 5, 3], batch_size=3, max_tokens=20) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="batch_size"):
        ExtractConfig(target="x", batch_size=0)
    with pytest.raises(ConfigError, match="format"):
        ExtractConfig(target="x", format="npz")


@pytest.mark.parametrize("fmt", ["parquet", "pt"])
def test_round_trip_is_bit_exact(tmp_path, target_dir: str, fmt: str) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    rows = _rows()
    tokens = _tokens(store, rows + [("empty", [], [])])
    cfg = ExtractConfig(target=target_dir, batch_size=1, device="cpu", shard_size=4, format=fmt)
    ref = extract_hidden(store, tokens, cfg)
    assert ref.counts["samples"] == len(rows) and ref.counts["shards"] == 2
    assert ref.counts["rejected_reasons"] == {"empty": 1}
    meta = store.manifest(ref.stage, ref.key).meta
    assert meta["aux_layer_ids"] == [1, 3, 4] and meta["hidden_size"] == H
    assert meta["dtype"] == "bfloat16"
    model = LlamaForCausalLM.from_pretrained(target_dir).eval()
    got = {s["sample_id"]: s for s in iter_hidden_samples(store, ref)}
    assert set(got) == {r[0] for r in rows}
    for sid, ids, mask in rows:
        s = got[sid]
        assert s["input_ids"].tolist() == ids and s["loss_mask"].tolist() == mask
        states = capture_states(model, torch.tensor([ids]), torch.ones(1, len(ids)).long())
        assert s["aux_hidden"].dtype == torch.bfloat16
        assert s["aux_hidden"].shape == (len(ids), 3 * H)
        # the very same bf16 words come back
        want_aux = states.aux[0].to(torch.bfloat16).view(torch.int16)
        assert torch.equal(s["aux_hidden"].view(torch.int16), want_aux)
        want_last = states.last[0].to(torch.bfloat16).view(torch.int16)
        assert torch.equal(s["last_hidden"].view(torch.int16), want_last)


def test_batched_extraction_matches_single(tmp_path, target_dir: str) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    tokens = _tokens(store, _rows())
    one = extract_hidden(
        store, tokens, ExtractConfig(target=target_dir, batch_size=1, dtype="float32", device="cpu")
    )
    many = extract_hidden(
        store,
        tokens,
        ExtractConfig(
            target=target_dir, batch_size=4, max_tokens=40, dtype="float32", device="cpu"
        ),
    )
    a = {s["sample_id"]: s for s in iter_hidden_samples(store, one)}
    b = {s["sample_id"]: s for s in iter_hidden_samples(store, many)}
    for sid in a:
        torch.testing.assert_close(a[sid]["aux_hidden"], b[sid]["aux_hidden"], rtol=1e-5, atol=1e-5)


def test_resume_after_a_crash_reuses_finished_shards(tmp_path, target_dir: str) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    tokens = _tokens(store, _rows())
    cfg = ExtractConfig(target=target_dir, shard_size=2, device="cpu")

    def crash(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        extract_hidden(store, tokens, cfg, progress=crash)
    key = extract_key(store, tokens, cfg)
    assert not store.is_done("extract_hidden", key)
    first = store.path("extract_hidden", key, "shard-00000.parquet")
    stamp = os.stat(first).st_mtime_ns
    seen: list[tuple[int, int]] = []
    ref = extract_hidden(store, tokens, cfg, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert os.stat(first).st_mtime_ns == stamp  # not rewritten
    assert store.list_files(ref, suffix=".parquet") == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert len(list(iter_hidden_samples(store, ref))) == len(LENGTHS)
    # done: a third call is a cache hit
    assert extract_hidden(store, tokens, cfg, progress=lambda d, t: 1 / 0) == ref


def test_foreign_tokens_and_targets_are_refused(tmp_path, target_dir: str) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    tokens = _tokens(store, [("big", [1, 2, V + 5], [1, 1, 1])], tag="big")
    with pytest.raises(ModelMismatchError, match="outside the target's vocab"):
        extract_hidden(store, tokens, ExtractConfig(target=target_dir, device="cpu"))
    ref = extract_hidden(
        store, _tokens(store, _rows()), ExtractConfig(target=target_dir, device="cpu")
    )
    meta = store.manifest(ref.stage, ref.key).meta
    model = LlamaForCausalLM.from_pretrained(target_dir)
    check_compatible(meta, model.config, (1, 3, 4))
    with pytest.raises(ModelMismatchError, match="layers"):
        check_compatible(meta, model.config, (1, 2, 4))
    other = tiny_llama_config(V, hidden_size=H, num_hidden_layers=9)
    with pytest.raises(ModelMismatchError, match="config hash"):
        check_compatible(meta, other, (1, 3, 4))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_online_and_offline_loss_are_equal(tmp_path, target_dir: str, dtype: str) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    rows = [r for r in _rows() if len(r[1]) == 12]  # equal lengths: no padding in the batch
    tokens = _tokens(store, rows)
    ref = extract_hidden(
        store, tokens, ExtractConfig(target=target_dir, batch_size=2, dtype=dtype, device="cpu")
    )
    samples = sorted(iter_hidden_samples(store, ref), key=lambda s: s["sample_id"])
    model = LlamaForCausalLM.from_pretrained(target_dir).eval()
    cfg = DraftConfig.from_target_config(model.config, draft_vocab_size=50)
    torch.manual_seed(0)
    draft = build_draft(cfg, model)
    x = torch.tensor([r[1] for r in sorted(rows)])
    att = torch.ones_like(x)
    mask = torch.tensor([r[2] for r in sorted(rows)]).long()
    online_states = capture_states(model, x, att, cfg.aux_layer_ids)  # the target in the step
    cast = getattr(torch, dtype)
    online = DraftBatch(
        input_ids=x,
        attention_mask=att,
        loss_mask=mask,
        aux_hidden=online_states.aux.to(cast),
        last_hidden=online_states.last.to(cast),
    )
    offline = DraftBatch(
        input_ids=torch.stack([s["input_ids"] for s in samples]),
        attention_mask=att,
        loss_mask=torch.stack([s["loss_mask"] for s in samples]),
        aux_hidden=torch.stack([s["aux_hidden"] for s in samples]),
        last_hidden=torch.stack([s["last_hidden"] for s in samples]),
    )
    head = target_head_weight(model)
    a = compute_loss(draft, online, head, TTTConfig(steps=3))
    b = compute_loss(draft, offline, head, TTTConfig(steps=3))
    assert a.step_count == b.step_count and sum(a.step_count) > 0
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
