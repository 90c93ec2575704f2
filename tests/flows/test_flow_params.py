"""The run form (flows/params.py): sections, descriptions, selects, limits, no secrets."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from flows.params import (
    QUICK,
    DataParams,
    DatasetSpec,
    EvalParams,
    ExportParams,
    ExtractParams,
    PipelineParams,
    RegenerateParams,
    ReleaseParams,
    StorageParams,
    TokenizeParams,
    TrainParams,
    VocabParams,
    demo_target_config,
    load_pipeline_yaml,
)

SECTIONS = [
    DataParams,
    RegenerateParams,
    TokenizeParams,
    VocabParams,
    ExtractParams,
    TrainParams,
    ExportParams,
    EvalParams,
    ReleaseParams,
    StorageParams,
]


def test_sections_are_in_dag_order_with_docstrings():
    names = [
        n
        for n, f in PipelineParams.model_fields.items()
        if isinstance(f.annotation, type) and f.annotation in SECTIONS
    ]
    assert names == [
        "data",
        "regenerate",
        "tokenize",
        "vocab",
        "extract",
        "train",
        "export",
        "evaluate",
        "release",
        "storage",
    ]
    for section in SECTIONS:
        assert section.__doc__ and len(section.__doc__.strip().splitlines()) == 1, section


@pytest.mark.parametrize("section", SECTIONS + [DatasetSpec, PipelineParams])
def test_every_field_has_a_one_line_description_and_default(section):
    for name, field in section.model_fields.items():
        assert field.description, f"{section.__name__}.{name} has no description"
        assert "\n" not in field.description
        assert len(field.description) <= 100, f"{section.__name__}.{name}: too long"
        if not (section is DatasetSpec and name == "path"):
            assert not field.is_required(), f"{section.__name__}.{name} has no default"


def test_closed_choices_are_enums_in_the_schema():
    schema = PipelineParams.model_json_schema()["$defs"]
    assert schema["TrainParams"]["properties"]["draft_kind"]["enum"] == ["eagle3", "eagle1"]
    assert schema["TrainParams"]["properties"]["mode"]["enum"] == ["offline", "online"]
    assert schema["TrainParams"]["properties"]["zero_stage"]["enum"] == [0, 1, 2, 3]
    assert schema["TokenizeParams"]["properties"]["fim_order"]["enum"] == ["psm", "spm"]
    assert schema["DatasetSpec"]["properties"]["kind"]["enum"][:2] == ["chat", "fim"]
    assert schema["VocabParams"]["properties"]["draft_vocab_size"]["minimum"] == 1
    ttt = schema["TrainParams"]["properties"]["ttt_steps"]
    assert (ttt["minimum"], ttt["maximum"]) == (1, 16)


@pytest.mark.parametrize(
    "bad",
    [
        {"vocab": {"draft_vocab_size": 0}},
        {"train": {"ttt_steps": 17}},
        {"train": {"ttt_steps": 0}},
        {"train": {"zero_stage": 4}},
        {"train": {"draft_kind": "eagle2"}},
        {"tokenize": {"fim_order": "pms"}},
        {"tokenize": {"fim_rate": 1.5}},
        {"data": {"datasets": [{"path": "x.jsonl", "weight": 0}]}},
        {"train": {"lr": -1.0}},
        {"train": {"unknown_field": 1}},
    ],
)
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(ValidationError):
        PipelineParams.model_validate(bad)


@pytest.mark.parametrize(
    "root",
    ["s3://AKIAXXXX:secret@bucket/p", "https://user:pw@host/p", "s3://b/p?X-Amz-Signature=abc"],
)
def test_no_credentials_in_url_parameters(root):
    with pytest.raises(ValidationError, match="credentials"):
        StorageParams(root=root)
    with pytest.raises(ValidationError, match="credentials"):
        RegenerateParams(server_url=root)


def test_no_field_looks_like_a_secret():
    def walk(model: type, prefix: str = "") -> typing.Iterator[str]:
        for name, f in model.model_fields.items():
            yield prefix + name
            for arg in (f.annotation, *typing.get_args(f.annotation)):
                for inner in (arg, *typing.get_args(arg)):
                    if isinstance(inner, type) and hasattr(inner, "model_fields"):
                        yield from walk(inner, prefix + name + ".")

    names = list(walk(PipelineParams))
    assert "regenerate.api_key_env" in names  # the NAME of a variable, documented as such
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if leaf == "api_key_env":
            continue
        assert not any(w in leaf for w in ("secret", "password", "token_value", "api_key")), n


def test_target_other_than_demo_needs_datasets():
    with pytest.raises(ValidationError, match="datasets"):
        PipelineParams(target="/models/llama")
    p = PipelineParams(target="/models/llama", data={"datasets": [{"path": "a.jsonl"}]})
    assert p.data.datasets[0].kind == "chat"


def test_quick_preset_only_when_asked():
    p = PipelineParams()
    assert p.effective() is p
    q = PipelineParams(quick=True, train={"draft_kind": "eagle1", "steps": 9}).effective()
    for section, values in QUICK.items():
        for k, v in values.items():
            if (section, k) != ("train", "steps"):
                assert getattr(getattr(q, section), k) == v
    assert q.train.steps == 9  # a value the user gave wins over the preset
    assert q.train.draft_kind == "eagle1"


def test_pipeline_yaml_round_trip(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "target: /models/t\n"
        "data:\n  datasets:\n    - {path: s3://b/chat.jsonl, kind: chat, weight: 2}\n"
        "    - {path: code/*.jsonl, kind: fim}\n  max_samples: 1000\n"
        "train: {mode: online, nproc: 8, zero_stage: 3}\n"
        "force: [train]\n"
    )
    p = load_pipeline_yaml(str(path))
    assert [d.kind for d in p.data.datasets] == ["chat", "fim"]
    assert p.train.mode == "online" and p.train.zero_stage == 3 and p.force == ["train"]
    path.write_text("train: {ttt_steps: 99}\n")
    with pytest.raises(ValidationError, match="ttt_steps"):
        load_pipeline_yaml(str(path))


def test_sections_convert_to_core_configs():
    dl = DataParams(max_samples=10, seed=3).download_config(
        DatasetSpec(path="a.jsonl", kind="fim", weight=0.5)
    )
    assert dl.max_samples == 10 and dl.seed == 3
    assert dl.sources[0].path == "a.jsonl" and dl.sources[0].kind == "fim"
    assert dl.sources[0].weight == 0.5
    ex = ExportParams().export_config("eagle1", "/t")
    assert ex.format == "eagle1" and ex.target == "/t"
    assert ExportParams(format="speculators").export_config("eagle3", "").format == "speculators"
    xc = ExtractParams(shard_size=7).extract_config("/t")
    assert xc.shard_size == 7 and xc.target == "/t"
    rc = RegenerateParams(enabled=True).regenerate_config(
        target="/t", tokenizer="", fim_order="spm", seed=1
    )
    assert rc.fim_order == "spm" and rc.tokenizer is None
    quick = demo_target_config(True)
    assert quick.num_layers >= 8 and quick.hidden_size < demo_target_config(False).hidden_size


def test_release_section_converts_and_refuses_unusable_names():
    from eagle_core.release import ReleaseConfig

    assert ReleaseParams().release_config() == ReleaseConfig()  # the core's defaults
    rc = ReleaseParams(name="llama-8b.chat", tolerance=0.0).release_config()
    assert (rc.name, rc.tolerance) == ("llama-8b.chat", 0.0)
    for bad in ("", "../x", "a/b", "-x"):
        with pytest.raises(ValidationError, match="name"):
            ReleaseParams(name=bad)
    with pytest.raises(ValidationError, match="tolerance"):
        ReleaseParams(tolerance=-0.1)
    schema = PipelineParams.model_json_schema()
    assert list(schema["properties"]).index("release") == (
        list(schema["properties"]).index("evaluate") + 1
    )


def test_form_defaults_are_the_core_defaults():
    """The form refers to the core's defaults (STYLE.md §2): converting an untouched section
    gives the core config's own defaults, except where the form documents a reason."""
    from eagle_core.extract import ExtractConfig
    from eagle_core.tokenize import TokenizeConfig
    from eagle_core.train import TrainConfig

    tc = TrainParams(precision="fp32").train_config(
        store_url="/s", target="/t", data=["/d"], vocab_map=None
    )
    core = TrainConfig(store="/s", target="/t", data=("/d",))
    for name in (
        "kind",
        "mode",
        "ttt_steps",
        "lr",
        "batch_size",
        "grad_accum",
        "epochs",
        "steps",
        "zero_stage",
        "precision",
        "seed",
    ):
        assert getattr(tc, name) == getattr(core, name), name
    assert tc.checkpoint_every == 500 != core.checkpoint_every  # resumable by design
    assert ExtractParams().extract_config("/t") == ExtractConfig(target="/t")
    assert TokenizeParams().tokenize_config("/t", "auto", 0) == TokenizeConfig(tokenizer="/t")
