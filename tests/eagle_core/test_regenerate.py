"""The regenerate stage: local and server backends on a real tiny target.

The target is a 2-layer Llama trained in a few seconds to memorise a handful of answers
(built from the session's small tokenizer), so greedy generation really ends at the
end-of-turn / end-of-middle token and what each prompt yields is known in advance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from eagle_core.errors import ConfigError, DataError, ModelMismatchError
from eagle_core.fim import build_fim_sample, discover_fim_tokens
from eagle_core.records import empty_record, records_table
from eagle_core.regenerate import (
    REJECT_REASONS,
    RegenerateConfig,
    _end_of_turn_ids,
    regenerate,
    regenerate_key,
)
from storage import ArtifactStore, StageRef
from storage.shards import write_parquet

sys.path.insert(0, os.path.dirname(__file__))
from openai_server import OpenAITestServer  # noqa: E402
from tiny_llama import tiny_llama_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SYS = "You are terse."
Q_DOC = "What does `dedent` do?"
A_DOC = "It removes common leading whitespace from every line."
Q1, A1 = "Name a module for sorted lists.", "bisect"
Q2, A2 = "And one for priority queues?", "heapq"
Q_HI, A_HI = "Say hi.", "hi"
Q_NOTHING = "Say nothing."
FIM_ADD = ("def add(a, b):\n    return ", "a + b", "\n\n\ndef sub(a, b):\n    return a - b\n")
FIM_NONE = ("x = 1\n", "", "y = 2\n")  # memorised empty middle: an "empty" reject


def _chat(sid: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    rec = empty_record(sid, "chat", "test")
    rec["messages_json"] = json.dumps(messages)
    return rec


def _fim(sid: str, prefix: str, middle: str, suffix: str) -> dict[str, Any]:
    rec = empty_record(sid, "fim", "test")
    rec.update(prefix=prefix, middle=middle, suffix=suffix)
    return rec


def _records() -> list[dict[str, Any]]:
    tokens = empty_record("t-1", "tokens", "test")
    tokens.update(input_ids=[1, 2, 3], loss_mask=[0, 1, 1])
    return [
        _chat(
            "c-doc",
            [
                {"role": "user", "content": Q_DOC},
                {"role": "assistant", "content": "ORIGINAL doc answer"},
            ],
        ),
        _chat(
            "c-multi",
            [
                {"role": "system", "content": SYS},
                {"role": "user", "content": Q1},
                {"role": "assistant", "content": "ORIGINAL one"},
                {"role": "user", "content": Q2},
                {"role": "assistant", "content": "ORIGINAL two"},
            ],
        ),
        _chat("c-open", [{"role": "user", "content": Q_HI}]),
        _chat(
            "c-nothing",
            [
                {"role": "user", "content": Q_NOTHING},
                {"role": "assistant", "content": "ORIGINAL something"},
            ],
        ),
        _fim("f-add", FIM_ADD[0], "ORIGINAL_MIDDLE", FIM_ADD[2]),
        _fim("f-none", FIM_NONE[0], "z = 3\n", FIM_NONE[2]),
        tokens,
    ]


def test_unknown_kind_and_bad_messages_are_counted_rejects(target_dir: str, tmp_path) -> None:
    odd = empty_record("x-1", "audio", "test")
    bad = _chat("x-2", [])
    no_user = _chat("x-3", [{"role": "assistant", "content": "hello"}])
    store, records = _store_records(str(tmp_path), [*_records(), odd, bad, no_user])
    ref = regenerate(store, records, _cfg(target_dir))
    assert ref.counts["rejected_bad_record"] == 3 and ref.counts["kept"] == 5


def _train_sequences(tok) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) to memorise: the answers only (prompts need not be learned)."""

    def chat(msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        out = tok.apply_chat_template(
            msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])

    fim = discover_fim_tokens(tok)
    seqs = [
        chat([{"role": "user", "content": Q_DOC}, {"role": "assistant", "content": A_DOC}]),
        chat(
            [
                {"role": "system", "content": SYS},
                {"role": "user", "content": Q1},
                {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2},
                {"role": "assistant", "content": A2},
            ]
        ),
        chat([{"role": "user", "content": Q_HI}, {"role": "assistant", "content": A_HI}]),
        chat([{"role": "user", "content": Q_NOTHING}, {"role": "assistant", "content": ""}]),
    ]
    for prefix, middle, suffix in (FIM_ADD, FIM_NONE):
        for order in ("psm", "spm"):
            # pieces encoded apart, as the tokenize stage trains them
            enc = [tok(t, add_special_tokens=False)["input_ids"] for t in (prefix, middle, suffix)]
            sample = build_fim_sample(fim, *enc, order)
            seqs.append((sample.input_ids, sample.loss_mask))
    return seqs


