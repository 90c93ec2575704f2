"""The fast (flat, numpy) chat / FIM paths equal the reference computations exactly.

Reference = a plain per-conversation Python loop of the assistant-mask rule (every token
overlapping a `{% generation %}` span), transformers' own `apply_chat_template(...,
tokenize=True, return_assistant_tokens_mask=True)` where it implements that rule
(transformers >= 5.24; what the per-sample loop of the reference trainers computes), the
list-based helpers (`keep_last_run`, `build_fim_sample`), and plain Python loops.

transformers <= 5.23 computed a different mask (from the token of a span's first char to the
token of its last, stopping at a span whose first char has no token); the fast path follows
the overlap rule on every version, so the tests that name transformers run only where it
agrees (the lock installs such a version; `make lock` checks the newest).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import transformers
from packaging.version import Version
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from eagle_core.chat import (
    ChatSample,
    flatten_ids,
    generation_token_mask,
    keep_last_run,
    keep_last_run_inplace,
    reference_generation_masks,
    resolve_chat_template,
    template_messages,
    tokenize_chat_batch,
)
from eagle_core.download import DownloadConfig, SourceSpec, download
from eagle_core.fim import FimTokens, build_fim_sample, fim_ids
from eagle_core.records import Rejected
from eagle_core.tokenize import TokenizeConfig, samples, tokenize
from storage import ArtifactStore

WORDS = [
    "def",
    "add(a, b):",
    "return",
    "x",
    "Très",
    "bien",
    "你好",
    "世界",
    "\n",
    "    ",
    "—",
    "1234",
]


def varied_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Multi-turn chats: with/without system prompt, reasoning, empty answers, answers with
    leading/trailing whitespace and newlines, unicode, long answers."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    convs = []
    for i in range(n):
        msgs: list[dict[str, str]] = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are terse. ✓"})
        for t in range(1 + i % 4):
            msgs.append({"role": "user", "content": text(rng.randint(1, 12))})
            shape = (i + t) % 6
            answer = {
                0: "",  # an empty assistant turn
                1: " " + text(5),  # leading space: its offsets are trimmed
                2: text(5) + "\n\n",
                3: text(rng.randint(40, 120)),  # long
                4: "\n" + text(3),
                5: text(8),
            }[shape]
            a = {"role": "assistant", "content": answer}
            if i % 4 == 1:
                a["reasoning"] = text(6)
            msgs.append(a)
        convs.append(msgs)
    return convs


# generation templates whose blocks start at various places (incl. whitespace the byte-level
# offsets trim, and blocks holding only the content, so an empty answer is an empty block)
GEN_TEMPLATES = {
    "chatml_generation": None,  # the tokenizer's own
    "leading_newline": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "{% if m['role'] == 'assistant' %}{% generation %}\n{{ m['content'] }}<|im_end|>"
        "{% endgeneration %}{% else %}\n{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    ),
    "content_only": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def gen_tok(bpe_tokenizer_factory):
    return AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml_generation"))


# transformers' own assistant mask is the overlap rule from 5.24 on (see module docstring)
TRANSFORMERS_OVERLAP_RULE = Version(transformers.__version__) >= Version("5.24.0")
needs_overlap_rule = pytest.mark.skipif(
    not TRANSFORMERS_OVERLAP_RULE,
    reason=f"transformers {transformers.__version__} < 5.24 marks assistant tokens by another "
    "rule; the plain-loop reference covers this version",
)


def per_sample_reference(tok, conv, template, keep_reasoning=True) -> ChatSample:
    """One conversation, the slow obvious way: transformers renders it (its own Jinja and
    generation spans), the tokenizer encodes the text with offsets, and a Python loop marks
    every token that overlaps a span."""
    special = dict(tok.special_tokens_map)
    texts, spans = render_jinja_template(
        conversations=[template_messages(conv, keep_reasoning)],
        chat_template=template,
        return_assistant_tokens_mask=True,
        **special,
    )
    enc = tok(texts[0], add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and e > a for a, b in spans[0])) for s, e in enc["offset_mapping"]]
    return ChatSample(list(enc["input_ids"]), mask)


def transformers_reference(tok, conv, template, keep_reasoning=True) -> ChatSample:
    out = tok.apply_chat_template(
        template_messages(conv, keep_reasoning),
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return ChatSample(list(out["input_ids"]), list(out["assistant_masks"]))


@pytest.mark.parametrize("name", sorted(GEN_TEMPLATES))
@pytest.mark.parametrize("keep_reasoning", [True, False])
def test_fast_generation_masks_equal_plain_loop(gen_tok, name, keep_reasoning):
    template = GEN_TEMPLATES[name] or resolve_chat_template(gen_tok)
    convs = varied_chats(60)
    fast = tokenize_chat_batch(
        gen_tok, convs, template=template, mask_mode="generation", keep_reasoning=keep_reasoning
    ).results()
    for conv, got in zip(convs, fast, strict=True):
        assert got == per_sample_reference(gen_tok, conv, template, keep_reasoning)
    masked = sum(sum(s.loss_mask) for s in fast)
    assert 0 < masked < sum(len(s.input_ids) for s in fast)


@pytest.mark.parametrize("name", sorted(GEN_TEMPLATES))
@pytest.mark.parametrize("keep_reasoning", [True, False])
@needs_overlap_rule
def test_fast_generation_masks_equal_transformers(gen_tok, name, keep_reasoning):
    template = GEN_TEMPLATES[name] or resolve_chat_template(gen_tok)
    convs = varied_chats(60)
    fast = tokenize_chat_batch(
        gen_tok, convs, template=template, mask_mode="generation", keep_reasoning=keep_reasoning
    ).results()
    batched_ref = reference_generation_masks(
        gen_tok, [template_messages(c, keep_reasoning) for c in convs], template
    )
    assert fast == batched_ref
    for conv, got in zip(convs, fast, strict=True):
        assert got == transformers_reference(gen_tok, conv, template, keep_reasoning)


def test_leading_whitespace_span_keeps_every_answer_masked(gen_tok):
    # a block starting with a trimmed-offset char (the newline) masked nothing from there on
    # under transformers <= 5.23; every answer's tokens are masked now
    template = GEN_TEMPLATES["leading_newline"]
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "def add(a, b):"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "return x"},
    ]
    fast = tokenize_chat_batch(
        gen_tok, [conv], template=template, mask_mode="generation"
    ).results()[0]
    assert fast == per_sample_reference(gen_tok, conv, template)
    masked = gen_tok.decode([t for t, m in zip(fast.input_ids, fast.loss_mask, strict=True) if m])
    assert "def add(a, b):" in masked and "return x" in masked
    if TRANSFORMERS_OVERLAP_RULE:
        assert fast == transformers_reference(gen_tok, conv, template)


def test_last_turn_only_equals_reference_then_keep_last_run(gen_tok):
    template = resolve_chat_template(gen_tok)
    convs = varied_chats(40, seed=3)
    fast = tokenize_chat_batch(
        gen_tok, convs, template=template, mask_mode="generation", last_turn_only=True
    ).results()
    for conv, got in zip(convs, fast, strict=True):
        ref = per_sample_reference(gen_tok, conv, template)
        assert got == ChatSample(ref.input_ids, keep_last_run(ref.loss_mask))


def test_offsets_mode_equals_generation_reference(gen_tok):
    # answers without leading whitespace and non-empty: there both modes mean the same tokens
    template = resolve_chat_template(gen_tok)
    convs = [
        [
            m if m["role"] != "assistant" else {**m, "content": m["content"].lstrip() or "ok"}
            for m in c
        ]
        for c in varied_chats(50, seed=5)
    ]
    fast = tokenize_chat_batch(gen_tok, convs, template=template, mask_mode="offsets").results()
    for conv, got in zip(convs, fast, strict=True):
        assert not isinstance(got, Rejected), got
        assert got == per_sample_reference(gen_tok, conv, template)


def test_template_error_rejects_only_that_conversation(gen_tok):
    template = (
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('bad') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    convs = varied_chats(5, seed=7)
    convs[2] = [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]
    out = tokenize_chat_batch(gen_tok, convs, template=template, mask_mode="generation").results()
    assert isinstance(out[2], Rejected) and out[2].reason == "template_error"
    for n in (0, 1, 3, 4):
        assert out[n] == per_sample_reference(gen_tok, convs[n], template)


@pytest.mark.parametrize("max_length", [24, 64, 4096])
def test_stage_output_equals_per_sample_reference_truncated(tmp_path, gen_tok, max_length):
    # download rejects blank answers (empty ones are covered above, on tokenize_chat_batch)
    convs = [
        [
            m if m["role"] != "assistant" or m["content"].strip() else {**m, "content": "ok"}
            for m in c
        ]
        for c in varied_chats(30, seed=11)
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"c{i}", "messages": c}) + "\n" for i, c in enumerate(convs))
    )
    store = ArtifactStore(str(tmp_path / "store"))
    recs = download(
        store, DownloadConfig(sources=(SourceSpec(path=str(path), label="s"),), shuffle=False)
    )
    cfg = TokenizeConfig(tokenizer=gen_tok.name_or_path, format="chat", max_length=max_length)
    ref = tokenize(store, recs, cfg)
    got = {s["sample_id"]: s for s in samples(store, ref)}
    template = resolve_chat_template(gen_tok)
    kept = 0
    for i, conv in enumerate(convs):
        want = per_sample_reference(gen_tok, conv, template)
        ids, mask = want.input_ids[:max_length], want.loss_mask[:max_length]
        sid = next((k for k in got if k.endswith(f"c{i}")), None)
        if not any(mask):
            assert sid is None  # counted as no_loss_tokens
            continue
        assert sid is not None
        kept += 1
        assert got[sid]["input_ids"] == ids
        assert got[sid]["loss_mask"] == mask
    assert kept == ref.counts["rows"] and kept > 0
    assert recs.counts["rows"] == len(convs)
    assert ref.counts["rejected"] == len(convs) - kept


def test_generation_token_mask_and_keep_last_run_match_python_loops():
    rng = np.random.default_rng(0)
    for _ in range(300):
        # ordered token offsets with zero-width tokens, ordered spans (some empty)
        cuts = np.sort(rng.integers(0, 80, int(rng.integers(0, 40)))).tolist()
        offsets = [
            (a, a if rng.random() < 0.2 else b) for a, b in zip(cuts, cuts[1:], strict=False)
        ]
        marks = np.sort(rng.integers(0, 80, 2 * int(rng.integers(0, 5)))).tolist()
        spans = list(zip(marks[::2], marks[1::2], strict=True))
        want = [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]
        got = generation_token_mask(offsets, spans)
        assert got.dtype == np.int8 and got.tolist() == want
        m = got.copy()
        keep_last_run_inplace(m)
        assert m.tolist() == keep_last_run(want)


def test_flatten_ids_round_trips():
    lists = [[], [5], [1, 2, 3], [], [7, 8]]
    flat, bounds = flatten_ids(lists)
    assert flat.dtype == np.int32 and bounds.tolist() == [0, 0, 1, 4, 4, 6]
    assert [flat[bounds[k] : bounds[k + 1]].tolist() for k in range(len(lists))] == lists
    flat, bounds = flatten_ids([])
    assert flat.size == 0 and bounds.tolist() == [0]


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_fim_ids_equal_build_fim_sample(order):
    t = FimTokens("<p>", "<s>", "<m>", "<e>", 900, 901, 902, 903)
    rng = random.Random(1)
    for _ in range(50):
        p, m, s = ([rng.randrange(800) for _ in range(rng.randint(0, 9))] for _ in range(3))
        ids, n_head = fim_ids(t, *(np.array(x, dtype=np.int32) for x in (p, m, s)), order)
        ref = build_fim_sample(t, p, m, s, order)
        assert ids.dtype == np.int32 and ids.tolist() == ref.input_ids
        assert [0] * n_head + [1] * (len(ids) - n_head) == ref.loss_mask
