"""scan_vocab: equals a straightforward Counter reference; ties, filler, errors, round trip."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from eagle_core.download import DownloadConfig, SourceSpec, download
from eagle_core.errors import ConfigError, DataError, ModelMismatchError
from eagle_core.tokenize import TokenizeConfig, tokenize
from eagle_core.vocab import (
    VOCAB_FILE,
    VocabConfig,
    VocabMap,
    choose_draft_ids,
    count_masked_tokens,
    scan_vocab,
)
from storage import ArtifactStore
from storage.shards import iter_batches


def reference(seqs, n, v):
    """The plain definition: Counter over masked tokens, sort by (-count, id), fill, sort."""
    c = Counter(t for ids, mask in seqs for t, m in zip(ids, mask, strict=True) if m)
    top = sorted(c, key=lambda t: (-c[t], t))[:n]
    filler = [t for t in range(v) if t not in c][: n - len(top)]
    return sorted(top + filler), c


def batch(seqs):
    return pa.RecordBatch.from_pydict(
        {"input_ids": [s[0] for s in seqs], "loss_mask": [s[1] for s in seqs]},
        schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8()))]),
    )


@pytest.mark.parametrize("n", [1, 7, 40, 100])
def test_choice_equals_counter_reference(n):
    rng = random.Random(n)
    v = 100
    seqs = []
    for _ in range(30):
        length = rng.randint(1, 40)
        seqs.append(
            (
                [min(int(rng.expovariate(0.1)), v - 1) for _ in range(length)],
                [rng.random() < 0.6 for _ in range(length)],
            )
        )
    seqs = [(ids, [int(m) for m in mask]) for ids, mask in seqs]
    counts = count_masked_tokens([batch(seqs[:10]), batch(seqs[10:])], v)
    want, c = reference(seqs, n, v)
    assert counts.tolist() == [c.get(t, 0) for t in range(v)]
    assert choose_draft_ids(counts, n).tolist() == want


def test_ties_go_to_lower_ids_and_filler_is_smallest_unseen():
    counts = np.zeros(10, dtype=np.int64)
    counts[[7, 3, 9]] = [5, 5, 5]
    assert choose_draft_ids(counts, 2).tolist() == [3, 7]
    assert choose_draft_ids(counts, 5).tolist() == [0, 1, 3, 7, 9]
    with pytest.raises(ConfigError, match="larger than the target vocab"):
        choose_draft_ids(counts, 11)


def test_vocab_map_layout_and_round_trip(tmp_path):
    m = VocabMap.from_draft_ids([9, 2, 5], 12)
    assert m.d2t.tolist() == [2, 4, 7] and m.draft_ids.tolist() == [2, 5, 9]
    assert m.t2d.dtype == torch.bool and m.t2d.nonzero().flatten().tolist() == [2, 5, 9]
    assert m.target_to_draft(torch.tensor([5, 3, 9])).tolist() == [1, -1, 2]
    p = str(tmp_path / "v.safetensors")
    m.save(p)
    back = VocabMap.load(p)
    assert torch.equal(back.d2t, m.d2t) and torch.equal(back.t2d, m.t2d)
    with pytest.raises(ModelMismatchError):
        VocabMap(d2t=torch.tensor([0, 1]), t2d=torch.zeros(4, dtype=torch.bool))


def test_stage_on_chat_and_fim_data(tmp_path, bpe_tokenizer_factory):
    rows = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i} " * i},
            ],
        }
        for i in range(1, 6)
    ]
    rows += [
        {"id": f"f{i}", "prefix": "def f():\n", "middle": f"    return {i}\n", "suffix": "\nf()\n"}
        for i in range(5)
    ]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = ArtifactStore(str(tmp_path / "store"))
    rec = download(store, DownloadConfig(sources=(SourceSpec(path=str(src)),)))
    tdir = bpe_tokenizer_factory("starcoder", "chatml")
    tok = tokenize(store, rec, TokenizeConfig(tokenizer=tdir))
    ref = scan_vocab(store, [tok], VocabConfig(draft_vocab_size=32))
    seqs = [
        (r["input_ids"], r["loss_mask"]) for b in iter_batches(store, tok) for r in b.to_pylist()
    ]
    v = store.manifest("tokenize", tok.key).meta["vocab_size"]
    want, c = reference(seqs, 32, v)
    m = VocabMap.load(store.local_copy(ref, VOCAB_FILE, str(tmp_path)))
    assert m.draft_ids.tolist() == want and m.vocab_size == v
    covered = sum(c[t] for t in want) / sum(c.values())
    assert ref.counts["coverage"] == pytest.approx(covered, abs=1e-6)
    assert ref.counts["draft_vocab_size"] == 32
    again = scan_vocab(store, tok, VocabConfig(draft_vocab_size=32))
    assert again.key == ref.key
    with pytest.raises(ConfigError, match="larger than the target vocab"):
        scan_vocab(store, tok, VocabConfig(draft_vocab_size=v + 1))
    padded = scan_vocab(store, tok, VocabConfig(draft_vocab_size=32, target_vocab_size=v + 64))
    assert padded.counts["vocab_size"] == v + 64
    with pytest.raises(ConfigError, match="target_vocab_size"):
        scan_vocab(store, tok, VocabConfig(draft_vocab_size=32, target_vocab_size=v - 1))


def test_out_of_vocab_ids_are_a_data_error():
    seqs = [([1, 50], [1, 1])]
    with pytest.raises(DataError, match="outside the vocab size 10"):
        count_masked_tokens([batch(seqs)], 10)
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        VocabConfig(draft_vocab_size=0)
