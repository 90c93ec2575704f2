"""The `build_demo_target` stage: an offline target LM, its tokenizer and demo datasets.

Output artifact `<root>/build_demo_target/<key>/`:

- `tokenizer/`: HF tokenizer dir (byte-level BPE, ChatML template with generation markers,
  FIM tokens of `cfg.fim_family`; see eagle_core/demo/tokenizer.py for the conventions);
- `model/`: a complete HF model dir: `LlamaForCausalLM` (`config.json`, `model.safetensors`,
  `generation_config.json` whose eos list is `<|endoftext|>` and `<|im_end|>`) plus a copy of
  the tokenizer files, so `vllm serve <artifact>/model` and any HF tool load it alone;
- `data/`: `chat_sharegpt.{train,heldout}.jsonl`, `chat_openai.{train,heldout}.jsonl`,
  `fim.{train,heldout}.jsonl` (`id, prefix, middle, suffix`), `files.{train,heldout}.jsonl`
  (`content, path`), drawn from disjoint stdlib modules (split by module-name hash);
- `demo_target.json`: held-out metrics and a greedy FIM completion (also in manifest.meta).

The key hashes the config, the Python version and the stdlib file listing: another Python
install gives another key (its source text differs), the same one gives the same artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eagle_core.demo.corpus import (
    SourceFile,
    chat_samples,
    fim_samples,
    listing_hash,
    read_sources,
    split_of,
    stdlib_root,
    to_sharegpt,
)
from eagle_core.demo.lm import LMShape, build_llama, evaluate_lm, pack_blocks, train_lm
from eagle_core.demo.tokenizer import FIM_FAMILIES, IM_END, FimFamily, build_tokenizer
from eagle_core.errors import ConfigError, DataError
from storage import ArtifactStore, StageRef

log = logging.getLogger(__name__)

STAGE = "build_demo_target"
# 2: pool capped per kind; 3: no repeated FIM spans; 4: shorter FIM, 300 steps;
# 5: model/ is a complete HF model dir (tokenizer files, <|im_end|> also an eos)
CODE_VERSION = "5"


@dataclass(frozen=True, kw_only=True)
class DemoTargetConfig:
    """What the demo target is made of; every field is part of the artifact key."""

    seed: int = 0  # one seed for the split order, FIM spans, sample choice, init and batches
    fim_family: FimFamily = "starcoder"  # FIM tokens; middles end with <|endoftext|>
    vocab_size: int = 8192  # ~8k: big enough for code identifiers, small for a CPU lm_head
    tokenizer_corpus_chars: int = 4_000_000  # BPE is trained on the first N chars of train
    hidden_size: int = 256  # issue: >= 256
    num_layers: int = 8  # issue: >= 8, so EAGLE-3's (1, N//2-1, N-4) = (1, 3, 4) are distinct
    num_heads: int = 8  # head_dim 32
    num_kv_heads: int = 4  # GQA like real targets
    intermediate_size: int = 688  # Llama's ~2.7x hidden, multiple of 8
    seq_len: int = 256  # tokens per training block; most FIM/chat samples fit in one
    batch_size: int = 8  # blocks per step: more, smaller steps learn more in a CPU budget
    # Steps, not seconds, set the budget so the model is reproducible: ~1.5k tokens/s on 2
    # idle cores makes 300 steps ~7 min. Loss still falls fast at 300 (4.49 -> 4.37 over
    # the last 50 steps); 200 steps gave held-out accuracy 0.286, 300 with this mix 0.373.
    train_steps: int = 300
    # Hard wall-clock cap (issue: <= 10 min). A run cut by it is logged and recorded
    # (meta.stopped_by_time) and is not reproducible on another machine.
    max_train_seconds: float = 600.0
    lr: float = 3e-3  # small models take large learning rates; warm-up 20 steps
    mix_text: float = 0.3  # share of training blocks from whole files
    mix_fim: float = 0.4  # ... from FIM samples (PSM + end token), so it completes middles
    mix_chat: float = 0.3  # ... from chat samples rendered with the chat template
    heldout_permille: int = 100  # ~10% of modules are held out (never trained on)
    max_file_chars: int = 60_000  # larger stdlib files are skipped, not cut
    fim_per_file: int = 12  # FIM samples drawn per module
    # Short FIM windows (~170 tokens): more samples per step, and the prefix's end (where
    # the middle continues) is fewer tokens away from <fim_middle> in PSM order.
    fim_prefix_chars: int = 400
    fim_suffix_chars: int = 150
    fim_span_share: float = 0.5  # middles inside one line; the rest are whole lines
    fim_max_lines: int = 2  # whole-line middles have 1..fim_max_lines lines
    max_answer_chars: int = 800  # longer docstrings/functions are not used as chat answers
    max_train_samples: int = 3000  # per train data file (chat, fim, files)
    max_heldout_samples: int = 300  # per held-out data file
    eval_blocks: int = 48  # held-out blocks per kind for loss/accuracy
    eval_fim_samples: int = 20  # held-out FIM samples completed greedily (exact match)
    modules: tuple[str, ...] | None = None  # only these stdlib modules (tests); None = all

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, fix: str) -> None:
            if not ok:
                raise ConfigError(
                    f"demo_target.{field}={getattr(self, field)!r} is invalid", fix=fix
                )

        need(self.fim_family in FIM_FAMILIES, "fim_family", "use starcoder, qwen or codellama")
        need(self.vocab_size >= 512, "vocab_size", "use >= 512 (default 8192)")
        need(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            "make hidden_size a multiple of num_heads",
        )
        need(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            "make num_heads a multiple of num_kv_heads",
        )
        need(self.num_layers >= 1, "num_layers", "use >= 8 for EAGLE-3 (default 8)")
        need(self.seq_len >= 16, "seq_len", "use >= 16 (default 256)")
        need(self.train_steps >= 1 and self.batch_size >= 1, "train_steps", "use >= 1")
        need(self.max_train_seconds > 0, "max_train_seconds", "use a positive budget")
        for mix in ("mix_text", "mix_fim", "mix_chat"):
            need(getattr(self, mix) >= 0, mix, "use a non-negative mix weight")
        need(
            self.mix_text + self.mix_fim + self.mix_chat > 0,
            "mix_text",
            "give at least one of mix_text, mix_fim, mix_chat a positive weight",
        )
        need(0 < self.heldout_permille < 1000, "heldout_permille", "use 1..999 (default 100)")

    def shape(self) -> LMShape:
        return LMShape(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
        )


# ---- datasets -----------------------------------------------------------------------------
@dataclass
class DemoData:
    """Samples of one split (OpenAI-layout chat, FIM dicts, whole files)."""

    chat: list[dict[str, Any]]
    fim: list[dict[str, str]]
    files: list[SourceFile]


def _stable_order(items: Sequence[Any], seed: int, key: Callable[[Any], str]) -> list[Any]:
    """Shuffle by a hash of (seed, id): the same order on every machine and run."""
    return sorted(items, key=lambda x: hashlib.sha256(f"{seed}:{key(x)}".encode()).digest())


def make_data(files: Sequence[SourceFile], cfg: DemoTargetConfig) -> dict[str, DemoData]:
    """Split modules, then draw chat and FIM samples from each side."""
    out: dict[str, DemoData] = {}
    for split in ("train", "heldout"):
        mine = [f for f in files if split_of(f.module, cfg.heldout_permille) == split]
        chat = [
            s
            for f in mine
            for s in chat_samples(f, seed=cfg.seed, max_answer_chars=cfg.max_answer_chars)
        ]
        fim = [
            s
            for f in mine
            for s in fim_samples(
                f,
                seed=cfg.seed,
                per_file=cfg.fim_per_file,
                max_prefix_chars=cfg.fim_prefix_chars,
                max_suffix_chars=cfg.fim_suffix_chars,
                span_share=cfg.fim_span_share,
                max_lines=cfg.fim_max_lines,
            )
        ]
        out[split] = DemoData(
            chat=_stable_order(chat, cfg.seed, lambda s: s["id"]),
            fim=_stable_order(fim, cfg.seed, lambda s: s["id"]),
            files=_stable_order(mine, cfg.seed, lambda f: f.path),
        )
    if not out["train"].files or not out["heldout"].files:
        raise DataError(
            f"stdlib split left {len(out['train'].files)} train and "
            f"{len(out['heldout'].files)} held-out modules",
            fix="select more modules (DemoTargetConfig.modules) or change heldout_permille",
        )
    return out


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def data_files(data: dict[str, DemoData], cfg: DemoTargetConfig) -> dict[str, bytes]:
    """The demo dataset files (name -> jsonl bytes). Chat samples alternate between the
    ShareGPT and the OpenAI file so the two inputs are disjoint."""
    out: dict[str, bytes] = {}
    for split, d in data.items():
        cap = cfg.max_train_samples if split == "train" else cfg.max_heldout_samples
        chat = d.chat[: 2 * cap]
        out[f"chat_sharegpt.{split}.jsonl"] = _jsonl([to_sharegpt(s) for s in chat[0::2]])
        out[f"chat_openai.{split}.jsonl"] = _jsonl(chat[1::2])
        out[f"fim.{split}.jsonl"] = _jsonl(d.fim[:cap])
        out[f"files.{split}.jsonl"] = _jsonl(
            [{"content": f.text, "path": f.path} for f in d.files[:cap]]
        )
    return out


# ---- training text ------------------------------------------------------------------------
def encode_samples(
    tokenizer, d: DemoData, fim_family: str, max_tokens: int | None = None
) -> dict[str, list[list[int]]]:
    """Token ids per kind: whole files, FIM text (PSM + end token), rendered chats.

    max_tokens: stop encoding a kind once it has this many tokens (samples are in their
    seeded order, so the cut is deterministic); training needs far less than the stdlib.
    """
    fim = FIM_FAMILIES[fim_family]

    def enc(texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        total = 0
        for i in range(0, len(texts), 64):
            # verbose=False: files are longer than model_max_length on purpose (packed later)
            ids = tokenizer(texts[i : i + 64], add_special_tokens=False, verbose=False)
            out.extend(ids["input_ids"])
            total += sum(len(x) for x in ids["input_ids"])
            if max_tokens is not None and total >= max_tokens:
                break
        return out

    chats = [tokenizer.apply_chat_template(s["messages"], tokenize=False) for s in d.chat]
    return {
        "text": enc([f.text for f in d.files]),
        "fim": enc([fim.psm(s["prefix"], s["middle"], s["suffix"]) for s in d.fim]),
        "chat": enc(chats),
    }


def mixed_blocks(
    encoded: dict[str, list[list[int]]],
    weights: dict[str, float],
    n: int,
    eos_id: int,
    seq_len: int,
    seed: int,
) -> torch.Tensor:
    """n blocks [n, T+1], drawn from each kind in proportion to `weights` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(w for k, w in weights.items() if encoded.get(k))
    parts = []
    for kind, w in weights.items():
        if w <= 0 or not encoded.get(kind):
            continue
        try:
            blocks = pack_blocks(encoded[kind], eos_id, seq_len)
        except DataError as exc:
            raise DataError(f"training kind {kind!r}: {exc.what}", fix=exc.fix) from exc
        m = max(1, round(n * w / total))
        idx = torch.randint(0, blocks.shape[0], (m,), generator=gen)  # with replacement
        parts.append(blocks[idx])
    mixed = torch.cat(parts)
    return mixed[torch.randperm(mixed.shape[0], generator=gen)]


