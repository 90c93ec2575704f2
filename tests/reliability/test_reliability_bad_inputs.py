"""Bad input catalog: each kind of bad input gives a clear error or a counted reject.

Every test goes through a stage's public entry point (download / tokenize / scan_vocab /
extract_hidden / launch_training / export / the CLI) with one kind of bad input and asserts
either a `PipelineError` whose message names the record, file or parameter and carries a
`Fix:`, or a reject counted by reason in the manifest with the record's id as an example.
Several kinds are also unit-tested by their stage's owner (tests/eagle_core/test_records.py,
test_tokenize.py, test_capture.py, test_train.py, test_export.py, tests/storage/...); here
they are exercised end to end, cheaply, in one place.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from reliability_helpers import (
    chat_rows,
    cli,
    fim_rows,
    plain_tokenizer,
    tiny_llama,
    tokenizer_without_template,
    write_jsonl,
)

from eagle_core.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    ModelMismatchError,
    PipelineError,
    StoreError,
    TrainingError,
)
from storage import ArtifactStore, StageRef


# ---- shared: a small real pipeline on the session's small target ---------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory, small_tokenizer_dir: str, small_target_dir: str) -> dict:
    """download -> tokenize -> scan_vocab -> extract_hidden on 8 chat records (seconds)."""
    from eagle_core.download import config_from_options, download
    from eagle_core.extract import ExtractConfig, extract_hidden
    from eagle_core.tokenize import TokenizeConfig, tokenize
    from eagle_core.vocab import VocabConfig, scan_vocab

    d = tmp_path_factory.mktemp("pipe")
    store = ArtifactStore(str(d / "store"))
    src = write_jsonl(str(d / "chat.jsonl"), chat_rows(8))
    records = download(store, config_from_options([src]))
    tokens = tokenize(store, records, TokenizeConfig(tokenizer=small_tokenizer_dir))
    vocab = scan_vocab(store, [tokens], VocabConfig(draft_vocab_size=64))
    hidden = extract_hidden(store, tokens, ExtractConfig(target=small_target_dir, batch_size=8))
    return dict(
        dir=d, store=store, records=records, tokens=tokens, vocab=vocab, hidden=hidden,
        tokenizer=small_tokenizer_dir, target=small_target_dir,
    )  # fmt: skip


def _download(tmp_path, rows, tail: str = "", encoding: str = "utf-8", **options):
    """Run the download stage on one jsonl file; returns (store, manifest, file name)."""
    from eagle_core.download import config_from_options, download

    tmp_path.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(str(tmp_path / "data.jsonl"), rows, tail=tail, encoding=encoding)
    store = ArtifactStore(str(tmp_path / "store"))
    ref = download(store, config_from_options([src], max_reject_fraction=0.5, **options))
    return store, store.manifest("download", ref.key), src


def _assert_one_reject(manifest, reason: str, *needles: str) -> None:
    """Exactly one reject, of `reason`, whose example names every needle; rows still kept."""
    counts = manifest.counts
    assert counts["rejected"] == 1, counts
    assert counts["rejected_by_reason"][reason] == 1, counts["rejected_by_reason"]
    assert counts["rows"] == counts["read"] - 1
    examples = manifest.meta["reject_examples"][reason]
    assert len(examples) == 1
    for n in needles:
        assert n in examples[0], (n, examples)


def _assert_clear(exc: BaseException, *needles: str) -> None:
    """A pipeline error whose message names every needle and says how to fix it."""
    assert isinstance(exc, PipelineError), type(exc)
    msg = str(exc)
    assert "Fix: " in msg and exc.fix.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)


# ---- 1-10: records (download) ---------------------------------------------------------------
def test_malformed_json_line_is_a_counted_reject_naming_file_and_line(tmp_path):
    _, m, _ = _download(tmp_path, chat_rows(9), tail='{"id": "bad", "messages": [\n')
    _assert_one_reject(m, "malformed_json", "data.jsonl:10")


def test_latin1_encoded_line_is_a_counted_not_utf8_reject(tmp_path):
    bad = {"id": "lat", "messages": [{"role": "user", "content": "café"},
                                     {"role": "assistant", "content": "ça va"}]}  # fmt: skip
    _, m, _ = _download(tmp_path, [*chat_rows(9), bad], encoding="latin-1")
    _assert_one_reject(m, "not_utf8", "data.jsonl:10", "utf-8")


def test_empty_file_is_a_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError) as exc:
        _download(tmp_path, [])
    _assert_clear(exc.value, str(tmp_path / "data.jsonl"), "no records")


def test_missing_messages_is_a_counted_reject(tmp_path):
    _, m, _ = _download(tmp_path, [*chat_rows(9), {"id": "nm", "text": "hi"}], kind="chat")
    _assert_one_reject(m, "missing_messages", "nm", "messages")
    # kind auto: neither chat nor FIM nor token fields -> unknown_format, fields listed
    _, m, _ = _download(tmp_path / "auto", [*chat_rows(9), {"id": "nm", "text": "hi"}])
    _assert_one_reject(m, "unknown_format", "nm", "'text'")


def test_unknown_role_is_a_counted_reject_naming_turn_and_role(tmp_path):
    bad = {"id": "tool", "messages": [{"role": "tool", "content": "{}"},
                                      {"role": "assistant", "content": "ok"}]}  # fmt: skip
    _, m, _ = _download(tmp_path, [*chat_rows(9), bad])
    _assert_one_reject(m, "unknown_role", "tool", "turn 0", "'tool'")


def test_missing_assistant_turn_is_a_counted_reject(tmp_path):
    bad = {"id": "noans", "messages": [{"role": "user", "content": "hello?"}]}
    _, m, _ = _download(tmp_path, [*chat_rows(9), bad])
    _assert_one_reject(m, "no_assistant_turn", "noans")


def test_empty_assistant_turn_is_a_counted_reject(tmp_path):
    bad = {"id": "blank", "messages": [{"role": "user", "content": "hello?"},
                                       {"role": "assistant", "content": " \n "}]}  # fmt: skip
    _, m, _ = _download(tmp_path, [*chat_rows(9), bad])
    _assert_one_reject(m, "empty_assistant_turn", "blank", "turn 1")


def test_fim_record_missing_a_field_is_a_counted_reject(tmp_path):
    _, m, _ = _download(tmp_path, [*fim_rows(9), {"id": "nomid", "prefix": "a", "suffix": "b"}])
    _assert_one_reject(m, "missing_fim_field", "nomid", "middle")


def test_fim_empty_middle_is_a_counted_reject(tmp_path):
    bad = {"id": "em", "prefix": "a = ", "middle": "", "suffix": "\n"}
    _, m, _ = _download(tmp_path, [*fim_rows(9), bad])
    _assert_one_reject(m, "empty_middle", "em")


def test_pretokenized_length_mismatch_is_a_counted_reject(tmp_path):
    rows = [{"id": f"t{i}", "input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]} for i in range(9)]
    bad = {"id": "short", "input_ids": [1, 2, 3], "loss_mask": [0, 1]}
    _, m, _ = _download(tmp_path, [*rows, bad])
    _assert_one_reject(m, "bad_tokens", "short", "length 2", "length 3")


def test_too_many_rejects_fail_the_stage_with_the_reasons(tmp_path):
    from eagle_core.download import config_from_options, download

    src = write_jsonl(str(tmp_path / "d.jsonl"), chat_rows(2), tail="not json\n" * 3)
    with pytest.raises(DataError) as exc:
        download(ArtifactStore(str(tmp_path / "s")), config_from_options([src]))
    _assert_clear(exc.value, "3 of 5 rows rejected", "malformed_json", "max_reject_fraction")


# ---- 11-13: tokenize ------------------------------------------------------------------------
def test_tokenizer_without_fim_tokens_is_a_config_error(tmp_path, pipe):
    from eagle_core.download import config_from_options, download
    from eagle_core.tokenize import TokenizeConfig, tokenize

    store = pipe["store"]
    src = write_jsonl(str(tmp_path / "f.jsonl"), fim_rows(4))
    fim = download(store, config_from_options([src]))
    tok = plain_tokenizer(str(tmp_path / "plain"))
    for fmt in ("fim", "auto"):
        with pytest.raises(ConfigError) as exc:
            tokenize(store, fim, TokenizeConfig(tokenizer=tok, format=fmt))
        _assert_clear(exc.value, tok, "no FIM tokens", "fim_tokens")


def test_tokenizer_without_chat_template_is_a_config_error(tmp_path, pipe):
    from eagle_core.tokenize import TokenizeConfig, tokenize

    tok = tokenizer_without_template(pipe["tokenizer"], str(tmp_path / "notemplate"))
    with pytest.raises(ConfigError) as exc:
        tokenize(pipe["store"], pipe["records"], TokenizeConfig(tokenizer=tok, format="chat"))
    _assert_clear(exc.value, tok, "no chat template", "chat_template")


def test_sequence_longer_than_max_length_without_loss_tokens_is_a_counted_reject(tmp_path, pipe):
    from eagle_core.download import config_from_options, download
    from eagle_core.tokenize import TokenizeConfig, tokenize

    store = pipe["store"]
    long = {"id": "long", "messages": [{"role": "user", "content": "word " * 300},
                                       {"role": "assistant", "content": "ok"}]}  # fmt: skip
    src = write_jsonl(str(tmp_path / "l.jsonl"), [*chat_rows(5), long])
    records = download(store, config_from_options([src]))
    ref = tokenize(store, records, TokenizeConfig(tokenizer=pipe["tokenizer"], max_length=64))
    m = store.manifest("tokenize", ref.key)
    assert m.counts["rows"] == 5 and m.counts["rejected_by_reason"] == {"no_loss_tokens": 1}
    assert any("long" in e for e in m.meta["reject_examples"]["no_loss_tokens"])


def test_pretokenized_ids_outside_the_vocab_are_refused(tmp_path, pipe):
    from eagle_core.download import config_from_options, download
    from eagle_core.tokenize import TokenizeConfig, tokenize

    store = pipe["store"]
    rows = [{"id": f"t{i}", "input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]} for i in range(4)]
    rows.append({"id": "huge", "input_ids": [1, 2, 10**6], "loss_mask": [0, 1, 1]})
    records = download(store, config_from_options([write_jsonl(str(tmp_path / "t.jsonl"), rows)]))
    try:
        ref = tokenize(store, records, TokenizeConfig(tokenizer=pipe["tokenizer"]))
    except PipelineError as exc:  # refused as a whole: must name the record
        _assert_clear(exc, "huge")
    else:  # or counted
        m = store.manifest("tokenize", ref.key)
        assert m.counts["rows"] == 4 and m.counts["rejected"] == 1, m.counts
        assert any("huge" in e for v in m.meta["reject_examples"].values() for e in v)


# ---- 14-17: vocab, layer ids, architecture --------------------------------------------------
def test_draft_vocab_larger_than_target_vocab_is_a_config_error(pipe):
    from transformers import AutoConfig

    from eagle_core.draft import DraftConfig
    from eagle_core.vocab import VocabConfig, scan_vocab

    with pytest.raises(ConfigError) as exc:
        scan_vocab(pipe["store"], [pipe["tokens"]], VocabConfig(draft_vocab_size=5000))
    _assert_clear(exc.value, "draft_vocab_size=5000", "larger than the target vocab")
    tcfg = AutoConfig.from_pretrained(pipe["target"])
    with pytest.raises(ConfigError) as exc:
        DraftConfig.from_target_config(tcfg, draft_vocab_size=tcfg.vocab_size + 1)
    _assert_clear(exc.value, f"draft_vocab_size={tcfg.vocab_size + 1}")


@pytest.mark.parametrize("ids,needle", [((1, 3, 8), "[8] out of range"), ((-1, 2, 5), "[-1]")])
def test_layer_ids_out_of_range_are_a_config_error(pipe, ids, needle):
    from eagle_core.extract import ExtractConfig, extract_hidden

    with pytest.raises(ConfigError) as exc:
        extract_hidden(
            pipe["store"], pipe["tokens"], ExtractConfig(target=pipe["target"], aux_layer_ids=ids)
        )
    _assert_clear(exc.value, "aux_layer_ids", needle, "8-layer target")


def test_duplicated_layer_ids_are_a_config_error(pipe):
    from eagle_core.extract import ExtractConfig, extract_hidden

    with pytest.raises(ConfigError) as exc:
        extract_hidden(
            pipe["store"],
            pipe["tokens"],
            ExtractConfig(target=pipe["target"], aux_layer_ids=(1, 3, 3)),
        )
    _assert_clear(exc.value, "aux_layer_ids (1, 3, 3)", "repeat")


class _SequentialLM(torch.nn.Module):
    """A causal-LM-shaped module whose 4 'decoder layers' live in an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"num_hidden_layers": 4})()
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])

    def forward(self, input_ids, **_):
        return self.layers(self.embed(input_ids))


