"""The one owner of the SQLite database: WAL mode, numbered migrations, group commit.

Writers call ``write(statements)`` and get a future that resolves once their statements are committed.
A single writer task drains whatever is waiting into one transaction (group commit), running runs of the
same statement with ``executemany``, so a burst of submissions costs one fsync, not one each. If a batch
fails, each caller's statements are retried in a transaction of their own so that one bad write (say, a
duplicate idempotency key) fails only its own caller. Reads use a second connection: in WAL mode they never
wait for the writer and never see an uncommitted batch.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from comfyd.errors import StorageError
from comfyd.store.migrations import MIGRATIONS

log = structlog.get_logger("comfyd.store")

Statement = tuple[str, Sequence[Any]]


@dataclass(slots=True)
class _Write:
    statements: list[Statement]
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Database:
    def __init__(self, path: Path, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000,
                 batch_max: int = 512, queue_max: int = 100_000) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.batch_max = batch_max
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue(queue_max)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0
        self.on_commit: Any = None  # called with the batch size after each group commit (metrics)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._migrate(self._writer)
        self._reader = await self._connect()
        await self._reader.execute("PRAGMA query_only = ON")
        self._task = asyncio.create_task(self._write_loop(), name="store:writer")

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        await conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        (version,) = await (await conn.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            log.info("database_migrated", version=number, path=str(self.path))

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        if self._task is not None:
            await self._queue.put(None)
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    # -- writes ------------------------------------------------------------------------------------------
    def write(self, statements: Iterable[Statement]) -> asyncio.Future[None]:
        """Queue statements for the next group commit; the future resolves once they are durable."""
        if self._task is None or self._task.done():
            raise StorageError("the database is closed")
        item = _Write(list(statements))
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise StorageError("the database is behind on writes; try again shortly", retry_after=1) from None
        return item.future

    async def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            await self._commit(batch)

    async def _commit(self, batch: list[_Write]) -> None:
        assert self._writer is not None
        try:
            await self._run_transaction(self._writer, [s for w in batch for s in w.statements])
        except (sqlite3.Error, OverflowError, ValueError) as exc:
            if len(batch) == 1:
                _settle(batch[0], _storage_error(exc))
                return
            for item in batch:  # isolate the bad write: each caller on its own
                try:
                    await self._run_transaction(self._writer, item.statements)
                except (sqlite3.Error, OverflowError, ValueError) as one:
                    _settle(item, _storage_error(one))
                else:
                    _settle(item, None)
            return
        self.batches += 1
        self.writes += len(batch)
        if self.on_commit is not None:
            self.on_commit(len(batch))
        for item in batch:
            _settle(item, None)

    @staticmethod
    async def _run_transaction(conn: aiosqlite.Connection, statements: list[Statement]) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            i = 0
            while i < len(statements):  # runs of one statement text go through executemany
                sql = statements[i][0]
                j = i
                while j < len(statements) and statements[j][0] == sql:
                    j += 1
                if j - i == 1:
                    await conn.execute(sql, statements[i][1])
                else:
                    await conn.executemany(sql, [params for _, params in statements[i:j]])
                i = j
            await conn.execute("COMMIT")
        except BaseException:
            try:
                await conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    # -- reads -------------------------------------------------------------------------------------------
    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        assert self._reader is not None, "database is not open"
        try:
            async with self._reader.execute(sql, params) as cursor:
                return await cursor.fetchone()
        except sqlite3.OperationalError as exc:
            raise _storage_error(exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        assert self._reader is not None, "database is not open"
        try:
            async with self._reader.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.OperationalError as exc:
            raise _storage_error(exc) from exc


def _settle(item: _Write, error: Exception | None) -> None:
    if item.future.done():
        return
    if error is None:
        item.future.set_result(None)
    else:
        item.future.set_exception(error)


def _storage_error(exc: Exception) -> Exception:
    if not isinstance(exc, sqlite3.Error):
        return exc  # a value SQLite cannot hold: the caller's mistake
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return exc  # a caller's own mistake (duplicate key): let it map the error itself
    if "locked" in text or "busy" in text:
        return StorageError(f"the database is busy: {text}", retry_after=2)
    if "full" in text or "disk" in text or "readonly" in text:
        return StorageError(f"the database cannot be written: {text}", retry_after=30)
    return StorageError(f"database error: {text}", retry_after=5)


def now_ms() -> int:
    return int(time.time() * 1000)
