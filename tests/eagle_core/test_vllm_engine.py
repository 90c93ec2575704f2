"""vLLM (CPU build, its own venv from `.ci/engine-venv vllm`) loads our exports and measures
them: `evaluate --engine vllm` against our own evaluate on the same prompts.

The target is the small test target with 2 attention heads (head dim 32: vLLM's CPU
attention runs head dims >= 32, the session's 4-head target has 16), trained 300 steps so
its greedy text is not one repeated token; the draft is trained briefly on the target's own
greedy continuations (the recipe of test_speculate.py), so some chains are accepted whole and
some not. Engine starts are the cost (~20-50 s each on 2 cores): 3 in this module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, DynamicCache

from eagle_core.engine_vllm import run_driver, vllm_python
from eagle_core.errors import ConfigError
from eagle_core.evaluate import EvalConfig, EvalPrompt, chat_prompt_ids, evaluate, fim_prompt_ids
from storage import ArtifactStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engines import engine_python  # noqa: E402

STEPS, MAX_NEW = 5, 48
CODE = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "for i in range(10):\n    print(i)\n",
    "    if not isinstance(value, str):\n        raise",
    "from collections import",
    "def __repr__(self):\n    return",
    "try:\n    import",
]
CHATS = ["Write add(a, b).", "What does os.path.join do?", "Explain class Point.", "Import sys."]
FIMS = [
    ("def add(a, b):\n    ", "\n"),
    ("import os\n", "print(1)\n"),
    ("class Point:\n    def __init__(self, x, y):\n", "\n"),
    ("for i in range(10):\n", "\n"),
]


def _train_draft(target, tok, steps: int = 20):
    """An EAGLE-3 draft (vocab 512, real map) trained on the target's greedy continuations."""
    from eagle_core.capture import capture_states
    from eagle_core.draft import DraftConfig, build_draft
    from eagle_core.loss import DraftBatch, TTTConfig, compute_loss

    torch.manual_seed(0)
    ids = torch.tensor([tok.encode(t)[:3] for t in CODE])  # [8, 3]
    cache = DynamicCache()
    with torch.no_grad():
        step_ids = ids
        for _ in range(32):
            logits = target(input_ids=step_ids, past_key_values=cache, use_cache=True).logits
            step_ids = logits[:, -1:].argmax(-1)  # [8, 1]
            ids = torch.cat([ids, step_ids], dim=1)
    v = target.config.vocab_size
    counts = torch.bincount(ids.flatten(), minlength=v).float() + torch.linspace(0, 0.5, v)
    draft_ids = counts.topk(512).indices.sort().values

    class _Map:
        d2t = draft_ids - torch.arange(512)
        t2d = torch.zeros(v, dtype=torch.bool).index_fill_(0, draft_ids, True)

    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=512)
    draft = build_draft(cfg, target_model=target, vocab_map=_Map)
    att = torch.ones_like(ids)
    states = capture_states(target, ids, attention_mask=att, layer_ids=cfg.aux_layer_ids)
    batch = DraftBatch(
        input_ids=ids,
        attention_mask=att,
        loss_mask=att.clone(),
        last_hidden=states.last,
        aux_hidden=states.aux,
    )
    head = target.get_output_embeddings().weight
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    draft.train()
    for _ in range(steps):
        out = compute_loss(draft, batch, head, TTTConfig(steps=STEPS))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return draft.eval(), cfg


