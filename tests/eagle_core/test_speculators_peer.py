"""speculators 0.9.0 (the real package, in its own venv) loads our `speculators` export AS
SHIPPED and computes our draft's logits.

The export is of a randomly initialised, non-trivial draft (random norms and a scattered
draft vocab, so a swapped norm or a wrong vocab row would show) of the small test target,
published as a demo-target artifact: the export's `verifier.name_or_path` must resolve to
that artifact's `model/` directory by itself, because speculators reads the verifier's
config (layer count, hidden size) and weights from it. tests/peers/speculators_forward.py
runs `SpeculatorModel.from_pretrained(<export>)` and one forward in the speculators venv on
target states and ids this test saves; its step-0 logits must equal our loader's.

Without `embed_tokens.weight` in the export, what speculators embeds with is not defined: in
one run its embeddings were uninitialised memory (logits off by 1.47), in another (the full
suite) they equalled the target's. That is why the speculators layout includes them by
default; no test pins the undefined case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_core.capture import capture_states
from eagle_core.draft import DraftConfig, DraftKVCache, build_draft
from eagle_core.export import ExportConfig, export, load_exported_draft, load_safetensors_keys
from eagle_core.models import load_target, load_tokenizer
from eagle_core.vocab import VocabMap
from storage import ArtifactStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engines import engine_python  # noqa: E402

pytestmark = pytest.mark.slow

PEER = Path(__file__).resolve().parents[1] / "peers" / "speculators_forward.py"
DRAFT_VOCAB = 512
TOL = 1e-4  # float32 on both sides; measured ~1e-6


@pytest.fixture(scope="module")
def peer_python() -> str:
    return engine_python("speculators")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_tokenizer_dir: str, small_target_dir: str) -> dict:
    """A store with the small target as a demo-target artifact, a random draft's training
    run, and the fixed inputs (target states of a chat, the next tokens, positions)."""
    root = tmp_path_factory.mktemp("spec_peer")
    store = ArtifactStore(str(root / "store"))
    with store.publish("build_demo_target", "small", params={"test": "speculators"}) as w:
        w.add_dir(small_tokenizer_dir, prefix="tokenizer")
        w.add_dir(small_target_dir, prefix="model")
    target_url = store.url("build_demo_target", "small")
    target = load_target(target_url)

    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=DRAFT_VOCAB)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randperm(cfg.vocab_size, generator=gen)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    vocab = VocabMap(d2t=ids - torch.arange(DRAFT_VOCAB), t2d=t2d)
    torch.manual_seed(0)
    draft = build_draft(cfg, target_model=target, vocab_map=vocab)
    with torch.no_grad():  # norms away from 1: a swapped or skipped norm changes the logits
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    with store.publish("train", "run") as w:
        w.write_file("final/draft.safetensors", lambda p: save_file(dict(draft.state_dict()), p))
        w.write_json("final/draft_config.json", cfg.to_dict())
        w.meta.update(target=target_url)

    tok = load_tokenizer(target_url)
    chat = [
        {"role": "user", "content": "Wrap this text at 20 columns."},
        {"role": "assistant", "content": "def wrap(text):\n    return textwrap.fill(text, 20)"},
    ]
    seq = torch.tensor(
        [tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]]
    )
    states = capture_states(target, seq[:, :-1], layer_ids=cfg.aux_layer_ids)
    t = seq.shape[1] - 1
    inputs = {
        "aux": states.aux.float().contiguous(),  # [1, T, 3H]
        "input_ids": seq[:, 1:].contiguous(),  # the token after each state
        "position_ids": torch.arange(t).unsqueeze(0),
    }
    inputs_path = str(root / "inputs.safetensors")
    save_file(inputs, inputs_path)
    return {
        "store": store,
        "root": root,
        "target_url": target_url,
        "target": target,
        "states": states,
        "inputs": inputs,
        "inputs_path": inputs_path,
        "run": store.ref("train", "run"),
    }


def _export(setup: dict, **fields) -> str:
    store = setup["store"]
    ref = export(store, setup["run"], ExportConfig(format="speculators", dtype="float32", **fields))
    return store.local_dir(ref, "")


def _ours(setup: dict, export_dir: str) -> torch.Tensor:
    """Step-0 logits [1, T, Vd] of our own loader on the same export and inputs."""
    x = setup["inputs"]
    draft = load_exported_draft(export_dir, setup["target"], dtype=torch.float32)
    hidden = draft.init_hidden(setup["states"])
    with torch.no_grad():
        _, logits = draft.step(x["input_ids"], hidden, x["position_ids"], DraftKVCache())
    return logits


def _peer(python: str, setup: dict, export_dir: str, name: str) -> tuple[dict, dict]:
    out = str(setup["root"] / f"{name}.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the peer's own packages only
    proc = subprocess.run(
        [python, str(PEER), export_dir, setup["inputs_path"], out],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(setup["root"]),
    )
    assert proc.returncode == 0, f"speculators_forward.py failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), load_file(out)


def test_speculators_loads_the_shipped_export_and_matches_our_logits(
    peer_python: str, setup: dict
) -> None:
    export_dir = _export(setup)  # the default: embeddings included in this layout
    assert "embed_tokens.weight" in load_safetensors_keys(export_dir)
    with open(os.path.join(export_dir, "config.json")) as fh:
        verifier = json.load(fh)["speculators_config"]["verifier"]["name_or_path"]
    model_dir = os.path.join(setup["store"].path("build_demo_target", "small"), "model")
    assert verifier == model_dir  # the artifact's model/ dir, not the artifact root
    assert os.path.isfile(os.path.join(verifier, "config.json"))

    info, got = _peer(peer_python, setup, export_dir, "with_embeddings")
    assert info["speculators"] == "0.9.0" and info["class"] == "Eagle3DraftModel"
    assert info["verifier"] == model_dir
    ours = _ours(setup, export_dir)
    assert got["logits"].shape == ours.shape == (1, setup["inputs"]["input_ids"].shape[1], 512)
    delta = (got["logits"] - ours).abs().max().item()
    print(f"speculators 0.9.0 ({info['attn_implementation']}) vs ours: max |delta| = {delta:.3g}")
    assert delta < TOL
    assert torch.equal(got["logits"].argmax(-1), ours.argmax(-1))
    assert torch.equal(got["draft_tokens"], ours.argmax(-1))
    target_emb = setup["target"].get_input_embeddings().weight
    assert torch.equal(got["embed_tokens"], target_emb)
