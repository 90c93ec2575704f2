"""Small real inputs for the reliability tests (tests/reliability/*).

Everything here is real: JSON-lines files written to disk, byte-level BPE tokenizers trained
with `tokenizers`, seeded random Llama targets saved with `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the DeepSpeed shm comm op is JIT-built once per machine and cached in the venv (see Makefile)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".venv", "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def chat_rows(n: int, prefix: str = "c") -> list[dict[str, Any]]:
    """`n` valid OpenAI-style chat records with ids `<prefix>0..`."""
    return [
        {
            "id": f"{prefix}{i}",
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"def add(a, b):\n    return a + b  # {2 * i}"},
            ],
        }
        for i in range(n)
    ]


def fim_rows(n: int, prefix: str = "f") -> list[dict[str, Any]]:
    """`n` valid FIM records (prefix / middle / suffix) with ids `<prefix>0..`."""
    return [
        {"id": f"{prefix}{i}", "prefix": "x = ", "middle": f"{i} + {i}", "suffix": "\nprint(x)\n"}
        for i in range(n)
    ]


def write_jsonl(path: str, rows: Iterable[Any], tail: str = "", encoding: str = "utf-8") -> str:
    """Rows as JSON lines (non-ASCII kept as is), then `tail` verbatim; returns `path`."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + tail
    with open(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return path


def tokenizer_without_template(src_dir: str, out_dir: str) -> str:
    """A copy of a tokenizer dir with its chat template removed (file and config entry)."""
    shutil.copytree(src_dir, out_dir)
    tmpl = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(tmpl):
        os.remove(tmpl)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg.pop("chat_template", None)
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    return out_dir


def plain_tokenizer(out_dir: str, chat_template: str | None = None, vocab_size: int = 300) -> str:
    """A byte-level BPE without FIM tokens (only eos and ChatML specials), saved to out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["def add(a, b): return a + b  # What is 1 plus 2?"] * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[0], additional_special_tokens=specials[1:]
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_llama(
    out_dir: str, vocab_size: int, hidden_size: int = 32, layers: int = 8, seed: int = 0
) -> str:
    """A seeded random LlamaForCausalLM (4 heads, 2 kv heads) saved to out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `eagle-pipeline <args>` (python -m flows.cli) in a subprocess from the repo root."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def verify_all(store: Any) -> dict[tuple[str, str], dict[str, str]]:
    """store.verify every finished artifact under the root; returns {(stage, key): {file: sha}}.

    A manifest listing a file that is missing or whose bytes differ raises ArtifactError.
    """
    out: dict[tuple[str, str], dict[str, str]] = {}
    for manifest_path in store.fs.glob(store.root_path + "/*/*/manifest.json"):
        stage, key = manifest_path.rstrip("/").split("/")[-3:-1]
        ref = store.ref(stage, key)
        store.verify(ref)
        out[(stage, key)] = {n: f.sha256 for n, f in store.manifest(stage, key).files.items()}
    return out