@torch.no_grad()
def greedy_fim(
    model, tokenizer, sample: dict[str, str], fim_family: str, max_new_tokens: int = 64
) -> str:
    """Greedy middle for a FIM sample (stops at the family's end token)."""
    fim = FIM_FAMILIES[fim_family]
    prompt = fim.psm(sample["prefix"], "", sample["suffix"], with_end=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    end_id = tokenizer.convert_tokens_to_ids(fim.end)
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=end_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] == end_id:
        new = new[:-1]
    return tokenizer.decode(new)


@torch.no_grad()
def middle_accuracy(model, tokenizer, samples: Sequence[dict[str, str]], fim_family: str) -> float:
    """Teacher-forced next-token accuracy on the middle tokens (and the end token) of FIM
    samples: how often the model's argmax is the true next token of the middle."""
    fim = FIM_FAMILIES[fim_family]
    correct = total = 0
    for s in samples:
        head = tokenizer(
            fim.psm(s["prefix"], "", s["suffix"], with_end=False), add_special_tokens=False
        )["input_ids"]
        tail = tokenizer(s["middle"] + fim.end, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tail])  # [1, P+M]
        logits = model(input_ids=ids[:, :-1]).logits[0, len(head) - 1 :]  # [M, V]
        correct += (logits.argmax(-1) == ids[0, len(head) :]).sum().item()
        total += len(tail)
    return correct / max(1, total)


