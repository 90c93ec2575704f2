"""download: files (local, glob, s3), Hub code path on a local dataset dir, rejects, mixing."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle_core.download import DownloadConfig, SourceSpec, config_from_options, download
from eagle_core.errors import ConfigError, DataError
from eagle_core.records import ALL_REASONS, RECORD_COLUMNS
from storage import ArtifactStore
from storage.shards import iter_batches


def chat(i: int, answer: str = "fine") -> dict:
    return {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"{answer} {i}"},
        ],
    }


def write_jsonl(path, rows: list) -> str:
    with open(path, "wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            fh.write(b"\n")
    return str(path)


def read_records(store, ref) -> list[dict]:
    return [r for b in iter_batches(store, ref) for r in b.to_pylist()]


def test_jsonl_rejects_counted_with_examples(tmp_path):
    rows = [chat(i) for i in range(20)] + [
        b'{"messages": [oops',  # malformed JSON
        b'{"messages": "\xff\xfe"}',  # not UTF-8
        {"messages": [{"role": "user", "content": "x"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "function", "content": "x"}]},  # unknown role
        {"prefix": "a", "middle": "", "suffix": "b"},  # empty middle
        {"prefix": "a", "suffix": "b"},  # missing FIM field
        {"content": ""},  # empty file
        {"text": "?"},  # unknown format
        {"input_ids": [1, 2], "loss_mask": [1]},  # bad pretokenized lengths
        chat(3),  # duplicate id
        [1, 2],  # not an object
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "y"},
            ]
        },  # misplaced system
        {"messages": ["just a string"]},  # bad message
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    chat_only = write_jsonl(tmp_path / "only.jsonl", [chat(0), {"text": "no messages"}])
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = DownloadConfig(
        sources=(
            SourceSpec(path=src, label="c"),
            SourceSpec(path=chat_only, label="o", kind="chat"),
        ),
        max_reject_fraction=0.5,
    )
    ref = download(store, cfg)
    assert ref.counts["rejected_by_reason"] == dict.fromkeys(ALL_REASONS, 1)  # each, once
    assert ref.counts["rows"] == 21 and ref.counts["read"] == 36
    assert ref.counts["rejected"] == len(ALL_REASONS)
    meta = store.manifest("download", ref.key).meta
    assert meta["reject_examples"]["malformed_json"][0].startswith("c/chat.jsonl:21")
    recs = read_records(store, ref)
    assert {r["sample_id"] for r in recs} == {f"c/c{i}" for i in range(20)} | {"o/c0"}
    assert list(recs[0]) == list(RECORD_COLUMNS)
    # cached: same key, nothing is read (the source is gone)
    os.remove(src)
    again = download(store, cfg)
    assert again.key == ref.key and again.counts == ref.counts


def test_too_many_rejects_fail_the_stage(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [chat(0), b"{bad", b"{bad"])
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(DataError, match=r"2 of 3 rows rejected.*malformed_json"):
        download(store, DownloadConfig(sources=(SourceSpec(path=src),)))
    with pytest.raises(DataError, match="no records left"):
        download(
            store,
            DownloadConfig(
                sources=(SourceSpec(path=write_jsonl(tmp_path / "y.jsonl", [b"{bad"])),),
                max_reject_fraction=1.0,
            ),
        )


def test_hub_code_path_on_local_dataset_dir(tmp_path):
    """A directory laid out like a Hub dataset repo goes through load_dataset(...)."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for split, n in (("train", 6), ("test", 2)):
        rows = [
            {
                "conversations": [
                    {"from": "human", "value": f"{split} q{i}"},
                    {"from": "gpt", "value": f"a{i}"},
                ]
            }
            for i in range(n)
        ]
        name = f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(rows), repo / "data" / name)
    store = ArtifactStore(str(tmp_path / "store"))
    ref = download(
        store,
        DownloadConfig(
            sources=(SourceSpec(path=str(repo), split="test", label="hub"),), shuffle=False
        ),
    )
    recs = read_records(store, ref)
    assert [r["sample_id"] for r in recs] == ["hub/test:0", "hub/test:1"]
    assert json.loads(recs[1]["messages_json"])[0] == {"role": "user", "content": "test q1"}
    # save_to_disk layout
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"prefix": "a", "middle": f"m{i}", "suffix": "z"} for i in range(3)]
            )
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    ref2 = download(store, DownloadConfig(sources=(SourceSpec(path=str(tmp_path / "saved")),)))
    assert ref2.counts["by_kind"] == {"fim": 3}
    with pytest.raises(DataError, match="could not be loaded"):
        download(store, DownloadConfig(sources=(SourceSpec(path=str(repo), split="nosuch"),)))


