"""Retention prunes finished jobs only, by age and by count."""

from __future__ import annotations

from comfyd.actors.janitor import Janitor, Prune
from comfyd.config import RetentionConfig
from comfyd.store.db import Database, now_ms
from comfyd.store.jobs import JobStore


async def test_prune_by_age_and_count_keeps_active_jobs(tmp_path) -> None:
    db = Database(tmp_path / "r.db")
    await db.open()
    jobs = JobStore(db)
    old = now_ms() - 40 * 86_400_000
    for seq in range(1, 31):
        await jobs.insert(workflow_id=f"w{seq}", seq=seq, priority="normal", pool="local", rank=seq,
                          workflow=b"{}", created_at=old, timeout=None, idempotency_key=None)
    for seq in range(1, 11):  # 10 old finished
        await jobs.update(f"w{seq}", status="completed", completed_at=old + seq)
    for seq in range(11, 26):  # 15 recent finished
        await jobs.update(f"w{seq}", status="failed", completed_at=now_ms() - 1000 + seq)
    # 26..30 stay queued, old as they are
    janitor = Janitor(db, RetentionConfig(days=30, max_finished=12, interval_seconds=3600))
    janitor.start()
    removed = await janitor.ask(Prune(), 10)
    assert removed == 10 + 3
    left = {r[0] for r in await db.fetchall("SELECT id FROM workflows")}
    assert left == {f"w{s}" for s in range(14, 31)}
    await janitor.stop()
    await db.close()