def evaluate_target(model, tokenizer, heldout: DemoData, cfg: DemoTargetConfig) -> dict[str, Any]:
    """Held-out loss / next-token accuracy per kind and overall, FIM exact match."""
    need = cfg.eval_blocks * (cfg.seq_len + 1) + cfg.seq_len  # + the tail cut off the stream
    encoded = encode_samples(tokenizer, heldout, cfg.fim_family, max_tokens=need)
    metrics: dict[str, Any] = {}
    tot_loss = tot_acc = 0.0
    kinds = 0
    for kind, samples in encoded.items():
        if not samples:
            continue
        try:
            blocks = pack_blocks(samples, tokenizer.eos_token_id, cfg.seq_len)
        except DataError as exc:  # a tiny config's held-out side can be this small
            log.warning("held-out %s not evaluated: %s", kind, exc)
            metrics[f"heldout_{kind}_skipped"] = exc.what
            continue
        blocks = blocks[: cfg.eval_blocks]
        loss, acc = evaluate_lm(model, blocks)
        metrics[f"heldout_{kind}_loss"] = round(loss, 4)
        metrics[f"heldout_{kind}_accuracy"] = round(acc, 4)
        tot_loss, tot_acc, kinds = tot_loss + loss, tot_acc + acc, kinds + 1
    if kinds == 0:
        raise DataError(
            "no held-out kind has one block of tokens to evaluate on",
            fix="raise heldout_permille or select more stdlib modules",
        )
    metrics["heldout_loss"] = round(tot_loss / kinds, 4)
    metrics["heldout_accuracy"] = round(tot_acc / kinds, 4)
    metrics["heldout_fim_middle_accuracy"] = round(
        middle_accuracy(model, tokenizer, heldout.fim[: 4 * cfg.eval_fim_samples], cfg.fim_family),
        4,
    )
    fims = heldout.fim[: cfg.eval_fim_samples]
    hits = 0
    example = None
    for s in fims:
        got = greedy_fim(model, tokenizer, s, cfg.fim_family)
        hits += got == s["middle"]
        if example is None or (got == s["middle"] and example["completion"] != example["middle"]):
            example = {
                "id": s["id"],
                "prefix_tail": s["prefix"][-300:],
                "suffix_head": s["suffix"][:200],
                "middle": s["middle"],
                "completion": got,
            }
    metrics["heldout_fim_exact_match"] = round(hits / max(1, len(fims)), 4)
    metrics["fim_example"] = example
    return metrics