def test_target_without_decoder_modulelist_is_a_model_mismatch():
    from eagle_core.capture import capture_states

    with pytest.raises(ModelMismatchError) as exc:
        capture_states(_SequentialLM(), torch.zeros(1, 3, dtype=torch.long), layer_ids=(0, 1, 2))
    _assert_clear(exc.value, "_SequentialLM", "ModuleList of 4 decoder layers")


# ---- 18-22: training inputs that do not belong together --------------------------------------
def _train_cfg(pipe: dict, **kw):
    from eagle_core.train import TrainConfig

    base = dict(
        store=pipe["store"].root, target=pipe["target"], data=(pipe["hidden"].url,),
        vocab_map=pipe["vocab"].url, steps=2, batch_size=2, ttt_steps=2, heldout_fraction=0.0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_hidden_shards_from_another_target_are_refused(tmp_path, pipe):
    from eagle_core.launch import launch_training

    other = tiny_llama(str(tmp_path / "other"), vocab_size=1024, hidden_size=32)
    with pytest.raises(ModelMismatchError) as exc:
        launch_training(_train_cfg(pipe, target=other), nproc=1, launcher="inline")
    _assert_clear(exc.value, pipe["hidden"].url, "target")
    assert not pipe["store"].fs.glob(pipe["store"].root_path + "/train/*/manifest.json")


def test_hidden_shards_with_other_layer_ids_are_refused(pipe):
    from eagle_core.launch import launch_training

    with pytest.raises(ModelMismatchError) as exc:
        launch_training(_train_cfg(pipe, aux_layer_ids=(1, 2, 3)), nproc=1, launcher="inline")
    _assert_clear(exc.value, pipe["hidden"].url, "train.aux_layer_ids=[1, 2, 3]")


def test_vocab_map_from_another_tokenizer_is_refused_at_train(tmp_path, pipe):
    from eagle_core.launch import launch_training
    from eagle_core.tokenize import TokenizeConfig, tokenize
    from eagle_core.vocab import VocabConfig, scan_vocab

    store = pipe["store"]
    with open(os.path.join(pipe["tokenizer"], "chat_template.jinja")) as fh:
        other = plain_tokenizer(str(tmp_path / "other-tok"), chat_template=fh.read())
    tokens = tokenize(store, pipe["records"], TokenizeConfig(tokenizer=other))
    vocab = scan_vocab(store, [tokens], VocabConfig(draft_vocab_size=64))
    with pytest.raises(ModelMismatchError) as exc:
        launch_training(_train_cfg(pipe, vocab_map=vocab.url), nproc=1, launcher="inline")
    _assert_clear(exc.value, "vocab map", "V=1024")


def test_deepspeed_config_with_unknown_keys_is_refused_before_launch(tmp_path, pipe):
    from eagle_core.launch import launch_training

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimisation": {"stage": 1}, "bf16": {"enabled": False}}))
    with pytest.raises(ConfigError) as exc:  # deepspeed launcher, 2 ranks: nothing starts
        launch_training(_train_cfg(pipe, deepspeed_config=str(ds)), nproc=2, launcher="deepspeed")
    _assert_clear(exc.value, str(ds), "unknown keys ['zero_optimisation']")


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_samples_and_keeps_last_checkpoint(tmp_path, pipe):
    """Every sample's hidden states are NaN from the 4th step on: training stops at step 4
    naming the batch's sample ids, publishes nothing, and keeps the step-3 checkpoint."""
    from eagle_core import checkpoint as ckpt
    from eagle_core.extract import iter_hidden_samples
    from eagle_core.train import run_directory, run_training, train_key
    from storage.shards import build_table, write_parquet

    store = ArtifactStore(str(tmp_path / "store"))
    src = pipe["store"]
    rows = list(iter_hidden_samples(src, pipe["hidden"]))
    rows[-1]["aux_hidden"] = rows[-1]["aux_hidden"].clone()
    rows[-1]["aux_hidden"][0] = float("nan")
    key = store.key("extract_hidden", {"nan": rows[-1]["sample_id"]})
    with store.publish("extract_hidden", key) as w:
        table = build_table(
            {"sample_id": [r["sample_id"] for r in rows],
             "input_ids": [[int(x) for x in r["input_ids"]] for r in rows],
             "loss_mask": [[int(x) for x in r["loss_mask"]] for r in rows]},
            {"aux_hidden": [r["aux_hidden"] for r in rows],
             "last_hidden": [r["last_hidden"] for r in rows]},
        )  # fmt: skip
        write_parquet(w, "shard-00000.parquet", table)
        w.meta.update(src.manifest("extract_hidden", pipe["hidden"].key).meta)
    bad_id = rows[-1]["sample_id"]
    cfg = _train_cfg(
        pipe, store=store.root, data=(store.url("extract_hidden", key),), batch_size=1,
        steps=len(rows), checkpoint_every=1, group_steps=1,
    )  # fmt: skip
    with pytest.raises(TrainingError) as exc:
        run_training(store, cfg)
    _assert_clear(exc.value, "non-finite loss", bad_id)
    step = int(re.search(r"at step (\d+)", str(exc.value)).group(1))
    key = train_key(store, cfg)
    assert not store.is_done("train", key)
    latest = ckpt.find_latest_complete(run_directory(store, key))
    if step > 1:
        assert latest is not None and latest.endswith(ckpt.checkpoint_tag(step - 1))
    else:
        assert latest is None


# ---- 23-26: export, store, parameters -------------------------------------------------------
def test_export_of_an_incomplete_training_run_is_an_artifact_error(tmp_path):
    from eagle_core.export import ExportConfig, export

    store = ArtifactStore(str(tmp_path / "store"))
    unfinished = StageRef(stage="train", key="k0", url=store.url("train", "k0"))
    os.makedirs(os.path.join(store.path("train", "k0"), "checkpoints", "step-00000002"))
    with pytest.raises(ArtifactError) as exc:
        export(store, unfinished, ExportConfig(target="t"))
    _assert_clear(exc.value, "k0")
    with pytest.raises(ArtifactError) as exc:  # a step checkpoint of an unfinished run
        export(store, unfinished, ExportConfig(target="t", checkpoint="step-00000002"))
    _assert_clear(exc.value, "k0", "not finished")
    assert not store.fs.glob(store.root_path + "/export/*/manifest.json")


@pytest.mark.slow
def test_export_for_a_target_with_another_vocab_is_refused(tmp_path, pipe):
    from eagle_core.export import ExportConfig, export
    from eagle_core.launch import launch_training

    run = launch_training(_train_cfg(pipe), nproc=1, launcher="inline")
    other = tiny_llama(str(tmp_path / "v300"), vocab_size=300, hidden_size=64)
    for fmt in ("eagle3", "speculators"):
        with pytest.raises(ModelMismatchError) as exc:
            export(pipe["store"], run, ExportConfig(target=other, format=fmt))
        _assert_clear(exc.value, "vocab size 1024 vs target 300")


def test_unknown_protocol_root_is_a_store_error_and_a_cli_exit_2(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(StoreError) as exc:
        ArtifactStore("nosuchproto://bucket/prefix")
    _assert_clear(exc.value, "nosuchproto", "s3://")
    src = write_jsonl(str(tmp_path / "c.jsonl"), chat_rows(2))
    assert main(["download", "--source", src, "--store", "nosuchproto://b/p"]) == 2
    err = capsys.readouterr().err
    assert "protocol 'nosuchproto' is not usable" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "section,bad,field",
    [
        ("train", {"ttt_steps": 0}, "ttt_steps"),
        ("train", {"lr": -1.0}, "lr"),
        ("vocab", {"draft_vocab_size": 0}, "draft_vocab_size"),
        ("tokenize", {"max_length": 1}, "max_length"),
        ("storage", {"root": "s3://AKIAXXXX:secret@bucket/p"}, "root"),
    ],
)
def test_form_parameters_failing_validation_name_the_field(section, bad, field):
    from pydantic import ValidationError

    from flows.params import PipelineParams

    with pytest.raises(ValidationError) as exc:
        PipelineParams.model_validate({section: bad})
    locs = [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]
    assert any(loc.endswith(f"{section}.{field}") for loc in locs), locs


@pytest.mark.slow
def test_cli_invalid_option_values_exit_2_naming_the_field(tmp_path, pipe):
    r = cli("scan-vocab", "--tokens", pipe["tokens"].url, "--draft-vocab-size", "0",
            "--store", str(tmp_path / "s"))  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "draft_vocab_size" in r.stderr and "Traceback" not in r.stderr


def test_cli_artifact_of_the_wrong_stage_is_refused(pipe, capsys):
    from flows.cli import main

    rc = main(["tokenize", "--records", pipe["tokens"].url, "--tokenizer", pipe["tokenizer"],
               "--store", pipe["store"].root])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "is a 'tokenize' artifact, expected 'download'" in err and "Fix:" in err
