"""Durability at the edge: storage faults are 503s that lose nothing, idempotent submits make one job."""

from __future__ import annotations

import asyncio

from tests.harness import Comfyd, workflow


async def test_full_database_is_503_with_retry_after_and_no_job(comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory(["http://127.0.0.1:9"])
    kept = await comfyd.submit(workflow("quick"))
    writer = comfyd.service.db._writer
    (pages,) = writer.execute("PRAGMA page_count").fetchone()
    writer.execute(f"PRAGMA max_page_count = {pages}")
    big = workflow("quick", **{"3.filename_prefix": "x" * 200_000})  # needs new pages
    async with comfyd.http.post(comfyd.url + "/v1/comfyui/workflow", json={"workflow": big}) as response:
        body = await response.json()
        assert response.status == 503 and int(response.headers["Retry-After"]) > 0
        assert "database" in body["message"]
    (count,) = writer.execute("SELECT COUNT(*) FROM workflows").fetchone()
    assert count == 1  # nothing half-stored for the refused request
    assert (await comfyd.get(kept))["status"] == "queued"  # and nothing already accepted is lost
    writer.execute("PRAGMA max_page_count = 1073741823")
    assert await comfyd.submit(big)


async def test_idempotency_key_returns_the_same_job(comfyd: Comfyd, standin) -> None:
    headers = {"Idempotency-Key": "client-retry-7"}
    bodies = await asyncio.gather(*[
        comfyd.request("POST", "/v1/comfyui/workflow", json={"workflow": workflow("quick")}, headers=headers)
        for _ in range(5)])
    assert {status for status, _ in bodies} == {202}
    assert len({body["workflowId"] for _, body in bodies}) == 1
    await comfyd.wait_end(bodies[0][1]["workflowId"])
    assert len(standin.posted) == 1


async def test_locked_database_is_503_not_a_crash(comfyd_factory) -> None:
    import sqlite3

    comfyd: Comfyd = await comfyd_factory(["http://127.0.0.1:9"])
    comfyd.service.db._writer.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(comfyd.service.config.db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        async with comfyd.http.post(comfyd.url + "/v1/comfyui/workflow", json={"workflow": workflow("quick")}) as r:
            body = await r.json()
            assert r.status == 503 and "Retry-After" in r.headers and "busy" in body["message"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await comfyd.submit(workflow("quick"))  # and it works again once the lock is gone