# ---- the stage ----------------------------------------------------------------------------
def stage_params(cfg: DemoTargetConfig) -> dict[str, Any]:
    """What the key hashes: the config, the Python version and the stdlib listing."""
    return {
        "cfg": cfg,
        "python": ".".join(map(str, sys.version_info[:3])),
        "stdlib_listing": listing_hash(),
    }


def build_demo_target(
    store: ArtifactStore,
    cfg: DemoTargetConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> StageRef:
    """Build (or reuse) the demo target artifact. Returns its StageRef.

    counts: heldout_accuracy, heldout_loss, train/held-out sample counts; meta adds the
    per-kind metrics, a greedy FIM completion and the training time.
    """
    params = stage_params(cfg)
    key = store.key(STAGE, params, inputs=[], code=CODE_VERSION)
    if store.is_done(STAGE, key) and not force:
        log.info("%s %s: cached", STAGE, key)
        return store.ref(STAGE, key)
    log.info("%s %s: building (stdlib %s)", STAGE, key, stdlib_root())
    t0 = time.monotonic()
    files, rejects = read_sources(
        max_file_chars=cfg.max_file_chars, modules=list(cfg.modules) if cfg.modules else None
    )
    data = make_data(files, cfg)
    train = data["train"]
    log.info(
        "%s: %d train / %d held-out modules, %d/%d chat, %d/%d fim samples",
        STAGE,
        len(train.files),
        len(data["heldout"].files),
        len(train.chat),
        len(data["heldout"].chat),
        len(train.fim),
        len(data["heldout"].fim),
    )
    with tempfile.TemporaryDirectory(prefix="demo-target-") as tmp:
        tok_dir, model_dir = os.path.join(tmp, "tokenizer"), os.path.join(tmp, "model")
        corpus = _capped_texts([f.text for f in train.files], cfg.tokenizer_corpus_chars)
        build_tokenizer(corpus, cfg.vocab_size, tok_dir, fim_family=cfg.fim_family)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        # a pool per kind twice what the whole run could draw: blocks rarely repeat
        pool = 2 * cfg.train_steps * cfg.batch_size * (cfg.seq_len + 1)
        encoded = encode_samples(tokenizer, train, cfg.fim_family, max_tokens=pool)
        weights = {"text": cfg.mix_text, "fim": cfg.mix_fim, "chat": cfg.mix_chat}
        blocks = mixed_blocks(
            encoded,
            weights,
            cfg.train_steps * cfg.batch_size,
            tokenizer.eos_token_id,
            cfg.seq_len,
            cfg.seed,
        )
        model = build_llama(
            cfg.shape(),
            len(tokenizer),
            seed=cfg.seed,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "%s: training %.1fM-param Llama for <= %d steps / %.0f s",
            STAGE,
            n_params / 1e6,
            cfg.train_steps,
            cfg.max_train_seconds,
        )
        with all_cores() as threads:
            log.info("%s: training on %d threads", STAGE, threads)
            result = train_lm(
                model,
                blocks,
                steps=cfg.train_steps,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=cfg.seed,
                max_seconds=cfg.max_train_seconds,
                progress=progress,
            )
            metrics = evaluate_target(model, tokenizer, data["heldout"], cfg)
        log.info(
            "%s: held-out loss %.3f, next-token accuracy %.3f, FIM middle-token accuracy %.3f, "
            "FIM exact match %.3f",
            STAGE,
            metrics["heldout_loss"],
            metrics["heldout_accuracy"],
            metrics["heldout_fim_middle_accuracy"],
            metrics["heldout_fim_exact_match"],
        )
        save_model_dir(model, tokenizer, tok_dir, model_dir)
        tokenizer_hash = _dir_hash(tok_dir)
        with store.publish(STAGE, key, params=params, force=force) as w:
            w.add_dir(tok_dir, prefix="tokenizer")
            w.add_dir(model_dir, prefix="model")
            for name, blob in data_files(data, cfg).items():
                w.write_bytes(f"data/{name}", blob)
            summary = {
                **metrics,
                "train_steps": result.steps,
                "stopped_by_time": result.stopped_by_time,
                "train_seconds": round(result.seconds, 1),
                "train_tokens": result.tokens,
                "final_train_loss": round(result.final_loss, 4),
                "parameters": n_params,
            }
            w.write_json("demo_target.json", summary)
            w.counts.update(
                heldout_accuracy=metrics["heldout_accuracy"],
                heldout_loss=metrics["heldout_loss"],
                train_modules=len(train.files),
                heldout_modules=len(data["heldout"].files),
                rejected_files=sum(rejects.values()),
            )
            w.meta.update(
                summary,
                rejects=rejects,
                tokenizer_hash=tokenizer_hash,
                vocab_size=len(tokenizer),
                fim_family=cfg.fim_family,
                seconds=round(time.monotonic() - t0, 1),
            )
    return store.ref(STAGE, key)


@contextlib.contextmanager
def all_cores():
    """Let torch use every core this process may run on while the block runs.

    The build is one process, but OMP_NUM_THREADS=1 is common where it runs (the Makefile
    sets it for multi-process DeepSpeed runs; so do many job schedulers): with one thread the
    300 steps take ~14 min instead of ~7 on 2 cores and hit the 10-minute cap. More threads
    change float rounding only (the issue's "reproducible within float noise").
    """
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(before, cores))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def save_model_dir(model, tokenizer, tok_dir: str, model_dir: str) -> None:
    """Write `model` as a complete HF model directory: weights, config, generation config
    and a copy of the tokenizer files (engines such as `vllm serve DIR` and AutoTokenizer
    read the tokenizer from the model dir; `tokenizer/` stays for the pipeline's own use).

    The generation config stops at `<|im_end|>` as well as `<|endoftext|>`: the chat
    template ends an assistant turn with `<|im_end|>`, and engines take their stop tokens
    from this list (like Qwen's chat models), so chat generations end with the turn.
    """
    eos = [int(tokenizer.eos_token_id)]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in eos:
        eos.append(int(im_end))
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in sorted(os.listdir(tok_dir)):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(model_dir, name))


