"""Footer histograms: tokenize stores each shard's masked-token histogram in its Parquet
footer; scan_vocab sums them and scans shards without a usable one. Both paths must give the
same counts and the same map, on real tokenize output."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle_core.download import DownloadConfig, SourceSpec, download
from eagle_core.errors import DataError
from eagle_core.tokenize import TOKENS_SCHEMA, TokenizeConfig, samples, tokenize
from eagle_core.vocab import (
    MASKED_COUNTS_KEY,
    VOCAB_FILE,
    VocabConfig,
    artifact_counts,
    count_artifact_tokens,
    decode_masked_counts,
    masked_counts_footer,
    masked_histogram,
    scan_vocab,
)
from storage import ArtifactStore, StageRef
from storage.shards import build_table, read_footer, write_parquet

CHATS = [
    {
        "id": f"c{i}",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Question number {i}: squares?"},
            {"role": "assistant", "content": f"for i in range({i + 3}):\n    print(i * i)\n"},
        ],
    }
    for i in range(4)
]
FIMS = [
    {
        "id": f"f{i}",
        "prefix": "def add(a, b):\n",
        "middle": f"    return a + b + {i * 7}\n",
        "suffix": "\nprint(add(1, 2))\n",
    }
    for i in range(5)
]


@pytest.fixture
def real(tmp_path, bpe_tokenizer_factory):
    """(store, records ref, tokenize config): 9 chat + FIM records, 3 shards of 3 rows."""
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "mix.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in CHATS + FIMS))
    rec = download(
        store, DownloadConfig(sources=(SourceSpec(path=str(src), label="m"),), shuffle=False)
    )
    tdir = bpe_tokenizer_factory("starcoder", "chatml")
    return store, rec, TokenizeConfig(tokenizer=tdir, shard_size=3)


def counter_counts(store: ArtifactStore, ref: StageRef, v: int) -> np.ndarray:
    """The plain definition: a Counter over every masked token of the samples."""
    c = Counter(
        t
        for s in samples(store, ref)
        for t, m in zip(s["input_ids"], s["loss_mask"], strict=True)
        if m
    )
    out = np.zeros(v, dtype=np.int64)
    for t, n in c.items():
        out[t] = n
    return out


def vocab_of(store: ArtifactStore, ref: StageRef) -> int:
    return int(store.manifest(ref.stage, ref.key).meta["vocab_size"])


def test_footer_path_equals_scan_path_on_real_tokenize_output(real, tmp_path):
    store, rec, cfg = real
    tok = tokenize(store, rec, cfg)
    names = store.list_files(tok, suffix=".parquet")
    assert len(names) == 3
    v = vocab_of(store, tok)
    want = counter_counts(store, tok, v)
    assert want.sum() == tok.counts["masked_tokens"] > 0

    fast, report = artifact_counts(store, tok, v)
    assert report.footer == names and report.scanned == {}
    assert np.array_equal(fast, want)
    assert np.array_equal(count_artifact_tokens(store, tok, v), want)
    slow, slow_report = artifact_counts(store, tok, v, footer_counts=False)
    assert np.array_equal(slow, want) and slow_report.footer == []

    # every shard's own histogram equals a Counter over that shard's rows
    for name in names:
        ids, counts = decode_masked_counts(read_footer(store, tok, name))
        table = pq.read_table(store.path(tok.stage, tok.key, name))
        c = Counter(
            t
            for row_ids, row_mask in zip(
                table.column("input_ids").to_pylist(),
                table.column("loss_mask").to_pylist(),
                strict=True,
            )
            for t, m in zip(row_ids, row_mask, strict=True)
            if m
        )
        assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == dict(c)
        # the histogram is in the footer only, never in the Arrow schema: a table read back,
        # filtered and written again cannot carry a stale one along
        assert MASKED_COUNTS_KEY.encode() not in (table.schema.metadata or {})

    # the stage: same key, same map bytes, same counts from either path
    vcfg = VocabConfig(draft_vocab_size=50)
    a = scan_vocab(store, tok, vcfg)
    map_a = store.read_bytes(a, VOCAB_FILE)
    b = scan_vocab(store, tok, vcfg, force=True, footer_counts=False)
    assert b.key == a.key and b.counts == a.counts
    assert store.read_bytes(b, VOCAB_FILE) == map_a
    assert a.counts["masked_tokens"] == int(want.sum())


def test_shards_without_histograms_are_scanned(real, caplog):
    store, rec, cfg = real
    with_h = tokenize(store, rec, cfg)
    v = vocab_of(store, with_h)
    want = counter_counts(store, with_h, v)
    without = tokenize(store, rec, cfg, force=True, footer_counts=False)
    assert without.key == with_h.key  # not part of the key: the same rows
    names = store.list_files(without, suffix=".parquet")
    for name in names:
        assert MASKED_COUNTS_KEY not in read_footer(store, without, name).key_values
    got, report = artifact_counts(store, without, v)
    assert report.footer == [] and report.scanned == dict.fromkeys(names, "no footer histogram")
    assert np.array_equal(got, want)
    with caplog.at_level(logging.INFO, logger="eagle_core.vocab"):
        scan_vocab(store, without, VocabConfig(draft_vocab_size=20))
    assert "0 of 3 shard(s) counted from footer histograms, 3 scanned" in caplog.text


def test_mixed_artifact_from_a_resumed_run(real):
    """A run with histograms crashes after two shards; the resume writes the third without:
    the scan covers exactly that shard and the total is still exact."""
    store, rec, cfg = real
    calls = []

    def crash(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        tokenize(store, rec, cfg, progress=crash)
    tok = tokenize(store, rec, cfg, footer_counts=False)
    v = vocab_of(store, tok)
    got, report = artifact_counts(store, tok, v)
    assert report.footer == ["shard-00000.parquet", "shard-00001.parquet"]
    assert report.scanned == {"shard-00002.parquet": "no footer histogram"}
    assert np.array_equal(got, counter_counts(store, tok, v))


def _copy_with_footer(store, src: StageRef, key: str, edit) -> StageRef:
    """A copy of a tokenize artifact whose shard 1 footer value is edit(value)."""
    with store.publish("tokenize", key) as w:
        for name in store.list_files(src, suffix=".parquet"):
            table = pq.read_table(store.path(src.stage, src.key, name))
            value = read_footer(store, src, name).key_values[MASKED_COUNTS_KEY].decode()
            if name == "shard-00001.parquet":
                value = edit(value, store, src)
            write_parquet(w, name, table, file_metadata={MASKED_COUNTS_KEY: value})
        w.counts.update(src.counts)
        w.meta.update(store.manifest(src.stage, src.key).meta)
    return store.ref("tokenize", key)


def _set(field, value):
    def edit(raw, store, src):
        doc = json.loads(raw)
        doc[field] = value(doc) if callable(value) else value
        return json.dumps(doc)

    return edit


def _other_shard(raw, store, src):  # the histogram of another shard (another table)
    return read_footer(store, src, "shard-00000.parquet").key_values[MASKED_COUNTS_KEY].decode()


@pytest.mark.parametrize(
    "case, edit, reason",
    [
        ("version", _set("format", 99), "format 99, this code reads format 1"),
        ("total", _set("masked_tokens", lambda d: d["masked_tokens"] + 1), "add up to"),
        ("rows", _set("rows", lambda d: d["rows"] + 1), "made for another table"),
        ("levels", _set("levels", lambda d: d["levels"] - 1), "made for another table"),
        ("other", _other_shard, "made for another table"),
        ("json", lambda raw, *_: raw[:-5], "not JSON"),
        ("data", _set("data", lambda d: d["data"][:-8]), "damaged"),
        ("distinct", _set("distinct", lambda d: d["distinct"] + 1), "damaged"),
    ],
)
def test_unusable_histogram_is_warned_and_scanned(real, caplog, case, edit, reason):
    """A damaged or mismatched histogram never changes the result: the tokens are the truth,
    the footer only a summary of them, so that shard is scanned (with a warning)."""
    store, rec, cfg = real
    tok = tokenize(store, rec, cfg)
    v = vocab_of(store, tok)
    bad = _copy_with_footer(store, tok, f"bad-{case}", edit)
    with caplog.at_level(logging.WARNING, logger="eagle_core.vocab"):
        got, report = artifact_counts(store, bad, v)
    assert report.footer == ["shard-00000.parquet", "shard-00002.parquet"]
    assert list(report.scanned) == ["shard-00001.parquet"]
    assert reason in report.scanned["shard-00001.parquet"]
    assert "shard-00001.parquet: footer histogram unusable, scanning its tokens" in caplog.text
    assert np.array_equal(got, counter_counts(store, tok, v))


def _hand_tokens(store, key: str, shards, footer: bool, masked: int | None = None) -> StageRef:
    """A tokenize-shaped artifact of rows (ids, mask), written like tokenize writes it."""
    with store.publish("tokenize", key) as w:
        for s, rows in enumerate(shards):
            table = build_table(
                {
                    "sample_id": [f"{s}-{i}" for i in range(len(rows))],
                    "source": ["t"] * len(rows),
                    "input_ids": [ids for ids, _ in rows],
                    "loss_mask": [mask for _, mask in rows],
                },
                schema=TOKENS_SCHEMA,
            )
            meta = masked_counts_footer(table) if footer else None
            write_parquet(w, f"shard-{s:05d}.parquet", table, file_metadata=meta)
        if masked is not None:
            w.counts.update(masked_tokens=masked)
        w.meta.update(vocab_size=300, tokenizer_hash="h")
    return store.ref("tokenize", key)


def test_out_of_vocab_ids_raise_the_scan_paths_error(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    shards = [[([1, 2], [1, 1])], [([1, 305], [0, 1])]]
    for footer in (True, False):
        tok = _hand_tokens(store, f"oov-{footer}", shards, footer)
        with pytest.raises(DataError, match="shard-00001.parquet: token id 305 outside") as exc:
            artifact_counts(store, tok, 300)
        assert exc.value.fix
        with pytest.raises(DataError, match="token id 305 outside the vocab size 300"):
            scan_vocab(store, tok, VocabConfig(draft_vocab_size=4), force=True)
    neg = _hand_tokens(store, "neg", [[([4, -3], [1, 1])]], footer=True)
    with pytest.raises(DataError, match="shard-00000.parquet: token id -3 outside"):
        artifact_counts(store, neg, 300)
    # a larger target_vocab_size takes the id in, from the footer
    got, report = artifact_counts(store, store.ref("tokenize", "oov-True"), 400)
    assert report.scanned == {} and got[305] == 1 and got.sum() == 3


def test_footer_total_against_the_manifest(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "store"))
    shards = [[([1, 2, 2], [1, 1, 0])], [([7, 7], [1, 1]), ([9], [1])]]
    ok = _hand_tokens(store, "ok", shards, footer=True, masked=5)
    got, report = artifact_counts(store, ok, 300)
    assert report.scanned == {} and got.sum() == 5 and got[7] == 2
    off = _hand_tokens(store, "off", shards, footer=True, masked=6)
    with caplog.at_level(logging.WARNING, logger="eagle_core.vocab"):
        got2, report2 = artifact_counts(store, off, 300)
    assert "the manifest says 6: scanning every shard" in caplog.text
    assert report2.footer == [] and len(report2.scanned) == 2
    assert np.array_equal(got, got2)


def test_footer_histograms_on_s3(tmp_path, s3_root):
    store = ArtifactStore(s3_root)
    rng = np.random.default_rng(5)
    shards = [
        [
            (rng.integers(0, 300, n).tolist(), (rng.random(n) < 0.5).astype(int).tolist())
            for n in rng.integers(1, 40, 6)
        ]
        for _ in range(3)
    ]
    tok = _hand_tokens(store, "s3", shards, footer=True)
    got, report = artifact_counts(store, tok, 300)
    assert len(report.footer) == 3 and report.scanned == {}
    assert np.array_equal(got, count_artifact_tokens(store, tok, 300))


def test_masked_histogram_matches_unique():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, 20_000).astype(np.int32)
    mask = (rng.random(20_000) < 0.3).astype(np.int8)
    mask[:10] = [2, -1, 1, 0, 0, 1, 1, 1, 0, 1]  # any nonzero value counts
    cases = [
        (ids, mask),
        (ids, mask.astype(bool)),
        (np.array([5, -3, 5, 2], np.int32), np.array([1, 1, 1, 0], np.int8)),  # negative
        (np.array([1, 2_000_000_000, 1], np.int32), np.ones(3, np.int8)),  # sparse: sorts
        (ids, np.zeros_like(mask)),
        (np.zeros(0, np.int32), np.zeros(0, np.int8)),
    ]
    for i, m in cases:
        got_ids, got_counts = masked_histogram(i, m)
        want_ids, want_counts = np.unique(i[m != 0], return_counts=True)
        assert got_ids.dtype == np.int32 and got_counts.dtype == np.int64
        assert got_ids.tolist() == want_ids.tolist()
        assert got_counts.tolist() == want_counts.tolist()


def test_empty_table_footer_roundtrip(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    empty = pa.Table.from_pylist([], schema=TOKENS_SCHEMA)
    with store.publish("tokenize", "e") as w:
        write_parquet(w, "shard-00000.parquet", empty, file_metadata=masked_counts_footer(empty))
    ref = store.ref("tokenize", "e")
    ids, counts = decode_masked_counts(read_footer(store, ref, "shard-00000.parquet"))
    assert ids.size == 0 and counts.size == 0


def test_footer_value_roundtrip_extremes(tmp_path):
    """Negative, int32-extreme and sparse ids and large counts survive the footer encoding."""
    from eagle_core.vocab import encode_masked_counts

    ids = np.array([-(2**31), -3, 0, 1, 70_000, 2**31 - 1], np.int32)
    counts = np.array([1, 2**40, 3, 1, 255, 7], np.int64)
    n = np.minimum(counts, 300)
    rows = [([int(t)] * int(k), [1] * int(k)) for t, k in zip(ids, n, strict=True)]
    store = ArtifactStore(str(tmp_path / "store"))
    table = build_table(
        {
            "sample_id": [str(i) for i in range(len(rows))],
            "source": ["t"] * len(rows),
            "input_ids": [r[0] for r in rows],
            "loss_mask": [r[1] for r in rows],
        },
        schema=TOKENS_SCHEMA,
    )
    levels = sum(max(len(r[0]), 1) for r in rows)
    value = encode_masked_counts(ids, counts, rows=len(rows), levels=levels)
    with store.publish("tokenize", "x") as w:
        write_parquet(w, "shard-00000.parquet", table, file_metadata={MASKED_COUNTS_KEY: value})
    got_ids, got_counts = decode_masked_counts(
        read_footer(store, store.ref("tokenize", "x"), "shard-00000.parquet")
    )
    assert got_ids.tolist() == ids.tolist() and got_counts.tolist() == counts.tolist()
    # and what masked_counts_footer makes from the same table is its real histogram
    real_ids, real_counts = masked_histogram(
        np.concatenate([np.array(r[0], np.int32) for r in rows]),
        np.concatenate([np.array(r[1], np.int8) for r in rows]),
    )
    assert real_ids.tolist() == ids.tolist()
    assert real_counts.tolist() == n.tolist()


def test_choose_draft_ids_selection_equals_the_definition():
    """The O(V) selection (and the sort fallback for huge counts) against the plain rule:
    count desc, ties to the lower id, the smallest unseen ids as filler."""
    from eagle_core.vocab import choose_draft_ids

    rng = np.random.default_rng(3)
    for v, n, scale in [(50, 10, 3), (50, 50, 3), (50, 45, 2), (400, 37, 5), (30, 7, 2**61)]:
        counts = rng.integers(0, scale, v).astype(np.int64)
        counts[rng.random(v) < 0.3] = 0
        ranked = sorted(range(v), key=lambda t: (-counts[t], t))
        seen = [t for t in ranked if counts[t] > 0][:n]
        filler = [t for t in range(v) if counts[t] == 0][: n - len(seen)]
        assert choose_draft_ids(counts, n).tolist() == sorted(seen + filler), (v, n, scale)
