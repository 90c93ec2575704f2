"""Normalization and every reject reason of the record schema."""

from __future__ import annotations

import json

import pytest

from eagle_core.fim import FileSplitter
from eagle_core.records import (
    ALL_REASONS,
    RECORD_COLUMNS,
    Reason,
    RejectCounter,
    Rejected,
    normalize_record,
    records_table,
)


def norm(raw, kind="auto"):
    return normalize_record(
        raw, sample_id="s/1", source="s", kind=kind, split_file=FileSplitter("lines", 0)
    )


def test_sharegpt_and_openai_normalize_to_same_messages():
    share = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ],
    }
    openai = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    a, b = norm(share), norm(openai)
    assert set(a) == set(RECORD_COLUMNS)
    assert a["kind"] == "chat" and a["messages_json"] == b["messages_json"]
    assert json.loads(a["messages_json"])[1] == {"role": "user", "content": "hi"}
    assert a["prefix"] is None and a["input_ids"] is None


def test_reasoning_kept_as_own_field():
    r = norm(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>\nstep 1\n</think>\n\nanswer"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2", "reasoning_content": "why"},
            ]
        }
    )
    msgs = json.loads(r["messages_json"])
    assert msgs[1] == {"role": "assistant", "content": "answer", "reasoning": "step 1"}
    assert msgs[3] == {"role": "assistant", "content": "a2", "reasoning": "why"}


def test_fim_fields_and_whole_file_split_is_seeded():
    r = norm({"prefix": "a = 1\n", "middle": "b = 2\n", "suffix": ""})
    assert (r["kind"], r["prefix"], r["middle"], r["suffix"]) == ("fim", "a = 1\n", "b = 2\n", "")
    content = "".join(f"x{i} = {i}\n" for i in range(20))
    r1, r2 = norm({"content": content}), norm({"content": content})
    assert r1["prefix"] + r1["middle"] + r1["suffix"] == content
    assert (r1["prefix"], r1["middle"]) == (r2["prefix"], r2["middle"])
    assert r1["middle"].strip()


def test_tokens_pass_through():
    r = norm({"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]})
    assert (r["kind"], r["input_ids"], r["loss_mask"]) == ("tokens", [5, 6, 7], [0, 1, 1])


BAD = {
    Reason.NOT_AN_OBJECT: ([1, 2], "auto"),
    Reason.UNKNOWN_FORMAT: ({"text": "hello"}, "auto"),
    Reason.MISSING_MESSAGES: ({"text": "hello"}, "chat"),
    Reason.BAD_MESSAGE: ({"messages": [{"role": "user", "content": 3}]}, "auto"),
    Reason.UNKNOWN_ROLE: (
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "auto",
    ),
    Reason.MISPLACED_SYSTEM: (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "y"},
            ]
        },
        "auto",
    ),
    Reason.EMPTY_ASSISTANT_TURN: (
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  \n"}]},
        "auto",
    ),
    Reason.NO_ASSISTANT_TURN: ({"messages": [{"role": "user", "content": "x"}]}, "auto"),
    Reason.MISSING_FIM_FIELD: ({"prefix": "a", "middle": "b"}, "auto"),
    Reason.EMPTY_MIDDLE: ({"prefix": "a", "middle": " ", "suffix": "c"}, "auto"),
    Reason.EMPTY_FILE: ({"content": "\n\n  "}, "auto"),
    Reason.NOT_UTF8: ({"prefix": "a", "middle": "\ud800", "suffix": ""}, "auto"),
    Reason.BAD_TOKENS: ({"input_ids": [1, 2, 3], "loss_mask": [1, 1]}, "auto"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_reject_reason(reason):
    raw, kind = BAD[reason]
    r = norm(raw, kind)
    assert isinstance(r, Rejected), r
    assert r.reason == reason


@pytest.mark.parametrize(
    "raw",
    [
        {"input_ids": [1, "a"], "loss_mask": [1, 1]},
        {"input_ids": [1, 2], "loss_mask": [1, 2]},
        {"input_ids": [], "loss_mask": []},
    ],
)
def test_bad_tokens_variants(raw):
    assert norm(raw).reason == Reason.BAD_TOKENS


def test_reasons_are_distinct_and_counter_keeps_examples():
    assert len(set(ALL_REASONS)) == len(ALL_REASONS)
    c = RejectCounter(max_examples=2)
    for i in range(5):
        c.add(Reason.EMPTY_MIDDLE, f"id{i}")
    assert c.counts == {Reason.EMPTY_MIDDLE: 5}
    assert c.examples[Reason.EMPTY_MIDDLE] == ["id0", "id1"]


def test_records_table_is_typed_with_nulls():
    t = records_table([norm({"prefix": "a", "middle": "b", "suffix": "c"})])
    assert t.column_names == list(RECORD_COLUMNS)
    assert str(t.schema.field("input_ids").type) == "list<item: int32>"


def test_openai_text_content_parts_are_joined_and_images_rejected():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    r = norm(
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "hi"}]}
    )
    assert json.loads(r["messages_json"])[0]["content"] == "Hello world"
    img = [{"type": "image_url", "image_url": {"url": "x"}}]
    r = norm(
        {"messages": [{"role": "user", "content": img}, {"role": "assistant", "content": "hi"}]}
    )
    assert r.reason == Reason.BAD_MESSAGE