def _capped_texts(texts: Sequence[str], max_chars: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= max_chars:
            break
        out.append(t)
        n += len(t)
    return out


def _dir_hash(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as fh:
            h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()[:20]


# ---- the small test target ----------------------------------------------------------------
SMALL_MODULES = (
    "textwrap",
    "shlex",
    "heapq",
    "bisect",
    "fnmatch",
    "glob",
    "colorsys",
    "copy",
    "keyword",
    "string",
    "numbers",
    "queue",
    "sched",
    "graphlib",
)


def build_small_target(
    out_dir: str,
    *,
    seed: int = 0,
    steps: int = 60,
    vocab_size: int = 1024,
    fim_family: FimFamily = "starcoder",
    train_model: bool = True,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> tuple[str, str]:
    """A tokenizer (~1k vocab) and an 8-layer H=64 Llama trained briefly, for tests.

    Built in a few seconds from a handful of stdlib modules; not cached, not published.
    `num_heads=2, num_kv_heads=1` gives head dim 32, the smallest vLLM's CPU attention runs
    (the default 4 heads have head dim 16). Returns (tokenizer_dir, model_dir) under out_dir.
    """
    from transformers import AutoTokenizer

    files, _ = read_sources(modules=list(SMALL_MODULES))
    tok_dir, model_dir = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "model")
    build_tokenizer([f.text for f in files], vocab_size, tok_dir, fim_family=fim_family)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    shape = LMShape(
        hidden_size=64,
        num_layers=8,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=128,
        max_position_embeddings=1024,
    )
    model = build_llama(
        shape,
        len(tokenizer),
        seed=seed,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    if train_model and steps > 0:
        d = DemoData(
            chat=[s for f in files for s in chat_samples(f, seed=seed, max_answer_chars=600)],
            fim=[
                s
                for f in files
                for s in fim_samples(
                    f, seed=seed, per_file=4, max_prefix_chars=400, max_suffix_chars=150
                )
            ],
            files=list(files),
        )
        encoded = encode_samples(tokenizer, d, fim_family)
        blocks = mixed_blocks(
            encoded,
            {"text": 0.4, "fim": 0.3, "chat": 0.3},
            steps * 8,
            tokenizer.eos_token_id,
            64,
            seed,
        )
        rng = random.Random(seed)
        train_lm(
            model,
            blocks,
            steps=steps,
            batch_size=8,
            lr=3e-3,
            seed=rng.randrange(2**31),
            warmup=5,
            log_every=max(1, steps),
            show_bar=False,
        )
    model.eval()
    save_model_dir(model, tokenizer, tok_dir, model_dir)
    return tok_dir, model_dir