def memorised_model(tok: Any, steps: int, **config: Any) -> Any:
    """A seeded 2-layer Llama (H=64; `config` overrides, e.g. heads) trained on
    `_train_sequences` until it has memorised the answers: its greedy output is known."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(
        len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **config,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    seqs = _train_sequences(tok)
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)  # [B, T] right padded
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, : len(s)] = torch.where(torch.tensor(m) == 1, torch.tensor(s), -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"memorising target did not converge (loss {loss.item():.3f})"
    return model


@pytest.fixture(scope="module")
def target_dir(small_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama that has memorised the answers above (greedy output is known)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    model = memorised_model(tok, steps=120)
    out = str(tmp_path_factory.mktemp("memorised") / "model")
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _store_records(
    root: str, rows: list[dict[str, Any]], per_shard: int = 4
) -> tuple[ArtifactStore, StageRef]:
    store = ArtifactStore(root)
    key = store.key("download", {"test_records": [r["sample_id"] for r in rows]})
    with store.publish("download", key) as w:
        for i in range(0, len(rows), per_shard):
            write_parquet(
                w, f"shard-{i // per_shard:05d}.parquet", records_table(rows[i : i + per_shard])
            )
    return store, store.ref("download", key)


def _read(store: ArtifactStore, ref: StageRef) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name in store.list_files(ref, suffix=".parquet"):
        with store.open(ref, name) as fh:
            for row in pq.read_table(fh).to_pylist():
                rows[row["sample_id"]] = row
    return rows


def _cfg(target: str, **kw: Any) -> RegenerateConfig:
    base: dict[str, Any] = dict(
        target=target,
        max_new_tokens=32,
        temperature=0.0,
        shard_size=3,
        batch_size=4,
        retry_backoff_s=0.01,
    )
    base.update(kw)
    return RegenerateConfig(**base)


def _server_cfg(target: str, url: str, **kw: Any) -> RegenerateConfig:
    return _cfg(target, backend="server", server_url=url, model="test-model", **kw)


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"backend": "vllm"}, "backend"),
        ({"target": ""}, "target"),
        ({"backend": "server"}, "server_url"),
        ({"backend": "server", "server_url": "http://u:p@host:8000"}, "credentials"),
        ({"api_key_env": "sk-abc123-secret"}, "api_key_env"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"fim_order": "pms"}, "fim_order"),
        ({"dtype": "fp8"}, "dtype"),
        ({"concurrency": 0}, "concurrency"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_server_errors": 2.0}, "max_server_errors"),
    ],
)
def test_config_errors_name_the_field(kw: dict[str, Any], field: str) -> None:
    args = {"target": "some/model", **kw}
    with pytest.raises(ConfigError, match=field):
        RegenerateConfig(**args)


def test_key_covers_output_settings_not_operational_knobs() -> None:
    a = RegenerateConfig(target="m", backend="server", server_url="http://h:1")
    same = RegenerateConfig(
        target="m",
        backend="server",
        server_url="http://other:2",
        concurrency=3,
        timeout_s=5,
        retries=0,
        api_key_env="K",
    )
    assert a.key_params() == same.key_params()
    for kw in (
        {"temperature": 0.7},
        {"seed": 1},
        {"max_new_tokens": 7},
        {"fim_order": "spm"},
        {"last_turn_only": True},
        {"target": "n"},
        {"model": "x"},
    ):
        other = RegenerateConfig(
            **{"target": "m", "backend": "server", "server_url": "http://h:1", **kw}
        )
        assert other.key_params() != a.key_params(), kw


def test_end_of_turn_found_from_the_chat_template(small_tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    assert _end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok.chat_template = None  # no template: nothing found, no crash (eos still stops)
    assert _end_of_turn_ids(tok) == []


# ---- local backend --------------------------------------------------------------------------


def test_tokenizer_larger_than_target_vocab_is_refused(
    target_dir: str, small_tokenizer_dir: str, tmp_path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(str(tmp_path / "tok"))
    store, records = _store_records(str(tmp_path / "s"), _records()[:1])
    with pytest.raises(ModelMismatchError, match="embeddings"):
        regenerate(store, records, _cfg(target_dir, tokenizer=str(tmp_path / "tok")))


def test_local_backend_regenerates_chat_and_fim(target_dir: str, tmp_path) -> None:
    store, records = _store_records(str(tmp_path / "a"), _records())
    progress: list[tuple[int, int]] = []
    ref = regenerate(
        store, records, _cfg(target_dir), progress=lambda d, t: progress.append((d, t))
    )
    rows = _read(store, ref)
    c = ref.counts
    # single-turn chat: prompt kept, answer = the target's, original + provenance kept
    doc = json.loads(rows["c-doc"]["messages_json"])
    assert doc == [{"role": "user", "content": Q_DOC}, {"role": "assistant", "content": A_DOC}]
    orig = json.loads(rows["c-doc"]["original_json"])
    assert orig["messages"][1]["content"] == "ORIGINAL doc answer"
    assert orig["generated_by"]["target"] == target_dir
    assert orig["generated_by"]["temperature"] == 0.0 and orig["finish"] == ["stop"]
    # multi-turn chat keeps its structure; both assistant turns are the target's
    multi = json.loads(rows["c-multi"]["messages_json"])
    assert [m["role"] for m in multi] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in multi] == [SYS, Q1, A1, Q2, A2]
    # a chat ending with a user turn gets a generated answer appended
    assert json.loads(rows["c-open"]["messages_json"])[-1] == {"role": "assistant", "content": A_HI}
    # FIM: the middle ends at the end-of-middle token; prefix/suffix untouched
    assert rows["f-add"]["middle"] == FIM_ADD[1]
    assert (rows["f-add"]["prefix"], rows["f-add"]["suffix"]) == (FIM_ADD[0], FIM_ADD[2])
    assert json.loads(rows["f-add"]["original_json"])["middle"] == "ORIGINAL_MIDDLE"
    # pre-tokenized records pass through; empty answers are rejected and counted
    assert rows["t-1"]["input_ids"] == [1, 2, 3] and rows["t-1"]["original_json"] is None
    assert "c-nothing" not in rows and "f-none" not in rows
    assert c["samples"] == 7 and c["kept"] == 5 and c["passthrough"] == 1
    assert c["rows"] == 5 and c["by_kind"] == {
        k: sum(r["kind"] == k for r in rows.values()) for k in ("chat", "fim", "tokens")
    }
    assert c["rejected_empty"] == 2 and c["rejected"] == 2
    assert c["requests"] == 7  # 5 chat turns + 2 FIM middles
    assert c["finish_stop"] == 7 and c["finish_length"] == 0
    assert c["generated_tokens"] > 0 and c["tokens_per_s"] > 0 and c["shards"] == 3
    assert progress[-1] == (7, 7)
    # same schema as download: tokenize reads it unchanged
    with store.open(ref, "shard-00000.parquet") as fh:
        assert pq.read_schema(fh).remove_metadata() == records_table([]).schema.remove_metadata()
    meta = store.manifest("regenerate", ref.key).meta
    assert meta["provenance"]["target"] == target_dir and meta["settings"]["temperature"] == 0.0
    # cached on the second call
    again = regenerate(store, records, _cfg(target_dir))
    assert again == ref


def test_tokenize_reads_regenerated_records(target_dir: str, tmp_path) -> None:
    from transformers import AutoTokenizer

    from eagle_core.tokenize import TokenizeConfig, samples, tokenize

    store, records = _store_records(str(tmp_path), _records())
    regen = regenerate(store, records, _cfg(target_dir))
    tokens = tokenize(store, regen, TokenizeConfig(tokenizer=target_dir))
    got = {s["sample_id"]: s for s in samples(store, tokens)}
    assert set(got) == {"c-doc", "c-multi", "c-open", "f-add", "t-1"}
    tok = AutoTokenizer.from_pretrained(target_dir)
    fim = got["f-add"]
    learned = [i for i, m in zip(fim["input_ids"], fim["loss_mask"], strict=True) if m]
    assert tok.decode(learned) == FIM_ADD[1] + "<|endoftext|>"  # the target's middle + end
    doc = got["c-doc"]
    learned = [i for i, m in zip(doc["input_ids"], doc["loss_mask"], strict=True) if m]
    assert tok.decode(learned) == A_DOC + "<|im_end|>"


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_fim_middle_stops_at_end_token(target_dir: str, tmp_path, order: str) -> None:
    store, records = _store_records(str(tmp_path), [_fim("f-add", *FIM_ADD)])
    ref = regenerate(store, records, _cfg(target_dir, fim_order=order))
    row = _read(store, ref)["f-add"]
    assert row["middle"] == FIM_ADD[1]
    # the target produced exactly middle + one end token, and the end token is not in the text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    n_mid = len(tok(FIM_ADD[1], add_special_tokens=False)["input_ids"])
    assert ref.counts["generated_tokens"] == n_mid + 1
    assert ref.counts["finish_stop"] == 1


def test_last_turn_only_keeps_earlier_turns(target_dir: str, tmp_path) -> None:
    recs = [r for r in _records() if r["sample_id"] == "c-multi"]
    store, records = _store_records(str(tmp_path), recs)
    ref = regenerate(store, records, _cfg(target_dir, last_turn_only=True))
    msgs = json.loads(_read(store, ref)["c-multi"]["messages_json"])
    assert msgs[2]["content"] == "ORIGINAL one"  # kept as downloaded
    assert msgs[4]["content"] != "ORIGINAL two"  # written by the target
    assert ref.counts["requests"] == 1


def test_length_rejects_counted(target_dir: str, tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    max_new = 3
    store, records = _store_records(str(tmp_path), _records())
    ref = regenerate(store, records, _cfg(target_dir, max_new_tokens=max_new))

    def n(text: str) -> int:  # answer tokens + the end token
        return len(tok(text, add_special_tokens=False)["input_ids"]) + 1

    # c-multi: its first turn already decides (a rejected turn ends the record)
    answers = {"c-doc": A_DOC, "c-multi": A1, "c-open": A_HI, "f-add": FIM_ADD[1]}
    cut = {k for k, a in answers.items() if n(a) > max_new}
    assert cut, "the test needs at least one answer longer than max_new_tokens"
    c = ref.counts
    assert c["rejected_length"] == len(cut)
    assert c["rejected_empty"] == 2
    assert set(_read(store, ref)) == {"t-1", *(set(answers) - cut)}
    examples = store.manifest("regenerate", ref.key).meta["reject_examples"]
    assert sorted(examples["length"]) == sorted(cut)
    assert sorted(examples["empty"]) == ["c-nothing", "f-none"]
    assert c["rejected"] == sum(c[f"rejected_{r}"] for r in REJECT_REASONS)


def test_nothing_kept_is_an_error(target_dir: str, tmp_path) -> None:
    recs = [r for r in _records() if r["sample_id"] in ("c-doc", "f-add")]
    store, records = _store_records(str(tmp_path), recs)
    with pytest.raises(DataError, match="max_new_tokens"):
        regenerate(store, records, _cfg(target_dir, max_new_tokens=1))
    assert not store.is_done(
        "regenerate",
        regenerate_key(store, records, _cfg(target_dir, max_new_tokens=1)),
    )


# ---- server backend -------------------------------------------------------------------------


def test_server_backend_matches_local_greedy(target_dir: str, tmp_path) -> None:
    store, records = _store_records(str(tmp_path), _records())
    local = regenerate(store, records, _cfg(target_dir))
    with OpenAITestServer(target_dir) as url:
        server = regenerate(store, records, _server_cfg(target_dir, url, concurrency=3))
    assert local.key != server.key
    a, b = _read(store, local), _read(store, server)
    assert set(a) == set(b)
    for sid in a:
        for col in ("messages_json", "prefix", "middle", "suffix", "input_ids"):
            assert a[sid][col] == b[sid][col], (sid, col)
    for k in (
        "samples",
        "kept",
        "requests",
        "finish_stop",
        "finish_length",
        "rejected_empty",
        "generated_tokens",
    ):
        assert local.counts[k] == server.counts[k], k
    prov = json.loads(b["c-doc"]["original_json"])["generated_by"]
    assert prov["backend"] == "server" and prov["model"] == "test-model"


def test_server_multi_turn_conditions_on_regenerated_turns(target_dir: str, tmp_path) -> None:
    recs = [r for r in _records() if r["sample_id"] in ("c-multi", "f-add")]
    store, records = _store_records(str(tmp_path), recs)
    srv = OpenAITestServer(target_dir)
    with srv as url:
        ref = regenerate(store, records, _server_cfg(target_dir, url))
    chats = [r for r in srv.requests if "messages" in r]
    fims = [r for r in srv.requests if "prompt" in r]
    assert len(chats) == 2 and len(fims) == 1
    second = chats[1]["messages"]
    assert second[2] == {"role": "assistant", "content": A1}  # the regenerated turn, not ORIGINAL
    assert fims[0]["stop_token_ids"] == [discover_fim_tokens(srv.tokenizer).end_id]
    assert fims[0]["prompt"].startswith("<fim_prefix>") and fims[0]["temperature"] == 0.0
    msgs = json.loads(_read(store, ref)["c-multi"]["messages_json"])
    assert [m["content"] for m in msgs] == [SYS, Q1, A1, Q2, A2]


def test_server_errors_retried_then_rejected(target_dir: str, tmp_path) -> None:
    store, records = _store_records(str(tmp_path), _records())
    srv = OpenAITestServer(target_dir, fail=lambda body: 500 if Q_HI in json.dumps(body) else None)
    with srv as url:
        ref = regenerate(
            store, records, _server_cfg(target_dir, url, retries=2, max_server_errors=0.5)
        )
    hi = [r for r in srv.requests if Q_HI in json.dumps(r)]
    assert len(hi) == 3  # 1 try + 2 retries
    c = ref.counts
    assert c["rejected_server_error"] == 1 and c["finish_error"] == 1
    assert "c-open" not in _read(store, ref)
    assert c["kept"] == 4


@pytest.mark.parametrize("root", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_server_outage_stops_without_losing_shards(
    target_dir: str, tmp_path, request: pytest.FixtureRequest, root: str
) -> None:
    url_root = str(tmp_path) if root == "local" else request.getfixturevalue("s3_root")
    store, records = _store_records(url_root, _records())
    down = {"on": False}
    srv = OpenAITestServer(target_dir, fail=lambda body: 503 if down["on"] else None)
    with srv as url:
        cfg = _server_cfg(target_dir, url, retries=1, shard_size=4)
        done: list[int] = []

        def go_down(d: int, t: int) -> None:
            done.append(d)
            down["on"] = True  # after the first shard the server fails every request

        with pytest.raises(DataError, match="server"):
            regenerate(store, records, cfg, progress=go_down)
        assert done == [4]
        key = store.key("regenerate", cfg.key_params(), inputs=[records], code="1")
        assert not store.is_done("regenerate", key)
        before = len(srv.requests)
        down["on"] = False
        ref = regenerate(store, records, cfg)
    # the rerun asked only for shard 1 (two FIM middles); shard 0 came from the journal
    rerun = srv.requests[before:]
    assert len(rerun) == 2 and all("prompt" in r for r in rerun)
    assert ref.counts["samples"] == 7 and ref.counts["shards"] == 2 and ref.counts["kept"] == 5


def test_api_key_from_environment_only(target_dir: str, tmp_path, monkeypatch) -> None:
    secret = "sk-test-0123456789"
    recs = [r for r in _records() if r["sample_id"] == "c-open"]
    store, records = _store_records(str(tmp_path), recs)
    srv = OpenAITestServer(target_dir, api_key=secret)
    with srv as url:
        monkeypatch.delenv("REGEN_TEST_KEY", raising=False)
        with pytest.raises(ConfigError, match="REGEN_TEST_KEY"):
            regenerate(store, records, _server_cfg(target_dir, url, api_key_env="REGEN_TEST_KEY"))
        monkeypatch.setenv("REGEN_TEST_KEY", "wrong")
        with pytest.raises(ConfigError, match="401"):
            regenerate(store, records, _server_cfg(target_dir, url, api_key_env="REGEN_TEST_KEY"))
        monkeypatch.setenv("REGEN_TEST_KEY", secret)
        ref = regenerate(store, records, _server_cfg(target_dir, url, api_key_env="REGEN_TEST_KEY"))
    assert srv.headers[-1]["Authorization"] == f"Bearer {secret}"
    for root, _dirs, files in os.walk(store.path("regenerate", ref.key)):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert secret.encode() not in fh.read(), f


# ---- resume after SIGKILL -------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from storage import ArtifactStore, StageRef
    from eagle_core.regenerate import RegenerateConfig, regenerate
    root, ref, cfg = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    store = ArtifactStore(root)
    # slow shards down so the parent can kill the run between two of them
    regenerate(store, StageRef.from_dict(ref), RegenerateConfig(**cfg),
               progress=lambda d, t: time.sleep(1.0))
    """
)


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(target_dir: str, tmp_path) -> None:
    cfg = _cfg(target_dir, shard_size=2)
    store, records = _store_records(str(tmp_path / "killed"), _records())
    key = regenerate_key(store, records, cfg)
    journal = store.path("regenerate", key, "_journal")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cfg_json = json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, store.root, json.dumps(records.to_dict()), cfg_json],
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.time() + 120
        # shard-00000 and its stats are journaled: kill during the sleep after it
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(journal) and len(os.listdir(journal)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not store.is_done("regenerate", key)
    kept_mtime = os.stat(store.path("regenerate", key, "shard-00000.parquet")).st_mtime_ns

    resumed = regenerate(store, records, cfg)
    assert os.stat(store.path("regenerate", key, "shard-00000.parquet")).st_mtime_ns == kept_mtime
    clean_store, clean_records = _store_records(str(tmp_path / "clean"), _records())
    assert clean_records.key == records.key
    clean = regenerate(clean_store, clean_records, cfg)
    assert clean.key == resumed.key
    m_resumed = store.manifest("regenerate", key)
    m_clean = clean_store.manifest("regenerate", key)
    shards = sorted(n for n in m_clean.files if n.endswith(".parquet"))
    assert shards == sorted(n for n in m_resumed.files if n.endswith(".parquet"))
    assert len(shards) == 4
    for name in shards:
        assert m_resumed.files[name].sha256 == m_clean.files[name].sha256, name
    timing = {"generate_s", "tokens_per_s"}
    assert {k: v for k, v in m_resumed.counts.items() if k not in timing} == {
        k: v for k, v in m_clean.counts.items() if k not in timing
    }


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_regenerate_prints_artifact_url_last(target_dir: str, tmp_path, capsys) -> None:
    from flows.cli import main

    store, records = _store_records(str(tmp_path), _records())
    rc = main(
        [
            "regenerate",
            "--store",
            store.root,
            "--records",
            records.url,
            "--target",
            target_dir,
            "--max-new-tokens",
            "32",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    ref_store, stage, key = ArtifactStore.for_url(out[-1])
    assert stage == "regenerate" and ref_store.is_done(stage, key)
    rows = _read(ref_store, ref_store.ref(stage, key))
    assert rows["f-add"]["middle"] == FIM_ADD[1]


def test_keep_length_keeps_cut_answers(target_dir: str, tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    max_new = 3
    store, records = _store_records(str(tmp_path), _records())
    cut_cfg = _cfg(target_dir, max_new_tokens=max_new, keep_length=True)
    assert store.key("regenerate", cut_cfg.key_params(), inputs=[records]) != store.key(
        "regenerate", _cfg(target_dir, max_new_tokens=max_new).key_params(), inputs=[records]
    )
    ref = regenerate(store, records, cut_cfg)
    c = ref.counts
    assert c["rejected_length"] == 0 and c["finish_length"] > 0
    rows = _read(store, ref)
    assert {"c-doc", "f-add"} <= set(rows)  # their answers are longer than 3 tokens
    middle = rows["f-add"]["middle"]
    assert middle.strip() and len(tok(middle, add_special_tokens=False)["input_ids"]) <= max_new
    assert store.manifest("regenerate", ref.key).meta["provenance"]["keep_length"] is True
    assert json.loads(rows["c-doc"]["original_json"])["finish"] == ["length"]