@pytest.fixture(scope="module")
def vllm_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The vLLM python, a 2-head small target, its trained draft exported in both layouts
    vLLM loads, and 4 chat + 4 FIM prompts."""
    from eagle_core.demo.build import build_small_target
    from eagle_core.export import ExportConfig, export
    from eagle_core.models import load_target

    python = engine_python("vllm")  # built on first use (minutes), cached per machine
    base = tmp_path_factory.mktemp("vllm_case")
    _, model_dir = build_small_target(str(base), num_heads=2, num_kv_heads=1, steps=300)
    tok = AutoTokenizer.from_pretrained(model_dir)
    target = load_target(model_dir)
    draft, cfg = _train_draft(target, tok)
    store = ArtifactStore(str(base / "store"))
    with store.publish("train", "run") as w:
        state = {k: v.contiguous() for k, v in draft.state_dict().items()}
        w.write_file("final/draft.safetensors", lambda p: save_file(state, p))
        w.write_json("final/draft_config.json", cfg.to_dict())
        w.meta.update(target=model_dir)
    run = store.ref("train", "run")
    exports = {
        fmt: export(store, run, ExportConfig(dtype="float32", format=fmt))
        for fmt in ("eagle3", "speculators")
    }
    chat = [{"role": "assistant", "content": "x"}]
    prompts = [
        EvalPrompt(
            f"chat-{i}",
            "chat",
            tuple(chat_prompt_ids(tok, [{"role": "user", "content": q}, *chat])),
        )
        for i, q in enumerate(CHATS)
    ] + [
        EvalPrompt(f"fim-{i}", "fim", tuple(fim_prompt_ids(tok, p, s)))
        for i, (p, s) in enumerate(FIMS)
    ]
    return {
        "python": python,
        "target": model_dir,
        "store": store,
        "exports": exports,
        "prompts": prompts,
        "eos": [tok.eos_token_id],
    }


@pytest.mark.slow
def test_evaluate_engine_vllm_matches_ours(vllm_case: dict) -> None:
    """(a) vLLM loads the eagle3 export, (b) its speculative greedy output equals its plain
    greedy output, (c) its counters give the τ our evaluate measures on the same prompts."""
    store, exp, prompts = vllm_case["store"], vllm_case["exports"]["eagle3"], vllm_case["prompts"]
    common = dict(max_new_tokens=MAX_NEW, steps=STEPS, max_prompts=len(prompts))
    ours_ref = evaluate(store, exp, EvalConfig(**common), prompts=prompts)
    vcfg = EvalConfig(engine="vllm", vllm_python=vllm_case["python"], **common)
    vllm_ref = evaluate(store, exp, vcfg, prompts=prompts)
    assert vllm_ref.key != ours_ref.key  # the engine is in the key
    ours = store.read_json(ours_ref, "report.json")
    theirs = store.read_json(vllm_ref, "report.json")
    assert theirs["engine"] == "vllm" and theirs["vllm_version"] == "0.32.0"
    print("\nkind  ours-tau  vllm-tau  ours-acc@k / vllm-acc@k")
    for kind in ("chat", "fim", "all"):
        o = ours["all"] if kind == "all" else ours["kinds"][kind]
        t = theirs["all"] if kind == "all" else theirs["kinds"][kind]
        print(
            kind,
            round(o["tau"], 3),
            round(t["tau"], 3),
            o["accept_rate_per_position"],
            t["accept_rate_per_position"],
            t["vllm_counters"],
        )
        assert (
            t["lossless"]
            == t["lossless_checked"]
            == o["lossless"]
            == len([p for p in prompts if kind == "all" or p.kind == kind])
        )
        assert t["vllm_counters"]["num_drafts"] > 0
        assert t["tau"] == pytest.approx(
            1 + t["vllm_counters"]["num_accepted_tokens"] / t["vllm_counters"]["num_drafts"]
        )
        # τ agrees within 0.25: vLLM counts the whole last chain of a generation (drafted and
        # verified although max_tokens then cuts it), ours only the emitted part
        assert t["tau"] == pytest.approx(o["tau"], abs=0.25), kind
        assert t["tau"] >= o["tau"] - 0.02  # that end effect only ever adds accepted tokens
    assert theirs["all"]["speedup"] > 0
    md = store.read_bytes(vllm_ref, "report.md").decode()
    assert "| fim | 4 |" in md


@pytest.mark.slow
def test_speculators_layout_loads_and_matches_eagle3(vllm_case: dict) -> None:
    """(a) the speculators export loads in vLLM (as a speculative model for the target) and
    drafts exactly what the eagle3 export of the same weights drafts."""
    prompts = vllm_case["prompts"]
    request = {
        "target": vllm_case["target"],
        "dtype": "float32",
        "max_tokens": MAX_NEW,
        "stop_token_ids": vllm_case["eos"],
        "prompts": [
            {"id": p.sample_id, "kind": p.kind, "input_ids": list(p.input_ids)} for p in prompts
        ],
        "runs": [
            {
                "name": fmt,
                "draft": vllm_case["store"].path("export", ref.key),
                "num_speculative_tokens": STEPS,
            }
            for fmt, ref in vllm_case["exports"].items()
        ],
    }
    eagle3, spec = run_driver(vllm_case["python"], request)["runs"]
    assert spec["outputs"] == eagle3["outputs"]
    assert spec["counters"] == eagle3["counters"]
    assert sum(c["num_accepted_tokens"] for c in spec["counters"]) > 0


def test_vllm_python_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("EAGLE_PIPELINE_VLLM_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="EAGLE_PIPELINE_VLLM_PYTHON"):
        vllm_python()
    monkeypatch.delenv("EAGLE_PIPELINE_VLLM_PYTHON")
    monkeypatch.setenv("EAGLE_PIPELINE_ENGINES", str(tmp_path / "no-engines"))
    with pytest.raises(ConfigError, match="make engines"):
        vllm_python()
    with pytest.raises(ConfigError, match="engine"):
        EvalConfig(engine="vllm", mode="tree")
