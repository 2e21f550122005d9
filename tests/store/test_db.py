"""The store on a real SQLite file: migrations, WAL, group commit, per-caller failures, close, reopen;
JobStore rows and the keyset-paged OutputIndex."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from comfyd.errors import BadRequest, StorageError
from comfyd.messages import JobError, Output
from comfyd.store.db import CHECKPOINT_EVERY, Database
from comfyd.store.jobs import JobStore
from comfyd.store.migrations import MIGRATIONS
from comfyd.store.outputs import OutputIndex, decode_cursor, encode_cursor

WAIT = 5.0
META = "INSERT INTO meta (key, value) VALUES (?, ?)"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "comfyd.db"  # the folder does not exist yet: open() makes it


@pytest.fixture(params=["NORMAL", "FULL"])
async def db(db_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """Both commit paths: on the event loop (NORMAL) and in the writer thread (FULL, each commit fsyncs)."""
    database = Database(db_path, synchronous=request.param)
    await database.open()
    yield database
    await database.close()


def outside(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read with a connection of our own, as another process would: only committed data is visible."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# -- schema and pragmas --------------------------------------------------------------------------------------
async def test_migrations_create_the_schema_and_set_user_version(db: Database, db_path: Path) -> None:
    tables = {name for (name,) in outside(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "workflows", "outputs", "services", "model_hashes"} <= tables
    indexes = {name for (name,) in outside(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"workflows_active", "outputs_newest", "outputs_by_workflow"} <= indexes
    row = await db.fetchone("PRAGMA user_version")
    assert row is not None and row[0] == len(MIGRATIONS) >= 1


async def test_wal_mode_is_on(db: Database, db_path: Path) -> None:
    row = await db.fetchone("PRAGMA journal_mode")
    assert row is not None and row[0] == "wal"
    assert outside(db_path, "PRAGMA journal_mode") == [("wal",)]  # persistent in the file


async def test_the_reader_connection_cannot_write(db: Database) -> None:
    with pytest.raises((StorageError, sqlite3.Error)):
        await db.fetchall("INSERT INTO meta (key, value) VALUES ('x', 'y')")


# -- group commit --------------------------------------------------------------------------------------------
async def test_concurrent_writes_are_grouped_into_few_transactions(db: Database, db_path: Path) -> None:
    batches, writes = db.batches, db.writes

    async def one(i: int) -> None:
        await db.write([(META, (f"k{i}", str(i)))])

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), WAIT)
    assert db.writes - writes == 200
    assert db.batches - batches < db.writes - writes
    assert db.batches - batches <= 10  # 200 callers waiting at once: a handful of commits, not 200
    assert outside(db_path, "SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'") == [(200,)]


async def test_normal_commits_on_the_loop_and_checkpoints_in_the_background(db_path: Path) -> None:
    db = Database(db_path, synchronous="NORMAL")
    await db.open()
    try:
        assert not db.offloaded
        assert db._writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)  # noqa: SLF001
        for i in range(CHECKPOINT_EVERY):  # one commit each: the last one crosses the threshold
            await asyncio.wait_for(db.write([(META, (f"c{i}", "x" * 100))]), WAIT)
        assert db._checkpoint is not None and db.checkpoints == 0  # noqa: SLF001 - started, not run yet
        late = db.write([(META, ("during", "checkpoint"))])
        await asyncio.sleep(0)  # one loop turn: without the checkpoint, this write would be committed now
        await asyncio.sleep(0)
        assert not late.done()  # it waits for the checkpoint, then goes in the next batch
        await asyncio.wait_for(late, WAIT)
        assert db.checkpoints == 1
    finally:
        await db.close()
    assert outside(db_path, "SELECT COUNT(*) FROM meta WHERE key LIKE 'c%' OR key = 'during'") == [(1001,)]


async def test_the_wal_stays_bounded_under_a_steady_stream_of_commits(db_path: Path) -> None:
    """One commit after another, as under steady intake: each checkpoint catches up with the whole WAL, so
    the WAL starts over instead of growing (a checkpoint racing the writer never caught up: 350 MB in 15 s)."""
    db = Database(db_path, synchronous="NORMAL")
    await db.open()
    try:
        for i in range(5 * CHECKPOINT_EVERY):  # a page or two per commit: ~48 MB of WAL without checkpoints
            await asyncio.wait_for(db.write([(META, (f"s{i}", "y" * 200))]), WAIT)
        wal = db_path.with_name(db_path.name + "-wal")
        assert db.checkpoints >= 4
        assert wal.stat().st_size < 16 * 1024 * 1024, wal.stat().st_size  # what one interval's commits need
    finally:
        await db.close()


async def test_full_commits_in_the_writer_thread(db_path: Path) -> None:
    db = Database(db_path, synchronous="FULL")
    await db.open()
    try:
        assert db.offloaded
        future = db.write([(META, ("fsynced", "1"))])
        await asyncio.wait_for(future, WAIT)
        assert outside(db_path, "SELECT value FROM meta WHERE key = 'fsynced'") == [("1",)]
        assert (await db.fetchone("PRAGMA synchronous"))[0] == 2  # FULL
    finally:
        await db.close()


async def test_a_write_resolves_only_after_its_commit(db: Database, db_path: Path) -> None:
    future = db.write([(META, ("durable", "yes")),
                       ("UPDATE meta SET value = ? WHERE key = ?", ("still yes", "durable"))])
    assert not future.done()  # nothing is acknowledged before the writer has committed it
    await asyncio.wait_for(future, WAIT)
    row = await db.fetchone("SELECT value FROM meta WHERE key = ?", ("durable",))
    assert row is not None and row["value"] == "still yes"
    assert outside(db_path, "SELECT value FROM meta WHERE key = 'durable'") == [("still yes",)]


async def test_one_failing_write_fails_only_its_own_caller(db: Database) -> None:
    await db.write([(META, ("taken", "first"))])
    futures = [db.write([(META, (f"ok{i}", str(i)))]) for i in range(5)]
    bad = db.write([(META, ("taken", "second"))])  # duplicate primary key, in the same batch
    futures += [db.write([(META, (f"ok{i}", str(i)))]) for i in range(5, 10)]
    results = await asyncio.wait_for(asyncio.gather(*futures, bad, return_exceptions=True), WAIT)
    assert results[:-1] == [None] * 10
    assert isinstance(results[-1], sqlite3.IntegrityError)
    rows = await db.fetchall("SELECT key, value FROM meta WHERE key LIKE 'ok%' OR key = 'taken' ORDER BY key")
    assert {r["key"]: r["value"] for r in rows} == {"taken": "first", **{f"ok{i}": str(i) for i in range(10)}}


async def test_a_failing_write_is_rolled_back_as_a_whole(db: Database) -> None:
    await db.write([(META, ("taken", "first"))])
    good = db.write([(META, ("neighbour", "1"))])
    bad = db.write([(META, ("half", "written")), (META, ("taken", "again"))])
    results = await asyncio.wait_for(asyncio.gather(good, bad, return_exceptions=True), WAIT)
    assert results[0] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert await db.fetchone("SELECT 1 FROM meta WHERE key = 'half'") is None  # no half of a write
    assert await db.fetchone("SELECT 1 FROM meta WHERE key = 'neighbour'") is not None


async def test_a_broken_statement_is_a_storage_error_for_its_caller_only(db: Database) -> None:
    good = db.write([(META, ("fine", "1"))])
    bad = db.write([("INSERT INTO no_such_table VALUES (?)", (1,))])
    results = await asyncio.wait_for(asyncio.gather(good, bad, return_exceptions=True), WAIT)
    assert results[0] is None
    assert isinstance(results[1], StorageError)
    assert "no_such_table" in results[1].message
    # The writer is still alive.
    await asyncio.wait_for(db.write([(META, ("after", "1"))]), WAIT)


async def test_a_parameter_sqlite_cannot_store_fails_only_its_caller(db: Database) -> None:
    good = db.write([(META, ("fine", "1"))])
    bad = db.write([(META, ("odd", {"not": "storable"}))])
    results = await asyncio.wait_for(asyncio.gather(good, bad, return_exceptions=True), WAIT)
    assert results[0] is None
    assert isinstance(results[1], Exception)
    await asyncio.wait_for(db.write([(META, ("after", "1"))]), WAIT)


async def test_a_value_sqlite_cannot_hold_fails_only_its_caller_and_the_writer_lives_on(db: Database) -> None:
    # Python's sqlite3 raises OverflowError (not an sqlite3.Error) for integers beyond 64 bits.
    good = db.write([(META, ("fine", "1"))])
    bad = db.write([(META, ("huge", 10**30))])
    results = await asyncio.wait_for(asyncio.gather(good, bad, return_exceptions=True), 2.0)
    assert results[0] is None
    assert isinstance(results[1], Exception)
    await asyncio.wait_for(db.write([(META, ("after", "1"))]), 2.0)


async def test_close_commits_what_was_queued_and_reopening_sees_everything(db_path: Path) -> None:
    db = Database(db_path)
    await db.open()
    futures = [db.write([(META, (f"q{i}", str(i)))]) for i in range(300)]
    await db.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(StorageError, match="closed"):
        db.write([(META, ("late", "1"))])

    again = Database(db_path)
    await again.open()  # migrations are not run twice
    try:
        row = await again.fetchone("SELECT COUNT(*) FROM meta WHERE key LIKE 'q%'")
        assert row is not None and row[0] == 300
        version = await again.fetchone("PRAGMA user_version")
        assert version is not None and version[0] == len(MIGRATIONS)
    finally:
        await again.close()


async def test_a_write_before_open_is_refused(db_path: Path) -> None:
    with pytest.raises(StorageError):
        Database(db_path).write([(META, ("early", "1"))])


# -- JobStore ------------------------------------------------------------------------------------------------
def insert(jobs: JobStore, workflow_id: str, seq: int, *, rank: int, priority: str = "normal",
           key: str | None = None) -> asyncio.Future[None]:
    return jobs.insert(workflow_id=workflow_id, seq=seq, priority=priority, pool="local", rank=rank,
                       workflow=b'{"1": {"class_type": "X", "inputs": {}}}', created_at=1_000 + seq,
                       timeout=None, idempotency_key=key)


async def test_job_insert_get_update_finish(db: Database) -> None:
    jobs = JobStore(db)
    assert await jobs.get("w1") is None
    await insert(jobs, "w1", 1, rank=500, key="idem-1")
    job = await jobs.get("w1")
    assert job is not None
    assert (job.id, job.seq, job.status, job.priority, job.pool, job.rank) == ("w1", 1, "queued", "normal",
                                                                               "local", 500)
    assert (job.progress, job.outputs, job.error, job.attempts, job.created_at) == (0.0, [], None, 0, 1001)
    assert await jobs.workflow_json("w1") == b'{"1": {"class_type": "X", "inputs": {}}}'
    assert (await jobs.by_idempotency_key("idem-1")).id == "w1"  # type: ignore[union-attr]
    assert await jobs.by_idempotency_key("idem-2") is None
    assert await jobs.max_seq() == 1

    await jobs.update("w1", status="running", started_at=2_000, backend="gpu0", progress=40.0,
                      current_node="3")
    job = await jobs.get("w1")
    assert job is not None
    assert (job.status, job.started_at, job.backend, job.progress, job.current_node) == (
        "running", 2_000, "gpu0", 40.0, "3")

    output = Output(filename="a_00001_.png", subfolder="w1", node_id="9", size=10, kind="image", format="png")
    await db.write([jobs.finish("w1", status="failed", completed_at=3_000, outputs=(output,),
                                error=JobError(error_type="oom", message="out of memory",
                                               detail={"node": "3"}))])
    job = await jobs.get("w1")
    assert job is not None
    assert (job.status, job.completed_at, job.error, job.error_type, job.error_detail) == (
        "failed", 3_000, "out of memory", "oom", {"node": "3"})
    assert job.outputs == [output]


async def test_a_duplicate_idempotency_key_is_refused(db: Database) -> None:
    jobs = JobStore(db)
    await insert(jobs, "w1", 1, rank=1, key="same")
    with pytest.raises(sqlite3.IntegrityError):
        await insert(jobs, "w2", 2, rank=2, key="same")
    assert await jobs.get("w2") is None


async def test_active_jobs_in_dispatch_order(db: Database) -> None:
    jobs = JobStore(db)
    await asyncio.gather(
        insert(jobs, "late-high", 4, rank=100),
        insert(jobs, "normal", 1, rank=600_100),
        insert(jobs, "high", 2, rank=100),  # same rank as late-high: seq decides
        insert(jobs, "done", 3, rank=50),
        insert(jobs, "running", 5, rank=700_000),
    )
    await jobs.update("done", status="completed", completed_at=5)
    await jobs.update("running", status="running", backend="gpu0", prompt_id="p")
    rows = await jobs.active()
    assert [r["id"] for r in rows] == ["high", "late-high", "normal", "running"]
    assert rows[-1]["status"] == "running" and rows[-1]["backend"] == "gpu0"
    assert [j.id for j in await jobs.recent(10)] == ["running", "late-high", "done", "high", "normal"]
    assert [j.id for j in await jobs.recent(10, status="completed")] == ["done"]


# -- OutputIndex ---------------------------------------------------------------------------------------------
async def fill_outputs(db: Database, count: int = 120) -> list[tuple[int, str]]:
    """``count`` rows, four per created_at value; returns (created_at, path) in insertion order."""
    rows = []
    statements = []
    for i in range(count):
        workflow_id = f"w{i % 3}"
        ext = "png" if i % 2 == 0 else "mp4"
        path = f"{workflow_id}/out_{i:05d}.{ext}"
        created_at = 1_000_000 + i // 4
        facts = {"kind": "image" if ext == "png" else "video", "format": ext, "size": i, "sha256": None,
                 "width": 8 if ext == "png" else None, "height": 8 if ext == "png" else None}
        statements.append(OutputIndex.upsert_statement(path=path, workflow_id=workflow_id, facts=facts,
                                                       created_at=created_at))
        rows.append((created_at, path))
    await db.write(statements)
    return rows


async def all_pages(index: OutputIndex, limit: int, **filters: str | None) -> tuple[list[dict], int]:
    seen: list[dict] = []
    cursor = None
    pages = 0
    while True:
        page = await index.page(workflow_id=filters.get("workflow_id"), kind=filters.get("kind"), limit=limit,
                                cursor=cursor)
        pages += 1
        assert len(page["outputs"]) <= limit
        seen += page["outputs"]
        cursor = page["nextCursor"]
        if cursor is None:
            return seen, pages
        assert pages < 100, "paging does not end"


async def test_paging_through_every_output_newest_first(db: Database) -> None:
    inserted = await fill_outputs(db)
    index = OutputIndex(db)
    seen, pages = await all_pages(index, 25)
    assert pages == 5
    names = [o["filename"] for o in seen]
    assert len(names) == len(set(names)) == 120  # no duplicates, no gaps
    # Newest first; rows with equal created_at in reverse insertion order (the later row id first).
    expected = [path for _, path in reversed(inserted)]
    assert names == expected
    created = [o["createdAt"] for o in seen]
    assert created == sorted(created, reverse=True)
    first = seen[0]
    assert first["url"] == "/v1/comfyui/output/" + first["filename"]
    assert (first["workflowId"], first["type"], first["format"], first["size"]) == ("w2", "video", "mp4", 119)


async def test_paging_with_a_page_boundary_inside_a_run_of_equal_times(db: Database) -> None:
    await fill_outputs(db, 12)
    index = OutputIndex(db)
    seen, pages = await all_pages(index, 3)  # every page boundary falls between rows of equal created_at
    assert len({o["filename"] for o in seen}) == 12
    seen, pages = await all_pages(index, 5)
    assert [o["filename"] for o in seen] == [f"w{i % 3}/out_{i:05d}.{'png' if i % 2 == 0 else 'mp4'}"
                                             for i in reversed(range(12))]
    assert pages == 3


async def test_filter_by_workflow_and_kind(db: Database) -> None:
    await fill_outputs(db)
    index = OutputIndex(db)
    by_workflow, _ = await all_pages(index, 7, workflow_id="w1")
    assert len(by_workflow) == 40 and {o["workflowId"] for o in by_workflow} == {"w1"}
    images, _ = await all_pages(index, 25, kind="image")
    assert len(images) == 60 and {o["type"] for o in images} == {"image"}
    assert all(o["width"] == 8 for o in images)
    both, _ = await all_pages(index, 4, workflow_id="w0", kind="video")
    assert len(both) == 20 and all(o["workflowId"] == "w0" and o["type"] == "video" for o in both)
    nothing = await index.page(workflow_id="unknown", kind=None, limit=10, cursor=None)
    assert nothing == {"outputs": [], "nextCursor": None}


async def test_a_full_last_page_has_no_next_cursor(db: Database) -> None:
    await fill_outputs(db, 50)
    page = await OutputIndex(db).page(workflow_id=None, kind=None, limit=50, cursor=None)
    assert len(page["outputs"]) == 50 and page["nextCursor"] is None


def test_cursor_round_trip() -> None:
    assert decode_cursor(encode_cursor(1_700_000_000_000, 42)) == (1_700_000_000_000, 42)


@pytest.mark.parametrize("cursor", [
    "!!!!",
    "bm90LWEtY3Vyc29y",  # base64 of "not-a-cursor"
    "MToyOjM",  # "1:2:3"
    "YTpi",  # "a:b"
    "__8",  # bytes that are not UTF-8
    "MTo",  # "1:"
])
async def test_a_bad_cursor_is_a_bad_request(db: Database, cursor: str) -> None:
    with pytest.raises(BadRequest) as error:
        await OutputIndex(db).page(workflow_id=None, kind=None, limit=5, cursor=cursor)
    assert error.value.extra["field"] == "cursor"


async def test_a_cursor_with_numbers_sqlite_cannot_hold_is_a_bad_request(db: Database) -> None:
    with pytest.raises(BadRequest):
        await OutputIndex(db).page(workflow_id=None, kind=None, limit=5, cursor=encode_cursor(10**30, 1))


async def test_a_lookup_reads_committed_rows_on_the_loop(db: Database) -> None:
    assert db.lookup("SELECT value FROM meta WHERE key = ?", ("looked-up",)) is None
    pending = db.write([(META, ("looked-up", "1"))])
    assert db.lookup("SELECT value FROM meta WHERE key = ?", ("looked-up",)) is None  # not committed yet
    await asyncio.wait_for(pending, WAIT)
    row = db.lookup("SELECT value FROM meta WHERE key = ?", ("looked-up",))
    assert row is not None and row["value"] == "1"
    with pytest.raises(StorageError, match="readonly"):
        db.lookup("INSERT INTO meta (key, value) VALUES ('x', 'y')")  # read-only


async def test_a_lookup_after_close_is_refused(db_path: Path) -> None:
    db = Database(db_path)
    await db.open()
    await db.close()
    with pytest.raises(StorageError, match="closed"):
        db.lookup("SELECT 1")
