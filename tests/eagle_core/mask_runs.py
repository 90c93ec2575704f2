"""Runs of consecutive loss-masked tokens: what the tokenize tests decode and compare."""

from __future__ import annotations

from collections.abc import Sequence


def masked_runs(ids: Sequence[int], mask: Sequence[int]) -> list[list[int]]:
    """Each maximal run of ids whose mask is set, in order (one per answer / FIM middle)."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])
