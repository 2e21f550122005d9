"""Ordering and cancellation against a busy backend (the stand-in holds its running node at a gate)."""

from __future__ import annotations

import asyncio

from tests.harness import Comfyd, workflow


def quick(n: int) -> dict:
    return workflow("quick", **{"1.color": 1000 + n})  # a different input each: ComfyUI's cache never answers


async def _block_backend(comfyd: Comfyd, standin) -> tuple[str, str]:
    """One job running (held at the gate) and one waiting inside ComfyUI's queue (prefetch 1)."""
    standin.hold()
    running = await comfyd.submit(quick(0))
    await standin.wait_for(lambda: standin.held is not None)
    waiting = await comfyd.submit(quick(1))
    await standin.wait_for(lambda: len(standin.pending_prompt_ids) == 1)
    return running, waiting


async def test_run_order_is_high_normal_low_fifo_within(comfyd: Comfyd, standin) -> None:
    running, waiting = await _block_backend(comfyd, standin)
    order = ["low", "normal", "high", "normal", "high", "low", "high"]
    ids = [await comfyd.submit(quick(10 + i), priority=p) for i, p in enumerate(order)]
    highs, normals, lows = ([i for i, q in zip(ids, order) if q == p] for p in ("high", "normal", "low"))
    # (queue positions in priority order are checked with the backend down in tests/web/test_edge.py)
    standin.release()
    for workflow_id in ids:
        assert (await comfyd.wait_end(workflow_id))["type"] == "workflow:completed"
    ran = [p.rsplit("-", 1)[0] for p in standin.executed_prompt_ids]
    assert ran == [running, *highs, waiting, *normals, *lows]
    assert (await comfyd.get(waiting))["attempts"] == 1  # taken back before it ran: no attempt used up


async def test_cancel_queued_running_and_waiting_inside_comfyui(comfyd: Comfyd, standin) -> None:
    running, waiting = await _block_backend(comfyd, standin)
    queued = await comfyd.submit(quick(2))
    # queued in comfyd only: removed at once
    status, body = await comfyd.request("DELETE", f"/v1/comfyui/workflow/{queued}")
    assert (status, body) == (200, {"workflowId": queued, "status": "cancelled"})
    # waiting inside ComfyUI's queue: deleted there
    status, body = await comfyd.request("DELETE", f"/v1/comfyui/workflow/{waiting}")
    assert (status, body["status"]) == (200, "cancelled")
    assert standin.pending_prompt_ids == []
    # running: interrupted by prompt_id; cancelled once ComfyUI confirms (the interrupt lands at the next node)
    cancel = asyncio.create_task(comfyd.request("DELETE", f"/v1/comfyui/workflow/{running}"))
    await standin.wait_for(lambda: len(standin.interrupt_calls) == 1)
    assert standin.interrupt_calls[0] == {"prompt_id": f"{running}-1"}
    standin.release()
    status, body = await cancel
    assert (status, body["status"]) == (200, "cancelled")
    await standin.idle()
    for workflow_id in (queued, waiting, running):
        assert (await comfyd.get(workflow_id))["status"] == "cancelled"
    # the backend is free again and the next job runs
    after = await comfyd.submit(quick(3))
    assert (await comfyd.wait_end(after))["type"] == "workflow:completed"
    # cancelling twice is harmless; a finished job cannot be cancelled
    status, body = await comfyd.request("DELETE", f"/v1/comfyui/workflow/{running}")
    assert status == 409 and body["currentStatus"] == "cancelled"
    status, body = await comfyd.request("DELETE", f"/v1/comfyui/workflow/{after}")
    assert status == 409 and body["currentStatus"] == "completed" and body["error"] == "Conflict"
    status, body = await comfyd.request("DELETE", "/v1/comfyui/workflow/no-such-id")
    assert status == 404 and body["error"] == "Not Found"
    assert (await comfyd.request("GET", "/v1/comfyui/workflow/no-such-id"))[0] == 404


async def test_stream_events_of_a_cancel(comfyd: Comfyd, standin) -> None:
    running, _ = await _block_backend(comfyd, standin)
    async with comfyd.stream() as ws:
        await ws.send_json({"type": "subscribe", "workflowId": running})
        first = await ws.receive_json(timeout=5)
        assert first["type"] in ("workflow:started", "workflow:progress") and first["workflowId"] == running
        cancel = asyncio.create_task(comfyd.request("DELETE", f"/v1/comfyui/workflow/{running}"))
        await standin.wait_for(lambda: len(standin.interrupt_calls) == 1)
        standin.release()
        async with asyncio.timeout(5):
            while (event := await ws.receive_json())["type"] != "workflow:cancelled":
                assert event["workflowId"] == running
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=5))["type"] == "pong"
        await cancel
