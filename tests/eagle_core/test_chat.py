"""Chat masks: decoding the masked ids gives back exactly the assistant turns."""

from __future__ import annotations

import pytest
from mask_runs import masked_runs
from transformers import AutoTokenizer

from eagle_core.chat import (
    ChatReason,
    choose_mask_mode,
    find_assistant_spans,
    keep_last_run,
    resolve_chat_template,
    tokenize_chat_batch,
)
from eagle_core.errors import ConfigError
from eagle_core.records import Rejected

CONVS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hello!\n\n  How can I help  you?\n"},
        {"role": "user", "content": "print squares"},
        {"role": "assistant", "content": "for i in range(10):\n    print(i * i)"},
    ],
    [
        {"role": "user", "content": "say Hello"},
        {"role": "assistant", "content": "Hello"},
    ],
    [
        {"role": "user", "content": "ünïcödé 你好"},
        {"role": "assistant", "content": "Très bien — 世界", "reasoning": "think hard"},
    ],
]
EOT = {"chatml": "<|im_end|>", "chatml_generation": "<|im_end|>", "llama3": "<|eot_id|>"}


def expected(conv, template, keep_reasoning):
    out = []
    for m in conv:
        if m["role"] != "assistant":
            continue
        c = m["content"]
        if keep_reasoning and m.get("reasoning"):
            c = f"<think>\n{m['reasoning']}\n</think>\n\n{c}"
        if template == "llama3":
            c = c.strip()  # that template trims content
        out.append(c + EOT[template])
    return out


@pytest.mark.parametrize("template", ["chatml", "chatml_generation", "llama3"])
@pytest.mark.parametrize("keep_reasoning", [True, False])
def test_masked_ids_decode_to_assistant_turns(bpe_tokenizer_factory, template, keep_reasoning):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("qwen", template))
    tmpl = resolve_chat_template(tok)
    mode = choose_mask_mode(tmpl, "auto")
    assert mode == ("generation" if template == "chatml_generation" else "offsets")
    out = tokenize_chat_batch(
        tok, CONVS, template=tmpl, mask_mode=mode, keep_reasoning=keep_reasoning
    ).results()
    for conv, s in zip(CONVS, out, strict=True):
        assert not isinstance(s, Rejected), s
        # the ids are the one-shot tokenization of the rendered text
        text = (
            tok.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in conv], tokenize=False
            )
            if not (keep_reasoning and any(m.get("reasoning") for m in conv))
            else None
        )
        if text is not None:
            assert s.input_ids == tok(text, add_special_tokens=False)["input_ids"]
        got = [tok.decode(r) for r in masked_runs(s.input_ids, s.loss_mask)]
        assert got == expected(conv, template, keep_reasoning)


def test_offsets_and_generation_masks_agree(bpe_tokenizer_factory):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml_generation"))
    tmpl = resolve_chat_template(tok)
    a = tokenize_chat_batch(tok, CONVS, template=tmpl, mask_mode="generation").results()
    b = tokenize_chat_batch(tok, CONVS, template=tmpl, mask_mode="offsets").results()
    assert a == b


@pytest.mark.parametrize("mode", ["offsets", "generation"])
def test_last_turn_only(bpe_tokenizer_factory, mode):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml_generation"))
    s = tokenize_chat_batch(
        tok, CONVS[:1], template=resolve_chat_template(tok), mask_mode=mode, last_turn_only=True
    ).results()[0]
    runs = masked_runs(s.input_ids, s.loss_mask)
    assert [tok.decode(r) for r in runs] == [CONVS[0][-1]["content"] + "<|im_end|>"]


def test_system_and_user_never_masked(bpe_tokenizer_factory):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml"))
    # the answer text also appears in the user turn: the cursor search must not mask it there
    conv = [
        {"role": "system", "content": "Hello"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello"},
    ]
    s = tokenize_chat_batch(tok, [conv], template=resolve_chat_template(tok)).results()[0]
    first_masked = s.loss_mask.index(1)
    assert sum(s.loss_mask) == len(tok.encode("Hello<|im_end|>", add_special_tokens=False))
    assert tok.decode(s.input_ids[:first_masked]).endswith("<|im_start|>assistant\n")


def test_template_error_and_missing_answer_are_rejects(bpe_tokenizer_factory):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml"))
    bad = "{{ raise_exception('roles must alternate') }}"
    r = tokenize_chat_batch(tok, CONVS[:1], template=bad).results()[0]
    assert isinstance(r, Rejected) and r.reason == ChatReason.TEMPLATE_ERROR
    drops = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
        "{% endif %}{% endfor %}"
    )
    r = tokenize_chat_batch(tok, CONVS[1:2], template=drops).results()[0]
    assert isinstance(r, Rejected) and r.reason == ChatReason.ASSISTANT_NOT_RENDERED


def test_template_resolution(bpe_tokenizer_factory, tmp_path):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml"))
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template(tok, str(f)) == f.read_text()
    assert resolve_chat_template(tok, "{{ x }}") == "{{ x }}"
    with pytest.raises(ConfigError, match="chat_template"):
        resolve_chat_template(tok, "no-such-template")
    with pytest.raises(ConfigError, match="generation"):
        choose_mask_mode("{{ x }}", "generation")


def test_helpers():
    assert keep_last_run([0, 1, 1, 0, 1, 1, 0]) == [0, 0, 0, 0, 1, 1, 0]
    text = "u: Hi a: Hi"
    assert find_assistant_spans(
        text, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]
    ) == [(9, 11)]


def test_answers_without_a_special_end_token_are_counted(bpe_tokenizer_factory):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_factory("starcoder", "chatml"))
    plain_end = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\nEND\n{% endfor %}"
    s = tokenize_chat_batch(tok, CONVS[:1], template=plain_end).results()[0]
    assert s.turns_without_eot == 2
    assert [tok.decode(r) for r in masked_runs(s.input_ids, s.loss_mask)] == [
        m["content"] for m in CONVS[0] if m["role"] == "assistant"
    ]
    ok = tokenize_chat_batch(tok, CONVS[:1], template=resolve_chat_template(tok)).results()[0]
    assert ok.turns_without_eot == 0