def test_s3_source_and_storage_options_not_mutated(tmp_path, s3_root):
    import fsspec

    url = s3_root.replace("/artifacts", "/data/part-0.jsonl")
    opts = {"client_kwargs": {"endpoint_url": os.environ["EAGLE_PIPELINE_S3_ENDPOINT"]}}
    snapshot = json.dumps(opts, sort_keys=True)
    with fsspec.open(url, "wb", **opts) as fh:
        for i in range(5):
            fh.write(json.dumps(chat(i)).encode() + b"\n")
        fh.write(b"not json\n")
    store = ArtifactStore(str(tmp_path / "store"))
    glob = url.replace("part-0", "part-*")
    ref = download(
        store,
        DownloadConfig(sources=(SourceSpec(path=glob, label="s3"),), max_reject_fraction=0.5),
        storage_options=opts,
    )
    assert ref.counts["rows"] == 5 and ref.counts["rejected_by_reason"]["malformed_json"] == 1
    assert json.dumps(opts, sort_keys=True) == snapshot
    # the same source through the env endpoint (default options)
    ref_env = download(
        store,
        DownloadConfig(sources=(SourceSpec(path=url, label="s3"),), max_reject_fraction=0.5),
        force=True,
    )
    assert ref_env.counts["rows"] == 5


def test_weighted_mix_cap_and_seeded_shuffle(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(10)])
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"prefix": "x", "middle": f"m{i}", "suffix": ""} for i in range(10)]
    )
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = DownloadConfig(
        sources=(
            SourceSpec(path=a, weight=2.0, label="a"),
            SourceSpec(path=b, weight=0.5, label="b"),
        ),
        seed=3,
    )
    ref = download(store, cfg)
    recs = read_records(store, ref)
    ids = [r["sample_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 25
    assert ref.counts["by_kind"] == {"chat": 20, "fim": 5}
    assert sum(i.endswith("#1") for i in ids) == 10
    capped = DownloadConfig(sources=cfg.sources, seed=3, max_samples=7)
    ids7 = [r["sample_id"] for r in read_records(store, download(store, capped))]
    assert ids7 == ids[:7]  # same seed: the cap takes a prefix of the same shuffle
    other = DownloadConfig(sources=cfg.sources, seed=4)
    assert [r["sample_id"] for r in read_records(store, download(store, other))] != ids


def test_whole_files_split_and_json_array(tmp_path):
    code = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(5))
    path = tmp_path / "files.json"
    path.write_text(
        json.dumps([{"id": "f1", "content": code, "path": "m.py"}, {"id": "f2", "content": code}])
    )
    store = ArtifactStore(str(tmp_path / "store"))
    ref = download(
        store,
        DownloadConfig(
            sources=(SourceSpec(path=str(path), label="f"),), fim_split="ast", shuffle=False
        ),
    )
    recs = read_records(store, ref)
    assert [r["kind"] for r in recs] == ["fim", "fim"]
    for r in recs:
        assert r["prefix"] + r["middle"] + r["suffix"] == code and r["middle"].strip()
    assert store.manifest("download", ref.key).meta["fim_ast_fallbacks"] == 0


def test_config_validation_and_options(tmp_path):
    with pytest.raises(ConfigError, match="weight"):
        SourceSpec(path="x", weight=0)
    with pytest.raises(ConfigError, match="kind"):
        SourceSpec(path="x", kind="text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sources is empty"):
        DownloadConfig(sources=())
    with pytest.raises(ConfigError, match="max_reject_fraction"):
        DownloadConfig(sources=(SourceSpec(path="x"),), max_reject_fraction=2)
    with pytest.raises(ConfigError, match="duplicate labels"):
        DownloadConfig(sources=(SourceSpec(path="x"), SourceSpec(path="x")))
    cfg = config_from_options(["s3://b/x.jsonl:2", "org/ds"], kind="chat", split="test")
    assert cfg.sources[0].path == "s3://b/x.jsonl" and cfg.sources[0].weight == 2.0
    assert cfg.sources[1].split == "test" and cfg.sources[1].kind == "chat"
    with pytest.raises(DataError, match="matches no files"):
        download(
            ArtifactStore(str(tmp_path / "s")),
            DownloadConfig(sources=(SourceSpec(path=str(tmp_path / "none*.jsonl")),)),
        )


def test_compressed_jsonl_and_local_glob(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as fh:
        fh.write(b"".join(json.dumps(chat(i)).encode() + b"\n" for i in range(3)))
    write_jsonl(tmp_path / "b.jsonl", [chat(i) for i in range(3, 5)])
    store = ArtifactStore(str(tmp_path / "store"))
    ref = download(
        store,
        DownloadConfig(
            sources=(SourceSpec(path=str(tmp_path / "*.jsonl*"), label="g"),), shuffle=False
        ),
    )
    assert [r["sample_id"] for r in read_records(store, ref)] == [f"g/c{i}" for i in range(5)]


def test_streamed_path_stops_reading_at_the_cap(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(50)])
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = DownloadConfig(
        sources=(SourceSpec(path=a, weight=2, label="a"),),
        shuffle=False,
        max_samples=5,
        shard_size=2,
    )
    ref = download(store, cfg)
    ids = [r["sample_id"] for r in read_records(store, ref)]
    assert ids == ["a/c0", "a/c0#1", "a/c1", "a/c1#1", "a/c2"]
    assert ref.counts["shards"] == 3 and ref.counts["read"] == 3  # 47 rows never read
    assert store.manifest("download", ref.key).meta["streamed"] is True
    # streamed rejects over the threshold: no manifest
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(0), b"{x", b"{y"])
    with pytest.raises(DataError, match="rejected"):
        download(store, DownloadConfig(sources=(SourceSpec(path=bad),), shuffle=False))
