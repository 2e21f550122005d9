"""Retention: finished jobs older than a cutoff, or beyond a count, are deleted in small batches.

Queued and running jobs are never touched; output files and their index rows are kept (they are the
user's results, and the index still answers for them with their workflow id).
"""

from __future__ import annotations

from comfyd.store.db import Database, now_ms

BATCH = 200


async def prune_finished(db: Database, *, days: float, max_finished: int) -> int:
    """Delete what retention allows; returns how many jobs went. Each batch is its own short commit, so
    intake never waits long behind it."""
    cutoff = now_ms() - int(days * 86_400_000)
    removed = 0
    while True:
        rows = await db.fetchall(
            "SELECT seq FROM workflows WHERE completed_at IS NOT NULL AND completed_at < ? "
            "AND status IN ('completed', 'failed', 'cancelled') ORDER BY completed_at LIMIT ?", (cutoff, BATCH))
        if not rows:
            break
        await db.write([("DELETE FROM workflows WHERE seq = ?", (r[0],)) for r in rows])
        removed += len(rows)
    row = await db.fetchone("SELECT COUNT(*) FROM workflows WHERE completed_at IS NOT NULL")
    excess = (row[0] if row else 0) - max_finished
    while excess > 0:
        rows = await db.fetchall(
            "SELECT seq FROM workflows WHERE completed_at IS NOT NULL AND status IN ('completed', 'failed', "
            "'cancelled') ORDER BY completed_at LIMIT ?", (min(BATCH, excess),))
        if not rows:
            break
        await db.write([("DELETE FROM workflows WHERE seq = ?", (r[0],)) for r in rows])
        removed += len(rows)
        excess -= len(rows)
    return removed
