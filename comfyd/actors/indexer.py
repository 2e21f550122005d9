"""The output indexer: files that reach the outputs folder by other means get indexed too.

Outputs of comfyd's own jobs are indexed when the job completes (with the job's final state, in one
commit). This actor finds the rest - a person using ComfyUI's own UI, a copy dropped in by hand - on start
and then on an interval: it walks the folder in a thread, hashes new files in a thread, and records them,
attributed to the workflow whose folder they sit in when that workflow exists, else to ``unknown``.
Index rows whose file is gone are removed.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import structlog

from comfyd.actors.base import Actor
from comfyd.messages import Message
from comfyd.outputs.files import describe
from comfyd.store.db import Database
from comfyd.store.jobs import JobStore
from comfyd.store.outputs import OutputIndex

log = structlog.get_logger("comfyd.indexer")

UNKNOWN = "unknown"
SETTLE_SECONDS = 2.0  # a file younger than this may still be being written: next scan


class Rescan(Message, frozen=True):
    """Walk the outputs folder now. Answer: (files added, rows removed)."""


class OutputIndexer(Actor[Message]):
    mailbox_size = 16

    def __init__(self, db: Database, outputs_dir: Path, *, interval: float = 300.0) -> None:
        super().__init__("indexer")
        self.db = db
        self.jobs = JobStore(db)
        self.outputs_dir = outputs_dir
        self.interval = interval

    async def on_start(self) -> None:
        self.every(self.interval, Rescan, now=True)

    async def handle(self, message: Message) -> Any:
        match message:
            case Rescan():
                return await self._rescan()
            case _:
                raise TypeError(f"indexer cannot handle {type(message).__name__}")

    async def _rescan(self) -> tuple[int, int]:
        found = await asyncio.to_thread(_walk, self.outputs_dir)
        added = 0
        paths = sorted(found)
        for start in range(0, len(paths), 500):
            chunk = paths[start:start + 500]
            known = {r[0] for r in await self.db.fetchall(
                f"SELECT path FROM outputs WHERE path IN ({','.join('?' * len(chunk))})", chunk)}
            for relpath in chunk:
                if relpath in known:
                    continue
                try:
                    facts = await asyncio.to_thread(describe, self.outputs_dir / relpath)
                except OSError:
                    continue  # vanished meanwhile
                owner = await self._owner(relpath)
                await self.db.write([OutputIndex.upsert_statement(path=relpath, workflow_id=owner, facts=facts,
                                                                  created_at=found[relpath])])
                added += 1
        removed = await self._forget_missing(found)
        if added or removed:
            log.info("outputs_rescanned", added=added, removed=removed, files=len(found))
        return added, removed

    async def _owner(self, relpath: str) -> str:
        if "/" not in relpath:
            return UNKNOWN
        folder = relpath.split("/", 1)[0]
        row = self.db.lookup("SELECT 1 FROM workflows WHERE id = ?", (folder,))
        return folder if row is not None else UNKNOWN

    async def _forget_missing(self, found: dict[str, int]) -> int:
        removed = 0
        last = 0
        while True:
            rows = await self.db.fetchall(
                "SELECT id, path, workflow_id FROM outputs WHERE id > ? ORDER BY id LIMIT 1000", (last,))
            if not rows:
                return removed
            last = rows[-1][0]
            gone = [(r[1], r[2]) for r in rows if r[1] not in found]
            gone = [(p, w) for p, w in gone if not (self.outputs_dir / p).exists()]  # written since the walk
            if gone:
                statements = [OutputIndex.delete_statement(p) for p, _ in gone]
                for path, workflow_id in gone:  # a job stops listing a file deleted by hand, too
                    if (unlisted := self.jobs.without_output(workflow_id, path)) is not None:
                        statements.append(unlisted)
                await self.db.write(statements)
                removed += len(gone)


def _walk(root: Path) -> dict[str, int]:
    """Regular files under ``root`` (relative POSIX paths -> mtime in ms), skipping hidden and partial ones
    and files still settling."""
    found: dict[str, int] = {}
    if not root.is_dir():
        return found
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith(".part"):
                continue
            path = Path(dirpath) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            if now - stat.st_mtime < SETTLE_SECONDS:
                continue
            found[path.relative_to(root).as_posix()] = int(stat.st_mtime * 1000)
    return found
