"""The one owner of the SQLite database: WAL mode, numbered migrations, group commit.

Writers call ``write(statements)`` and get a future that resolves once their statements are committed.
Whatever is written during one turn of the event loop goes into one transaction (group commit), runs of the
same statement through ``executemany``, so a burst of submissions costs one commit, not one each. If a batch
fails, each caller's statements are retried in a transaction of their own so that one bad write (say, a
duplicate idempotency key) fails only its own caller.

Where the commit runs depends on ``synchronous``. With NORMAL (or OFF) a WAL commit is an append to the WAL
file with no fsync, a few microseconds per row, so it runs right on the event loop: handing it to a thread
costs more than the write (each hop passes the GIL back and forth). The fsyncs that NORMAL does make happen in
checkpoints, and those run on a connection of their own in aiosqlite's thread, never on the loop. With FULL
(or EXTRA) every commit waits for an fsync, so commits run in a writer thread instead.

Reads never wait for the writer and never see an uncommitted batch (WAL). Lookups by a unique key
(``lookup``) run on the event loop too, on a read-only connection of their own: an index probe takes a few
microseconds, a hop to a reader thread and back much longer. Queries that may scan (listings, counts,
recovery) go through ``fetchone``/``fetchall`` on an aiosqlite connection, off the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from comfyd.errors import StorageError
from comfyd.store.migrations import MIGRATIONS

log = structlog.get_logger("comfyd.store")

Statement = tuple[str, Sequence[Any]]
LOOP_BUSY_TIMEOUT_MS = 200  # the longest a commit on the event loop waits for another process's lock
CHECKPOINT_EVERY = 1000  # statements committed between checkpoints (SQLite's own default: 1000 WAL pages)
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated back to this when it starts over


@dataclass(slots=True)
class _Write:
    statements: list[Statement]
    future: asyncio.Future[None]


class Database:
    def __init__(self, path: Path, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000,
                 batch_max: int = 512, queue_max: int = 100_000) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self.batch_max = batch_max
        self.queue_max = queue_max
        self.offloaded = self.synchronous in ("FULL", "EXTRA")  # commits wait for fsync: keep them off the loop
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lookups: sqlite3.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._pending: list[_Write] = []
        self._flush_scheduled = False
        self._busy = False  # a batch is being committed, or a checkpoint runs: new writes wait in _pending
        self._idle = asyncio.Event()
        self._closed = True
        self._since_checkpoint = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0
        self.checkpoints = 0
        self.on_commit: Callable[[int], Any] | None = None  # called with the batch size after each commit

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        busy = self.busy_timeout_ms if self.offloaded else min(self.busy_timeout_ms, LOOP_BUSY_TIMEOUT_MS)
        for pragma in _pragmas(self.synchronous, busy):
            self._writer.execute(pragma)
        self._writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        if not self.offloaded:
            self._writer.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints (and their fsyncs) run elsewhere
        self._migrate(self._writer)
        if self.offloaded:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="comfyd-db-writer")
        self._reader = await self._connect()
        await self._reader.execute("PRAGMA query_only = ON")
        self._lookups = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lookups.row_factory = sqlite3.Row
        for pragma in (*_pragmas(self.synchronous, LOOP_BUSY_TIMEOUT_MS), "PRAGMA query_only = ON"):
            self._lookups.execute(pragma)
        self._checkpointer = await self._connect()
        self._closed = False
        self._idle.set()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        for pragma in _pragmas(self.synchronous, self.busy_timeout_ms):
            await conn.execute(pragma)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("database_migrated", version=number, path=str(self.path))

    async def close(self) -> None:
        """Commit what is queued, then close the connections (the last one to close checkpoints the WAL)."""
        if self._closed:
            return
        self._closed = True
        while self._pending or self._busy:
            if not self._flush_scheduled and not self._busy:
                self._flush()
            else:
                self._idle.clear()
                await self._idle.wait()
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        for conn in (self._reader, self._checkpointer):
            if conn is not None:
                await conn.close()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        if self._lookups is not None:
            self._lookups.close()
        if self._writer is not None:
            self._writer.close()
        self._reader = self._checkpointer = self._writer = self._thread = self._lookups = None

    # -- writes ------------------------------------------------------------------------------------------
    def write(self, statements: Iterable[Statement]) -> asyncio.Future[None]:
        """Queue statements for the next group commit; the future resolves once they are durable."""
        if self._closed:
            raise StorageError("the database is closed")
        if len(self._pending) >= self.queue_max:
            raise StorageError("the database is behind on writes; try again shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        item = _Write(list(statements), loop.create_future())
        self._pending.append(item)
        if not self._flush_scheduled and not self._busy:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return item.future

    def _flush(self) -> None:
        """Commit what this turn of the loop wrote: here, or in the writer thread when commits fsync."""
        self._flush_scheduled = False
        if not self._pending or self._writer is None:
            return
        batch, self._pending = self._pending[:self.batch_max], self._pending[self.batch_max:]
        self._busy = True
        if self._thread is None:
            self._committed(batch, self._commit(batch))
            return
        done = asyncio.get_running_loop().run_in_executor(self._thread, self._commit, batch)
        done.add_done_callback(lambda f: self._committed(batch, _outcomes(f, len(batch))))

    def _commit(self, batch: list[_Write]) -> list[Exception | None]:
        """One transaction for the batch; if it fails, one per caller, so a bad write fails only its own."""
        assert self._writer is not None
        try:
            _run_transaction(self._writer, [s for w in batch for s in w.statements])
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its callers, none is lost here
            if len(batch) == 1:
                return [_storage_error(exc)]
            outcomes: list[Exception | None] = []
            for item in batch:
                try:
                    _run_transaction(self._writer, item.statements)
                except Exception as one:  # noqa: BLE001 - as above, for one caller
                    outcomes.append(_storage_error(one))
                else:
                    outcomes.append(None)
            return outcomes
        return [None] * len(batch)

    def _committed(self, batch: list[_Write], outcomes: list[Exception | None]) -> None:
        stored = sum(1 for o in outcomes if o is None)
        if stored:
            self.batches += 1
            self.writes += stored
            self._since_checkpoint += sum(len(w.statements) for w in batch)
            if self.on_commit is not None:
                self.on_commit(stored)
        for item, outcome in zip(batch, outcomes):
            _settle(item, outcome)
        if not self.offloaded and self._since_checkpoint >= CHECKPOINT_EVERY:
            self._since_checkpoint = 0  # the writer stays busy until the checkpoint is done
            self._checkpoint = asyncio.get_running_loop().create_task(self._run_checkpoint(), name="store:checkpoint")
            return
        self._busy = False
        self._resume()

    def _resume(self) -> None:
        if not self._pending:
            self._idle.set()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _run_checkpoint(self) -> None:
        """Copy the WAL back into the database, with its fsyncs, in aiosqlite's thread while the loop runs on.
        Writes wait meanwhile (they gather into the next batch): with no commit racing it, the checkpoint
        catches up with the whole WAL, so the next commit starts the WAL over. Under steady load a checkpoint
        beside the writer would never catch up and the WAL would grow without bound."""
        try:
            if self._checkpointer is not None:
                await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self.checkpoints += 1
        except sqlite3.Error as exc:
            log.warning("database_checkpoint_failed", error=str(exc))
        finally:
            self._checkpoint = None
            self._busy = False
            self._resume()

    # -- reads -------------------------------------------------------------------------------------------
    def lookup(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """One row by a unique key, read right here on the loop. Only for queries that probe an index."""
        if self._lookups is None:
            raise StorageError("the database is closed")
        try:
            return self._lookups.execute(sql, params).fetchone()
        except sqlite3.OperationalError as exc:
            raise _storage_error(exc) from exc

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


def _pragmas(synchronous: str, busy_timeout_ms: int) -> list[str]:
    return ["PRAGMA journal_mode = WAL", f"PRAGMA synchronous = {synchronous}",
            f"PRAGMA busy_timeout = {int(busy_timeout_ms)}", "PRAGMA foreign_keys = ON"]


def _run_transaction(conn: sqlite3.Connection, statements: list[Statement]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        i = 0
        while i < len(statements):  # runs of one statement text go through executemany
            sql = statements[i][0]
            j = i
            while j < len(statements) and statements[j][0] == sql:
                j += 1
            if j - i == 1:
                conn.execute(sql, statements[i][1])
            else:
                conn.executemany(sql, [params for _, params in statements[i:j]])
            i = j
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise


def _outcomes(done: asyncio.Future[list[Exception | None]], size: int) -> list[Exception | None]:
    if done.cancelled():
        return [StorageError("the database writer stopped")] * size
    exc = done.exception()
    if exc is not None:
        return [exc if isinstance(exc, Exception) else StorageError(repr(exc))] * size
    return done.result()


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
