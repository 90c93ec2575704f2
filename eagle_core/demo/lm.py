"""A tiny Llama-architecture causal LM, built and trained on CPU in a bounded budget.

Notation: B batch, T tokens per block (`seq_len`), V vocabulary.

Training packs every sample (plain text, FIM text, rendered chat) into one token stream,
each sample followed by eos, cuts it into blocks of T+1 tokens and draws blocks with a
seeded generator. Attention crossing a sample boundary is harmless at this scale and keeps
every block full (no padding compute on 2 cores).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LMShape:
    """Architecture of the demo LM (a LlamaConfig subset)."""

    hidden_size: int = 256  # the issue asks >= 256 for the demo target
    num_layers: int = 8  # >= 8 so EAGLE-3's layers (1, N//2-1, N-4) are distinct
    num_heads: int = 8  # head_dim 32
    num_kv_heads: int = 4  # GQA, like most real targets, so the draft code sees it
    intermediate_size: int = 688  # ~2.7x hidden, Llama's ratio rounded to a multiple of 8
    max_position_embeddings: int = 2048  # longer than any demo sample
    rope_theta: float = 10000.0  # Llama-2 default


def build_llama(
    shape: LMShape,
    vocab_size: int,
    *,
    seed: int,
    bos_id: int | None,
    eos_id: int,
    pad_id: int | None,
):
    """A seeded, randomly initialised `LlamaForCausalLM` (float32, train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,  # like the 7B+ targets EAGLE is used with
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def pack_blocks(samples: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate samples (each + eos) and cut into blocks. Returns [N, T+1] int64."""
    stream: list[int] = []
    for ids in samples:
        stream.extend(ids)
        if not ids or ids[-1] != eos_id:
            stream.append(eos_id)
    n = len(stream) // (seq_len + 1)
    if n == 0:
        from eagle_core.errors import DataError

        raise DataError(
            f"{len(samples)} samples make {len(stream)} tokens, less than one block of "
            f"{seq_len + 1}",
            fix="lower seq_len or select more stdlib modules",
        )
    return torch.tensor(stream[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    tokens: int
    stopped_by_time: bool = False


def train_lm(
    model,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_seconds: float | None = None,
    warmup: int = 20,
    log_every: int = 50,
    progress: Callable[[int, int], None] | None = None,
    show_bar: bool | None = None,
) -> TrainResult:
    """AdamW with warm-up and cosine decay over `steps`; stops early at `max_seconds`.

    Args:
        blocks: [N, T+1] token blocks (inputs are [:, :-1], labels [:, 1:]).
        max_seconds: wall-clock budget; the cosine schedule is over `steps` regardless, so a
            run cut by time ends at a higher learning rate (logged).
        show_bar: tqdm on stderr; None = only in a terminal.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    model.train()
    start = time.monotonic()
    ema = None
    done = 0
    stopped = False
    bar = None
    if show_bar is not False:  # None: tqdm decides (a terminal on stderr or nothing)
        bar = tqdm(total=steps, desc="demo LM", disable=None if show_bar is None else False)
    for step in range(steps):
        idx = torch.randint(0, blocks.shape[0], (batch_size,), generator=gen)
        batch = blocks[idx]  # [B, T+1]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        if not torch.isfinite(loss):
            from eagle_core.errors import TrainingError

            raise TrainingError(
                f"demo LM loss is {loss.item()} at step {step}", fix="lower lr in DemoTargetConfig"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        val = loss.item()
        ema = val if ema is None else 0.95 * ema + 0.05 * val
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
        if progress is not None:
            progress(done, steps)
        if done % log_every == 0 or done == steps:
            log.info(
                "demo LM step %d/%d loss %.4f (%.0f s)", done, steps, ema, time.monotonic() - start
            )
        if max_seconds is not None and time.monotonic() - start > max_seconds and done < steps:
            log.warning(
                "demo LM: time budget %.0f s reached at step %d/%d; the model is under-trained "
                "and not reproducible elsewhere (is the machine busy?)",
                max_seconds,
                done,
                steps,
            )
            stopped = True
            break
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(
        steps=done,
        seconds=time.monotonic() - start,
        final_loss=float(ema or 0),
        tokens=done * batch_size * (blocks.shape[1] - 1),
        stopped_by_time=stopped,
    )


@torch.no_grad()
def evaluate_lm(model, blocks: torch.Tensor, batch_size: int = 16) -> tuple[float, float]:
    """Mean next-token loss and accuracy (argmax == next token) over blocks [N, T+1]."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
        labels = batch[:, 1:]  # [B, T]
        total_loss += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += labels.numel()
    return total_loss / max(1, count), correct / max(1, count)
