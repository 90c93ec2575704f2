"""A mutable pointer over immutable files: an append-only log of small JSON entries.

Everything else in the store is immutable (`<stage>/<key>/` never changes once its manifest
exists). A release is the one thing that moves, so it gets its own protocol, built from the
same atomic single-file put (local: fsync + `os.replace`; object stores: one PUT):

    <root>/<prefix>/history/<entry-id>.json   one file per entry, written once, never edited
    <root>/<prefix>/<head>                    a copy of the newest entry that `select` takes

- An entry id is `<UTC time to the ns>-<random>`: fixed width, so the names sort by time,
  and two writers never pick the same name. Appending is therefore lock-free: concurrent
  appends each add their own file, none can overwrite or tear another's.
- The log is the truth; the head file is a materialized view for readers that fetch a
  single object (a serving job's `aws s3 cp .../current.json`). After every append the
  writer rewrites the head from a fresh listing and re-lists until the head it wrote is
  still the newest selected entry. Whoever writes the head last has verified it after its
  write, and any entry added after that check would have a writer whose own head write
  comes later: so once concurrent writers finish, the head is the newest selected entry.
  A writer killed between its append and its head write leaves a stale head; `read_head`
  reports it (`stale=True`) and the next append repairs it.
- No compare-and-swap is needed and none is available portably (S3 conditional writes and
  GCS generations differ); the order of entries is their time-stamped names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from storage.errors import ArtifactError
from storage.store import UPLOAD_STAGING_DIR, ArtifactStore, check_name
from storage.urls import redact_url

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
_HEAD_RETRIES = 20  # rewrites of the head before giving up (each needs a newer entry to land)


def new_entry_id(now_ns: int | None = None) -> str:
    """`20261204T205006.123456789Z-1f0c9a2b7d4e`: sorts by time, unique across writers."""
    ns = time.time_ns() if now_ns is None else now_ns
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs))
    return f"{stamp}.{frac:09d}Z-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Head:
    """What the head file says, and whether it agrees with the log."""

    entry: dict[str, Any] | None  # the head file's document (None: no head file yet)
    newest: dict[str, Any] | None  # the newest selected entry of the log
    stale: bool  # the head file is not the newest selected entry


class PointerLog:
    """`<root>/<prefix>/history/*.json` plus a head file (see the module docstring).

    Entries are JSON objects; `append` adds `"id"` to each. `select(entry)` says which
    entries the head may point at (e.g. only promotions, not decisions to keep).
    """

    def __init__(
        self,
        store: ArtifactStore,
        prefix: str,
        head: str = "current.json",
        select: Callable[[dict[str, Any]], bool] = lambda e: True,
    ) -> None:
        self.store = store
        self.prefix = check_name(prefix, "pointer prefix")
        self.head_name = check_name(head, "head file")
        self.select = select
        self.dir = f"{store.root_path}/{self.prefix}"
        self.history_dir = f"{self.dir}/{HISTORY_DIR}"

    def url(self, name: str = "") -> str:
        p = f"{self.dir}/{name}" if name else self.dir
        return p if self.store.is_local else self.store.fs.unstrip_protocol(p)

    # ---- reading -----------------------------------------------------------------------
    def _paths(self) -> list[str]:
        """History files, oldest first (names sort by time); temp and foreign files skipped."""
        try:
            paths = self.store.fs.ls(self.history_dir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = [(p.rsplit("/", 1)[-1], p) for p in paths]
        # a writer's temp file (local roots) starts with '.'; anything else foreign is not JSON
        return [p for n, p in sorted(names) if not n.startswith(".") and n.endswith(".json")]

    def _read_entry(self, p: str) -> dict[str, Any] | None:
        """One entry, or None (with a warning) for a file that is not one: entries are put
        atomically, so an unreadable file is foreign or damaged, not a torn write."""
        name = p.rsplit("/", 1)[-1]
        try:
            doc = json.loads(self.store._read_bytes(p))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.warning("ignoring unreadable pointer entry %s (%s)", redact_url(p), exc)
            return None
        if not isinstance(doc, dict) or doc.get("id") != name[: -len(".json")]:
            log.warning("ignoring pointer entry %s: its id does not match", redact_url(p))
            return None
        return doc

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (by id)."""
        return [e for p in self._paths() if (e := self._read_entry(p)) is not None]

    def last(self) -> dict[str, Any] | None:
        """The newest entry, selected or not (None: empty log)."""
        return next(self._newest_first(), None)

    def newest(self) -> dict[str, Any] | None:
        """The newest entry `select` takes (None: none yet); reads back from the end only
        as far as that entry."""
        return next((e for e in self._newest_first() if self.select(e)), None)

    def _newest_first(self) -> Iterator[dict[str, Any]]:
        for p in reversed(self._paths()):
            e = self._read_entry(p)
            if e is not None:
                yield e

    def read_head(self) -> Head:
        """The head file and the log's newest selected entry (one listing, one read)."""
        entry = self._read_head_file()
        newest = self.newest()
        stale = (newest or {}).get("id") != (entry or {}).get("id")
        return Head(entry=entry, newest=newest, stale=stale)

    def _read_head_file(self) -> dict[str, Any] | None:
        p = f"{self.dir}/{self.head_name}"
        try:
            # one GET (cat_file), not open()+read(): s3fs's file object checks the ETag it saw
            # on open and fails when a concurrent writer replaced the head in between
            doc = json.loads(self.store.fs.cat_file(p))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ArtifactError(
                f"{self.url(self.head_name)} is not valid JSON ({exc})",
                fix="delete it: the next promotion rewrites it from the history",
            ) from exc
        return doc if isinstance(doc, dict) else None

    # ---- writing -----------------------------------------------------------------------
    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Add `entry` (a new file under history/), then bring the head up to date.

        Returns:
            The entry as stored (with its `id`).
        """
        entry = {**entry, "id": new_entry_id()}
        data = json.dumps(entry, indent=1, sort_keys=True).encode()
        self._put(f"{self.history_dir}/{entry['id']}.json", data)
        log.info("appended %s", redact_url(self.url(f"{HISTORY_DIR}/{entry['id']}.json")))
        self.update_head()
        return entry

    def update_head(self) -> dict[str, Any] | None:
        """Write the newest selected entry to the head file; re-check after writing."""
        written: dict[str, Any] | None = None
        for _ in range(_HEAD_RETRIES):
            newest = self.newest()
            if newest is None:
                return None
            if written is not None and newest["id"] == written["id"]:
                return newest  # still the newest after our write: converged
            current = self._read_head_file()
            if written is None and current is not None and current.get("id") == newest["id"]:
                return newest  # already up to date (nothing new was selected)
            data = json.dumps(newest, indent=1, sort_keys=True).encode()
            self._put(f"{self.dir}/{self.head_name}", data)
            written = newest
        log.warning(
            "%s: the head kept moving under concurrent appends; the last writer repairs it",
            redact_url(self.url(self.head_name)),
        )
        return written

    def _put(self, p: str, data: bytes) -> None:
        """Atomic single-file write (temp file + the store's put)."""
        if self.store.is_local:
            tmp_dir = os.path.dirname(p)
            os.makedirs(tmp_dir, exist_ok=True)
        else:
            tmp_dir = os.path.join(tempfile.gettempdir(), UPLOAD_STAGING_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-pointer-", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.store._put(tmp, p)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
