"""What a stage shows in the Prefect UI: its outcome line, tables, images, links, progress.

Every stage task ends with `report_outcome`, which logs exactly one of
`<stage> <key>: cached` (the manifest existed before the task started: nothing was
computed) or `<stage> <key>: computed (...)`, and returns which. Artifacts are keyed by
stage (lowercase and dashes, as Prefect requires), so each run adds a new version to the
same key and the UI shows the history of e.g. the evaluation table across nightly runs.

Artifacts never carry tensors or records, only counts, metrics and artifact URLs.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from storage import ArtifactStore, StageRef

PROGRESS_MIN_INTERVAL_S = 2.0  # at most one UI update every 2 s: the API is not a log sink


def artifact_key(stage: str, what: str) -> str:
    """`extract_hidden`, `counts` -> `extract-hidden-counts` (Prefect's key alphabet)."""
    return f"{stage}-{what}".replace("_", "-").lower()


def report_outcome(
    log: logging.Logger | Any, store: ArtifactStore, ref: StageRef, started: float
) -> bool:
    """Log whether `ref` was reused ("cached") or made by this task ("computed").

    The manifest's creation time is the witness: a manifest older than the task's start was
    published by an earlier run (or another machine sharing the store).

    Returns:
        True when cached.
    """
    manifest = store.manifest(ref.stage, ref.key)
    created = manifest.created_at
    cached = created < started
    if cached:
        log.info("%s %s: cached (%s)", ref.stage, ref.key, ref.url)
    else:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(ref.counts.items()) if _scalar(v))
        log.info(
            "%s %s: computed in %.1f s (%s) -> %s",
            ref.stage,
            ref.key,
            time.time() - started,
            counts or "no counts",
            ref.url,
        )
        reason = manifest.meta.get("recompute_reason")
        if reason:  # a new key for inputs of the same names: say which input changed
            log.info("%s %s: recomputed because %s", ref.stage, ref.key, reason)
            markdown(
                ref.stage,
                "recompute-reason",
                f"**{ref.stage} recomputed** (key `{ref.key}`): {reason}",
                description=f"{ref.stage}: why it recomputed",
            )
    return cached


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool))


def counts_table(ref: StageRef, description: str = "") -> UUID | None:
    """A table artifact of the stage's scalar counts; nested counts (e.g. rejects by reason)
    become one row each as `reason.subkey`."""
    rows = [{"count": name, "value": value} for name, value in _flatten(ref.counts)]
    if not rows:
        return None
    return create_table_artifact(
        rows,
        key=artifact_key(ref.stage, "counts"),
        description=description or f"{ref.stage} counts ({ref.url})",
    )


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_flatten(v, prefix=name + "."))
        elif isinstance(v, (list, tuple)):
            out.append((name, json.dumps(v)[:200]))
        else:
            out.append((name, v))
    return out


def table(stage: str, what: str, rows: list[dict[str, Any]], description: str) -> UUID | None:
    """A table artifact (rows of equal keys), e.g. per-step accuracy or per-position acceptance."""
    if not rows:
        return None
    return create_table_artifact(rows, key=artifact_key(stage, what), description=description)


def markdown(stage: str, what: str, text: str, description: str = "") -> UUID:
    return create_markdown_artifact(text, key=artifact_key(stage, what), description=description)


def link(stage: str, url: str, text: str, description: str = "") -> UUID:
    """A link artifact to an artifact URL (local path, s3://...)."""
    return create_link_artifact(
        url, link_text=text, key=artifact_key(stage, "link"), description=description
    )


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows a PNG inline (data URI: the UI needs no access to the store)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def line_plot_png(
    series: Mapping[str, tuple[list[float], list[float]]], title: str, xlabel: str
) -> bytes:
    """Render named (x, y) series as a small PNG (matplotlib, headless Agg backend)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class Progress:
    """A Prefect progress artifact driven by a core `progress(done, total)` callback.

    Created lazily on the first call (a cached stage makes no progress artifact), updated
    at most every `PROGRESS_MIN_INTERVAL_S`, and always at completion.
    """

    def __init__(self, stage: str, description: str) -> None:
        self.stage, self.description = stage, description
        self._id: UUID | None = None
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 0.0
        now = time.monotonic()
        if self._id is None:
            self._id = create_progress_artifact(
                pct, key=artifact_key(self.stage, "progress"), description=self.description
            )
            self._last = now
        elif now - self._last >= PROGRESS_MIN_INTERVAL_S or done >= total:
            update_progress_artifact(self._id, pct)
            self._last = now


def progress_callback(stage: str, description: str) -> Callable[[int, int], None]:
    return Progress(stage, description)
