"""End to end over real HTTP and WebSocket: comfyd in front of the stand-in ComfyUI."""

from __future__ import annotations

import asyncio
import hashlib
import json

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Comfyd, workflow


async def test_quick_completes_with_downloadable_output(comfyd: Comfyd, standin) -> None:
    workflow_id = await comfyd.submit(workflow("quick"))
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed"
    job = await comfyd.get(workflow_id)
    assert job["status"] == "completed" and job["progress"] == 100
    assert job["currentNode"] == "SaveImage"
    assert job["startTime"] <= job["completionTime"]
    [output] = job["outputs"]
    assert output["filename"].startswith(f"{workflow_id}/peer_quick_") and output["type"] == "image"
    status, listing = await comfyd.request("GET", f"/v1/comfyui/outputs?workflowId={workflow_id}")
    assert status == 200 and [o["filename"] for o in listing["outputs"]] == [output["filename"]]
    async with comfyd.http.get(comfyd.url + output["url"]) as response:
        body = await response.read()
        assert response.status == 200 and response.content_type == "image/png"
    assert body.startswith(b"\x89PNG") and hashlib.sha256(body).hexdigest() == output["sha256"]
    assert (standin.output_dir / output["filename"]).read_bytes() == body


async def events_of(comfyd: Comfyd, graph: dict) -> tuple[str, list[dict]]:
    """Submit ``graph`` with a stream open; its id and its events, up to its end."""
    seen = []
    async with comfyd.stream() as ws:
        workflow_id = await comfyd.submit(graph)
        async with asyncio.timeout(20):
            async for message in ws:
                event = json.loads(message.data)
                if event.get("workflowId") == workflow_id:
                    seen.append(event)
                    if event["type"] in ("workflow:completed", "workflow:error"):
                        break
    return workflow_id, seen


async def test_slow_reports_progress_in_order(comfyd: Comfyd) -> None:
    _, seen = await events_of(comfyd, workflow("slow"))
    types = [e["type"] for e in seen]
    assert types[0] == "workflow:queued" and types[1] == "workflow:started" and types[-1] == "workflow:completed"
    progress = [e["progress"] for e in seen if e["type"] == "workflow:progress"]
    assert progress == sorted(progress) and len(progress) >= 3
    assert {e["currentNode"] for e in seen if e["type"] == "workflow:progress"} >= {"ImageBlur"}
    assert all(isinstance(e["timestamp"], int) for e in seen)


async def test_execution_failure_is_node_error(comfyd: Comfyd) -> None:
    workflow_id = await comfyd.submit(workflow("fail_exec"))
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:error" and end["errorType"] == "node_error"
    job = await comfyd.get(workflow_id)
    assert job["status"] == "failed" and job["errorType"] == "node_error"
    assert "Sizes of tensors must match" in job["error"] and "ImageBatch" in job["error"]
    assert job["errorDetail"]["nodeId"] == "4"


async def test_validation_failure_names_missing_input(comfyd: Comfyd) -> None:
    workflow_id = await comfyd.submit(workflow("fail_validation"))
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:error" and end["errorType"] == "validation"
    job = await comfyd.get(workflow_id)
    assert "width" in job["error"] and job["errorDetail"]["nodeErrors"]["1"]["errors"][0]["type"] == \
        "required_input_missing"


async def test_metrics_after_runs(comfyd: Comfyd) -> None:
    ok = await comfyd.submit(workflow("quick", **{"1.color": 7}))
    bad = await comfyd.submit(workflow("fail_exec"))
    for workflow_id in (ok, bad):
        await comfyd.wait_end(workflow_id)
    status, text = await comfyd.request("GET", "/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("comfyui_workflow_total", (("status", "completed"),))] == 1
    assert samples[("comfyui_workflow_total", (("status", "failed"),))] == 1
    assert samples[("comfyui_workflow_total", (("status", "queued"),))] == 2
    assert samples[("comfyui_workflow_errors_total", (("error_type", "node_error"),))] == 1
    assert samples[("comfyui_workflow_duration_seconds_count", (("gpu_type", "local"),))] == 1
    assert samples[("comfyui_queue_length", ())] == 0


async def test_late_subscriber_gets_the_final_state(comfyd: Comfyd) -> None:
    workflow_id = await comfyd.submit(workflow("quick", **{"1.color": 77}))
    await comfyd.wait_end(workflow_id)
    async with comfyd.stream() as ws:  # subscribes only after the job completed
        await ws.send_json({"type": "subscribe", "workflowId": workflow_id})
        state = await ws.receive_json(timeout=5)
        assert state["type"] == "workflow:completed" and state["workflowId"] == workflow_id
        assert state["outputs"][0]["url"].startswith("/v1/comfyui/output/")
        await ws.send_json({"type": "subscribe"})
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=5))["type"] == "error"  # a bad message is answered, not fatal
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=5))["type"] == "pong"


async def test_unsubscribing_the_last_workflow_does_not_widen_to_everything(comfyd: Comfyd) -> None:
    first = await comfyd.submit(workflow("quick", **{"1.color": 78}))
    await comfyd.wait_end(first)
    async with comfyd.stream() as ws:
        await ws.send_json({"type": "subscribe", "workflowId": first})
        assert (await ws.receive_json(timeout=5))["type"] == "workflow:completed"
        await ws.send_json({"type": "unsubscribe", "workflowId": first})
        other = await comfyd.submit(workflow("quick", **{"1.color": 79}))
        await comfyd.wait_end(other)
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=5))["type"] == "pong"  # nothing of the other job came first


async def test_progress_of_a_quick_job_folds_into_its_outcome(standin, comfyd_factory) -> None:
    """A job that ends within its first progress interval reports no progress events: its end carries where it
    got to, and the stored job still names its last node. (A long interval keeps the test free of timing.)"""
    comfyd: Comfyd = await comfyd_factory([standin], progress_interval=30.0)
    workflow_id, seen = await events_of(comfyd, workflow("quick"))
    assert [e["type"] for e in seen] == ["workflow:queued", "workflow:started", "workflow:completed"]
    job = await comfyd.get(workflow_id)
    assert job["progress"] == 100 and job["currentNode"] == "SaveImage"


async def test_a_failed_job_keeps_the_progress_it_reached(standin, comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory([standin], progress_interval=30.0)
    workflow_id = await comfyd.submit(workflow("fail_exec"))
    assert (await comfyd.wait_end(workflow_id))["type"] == "workflow:error"
    job = await comfyd.get(workflow_id)
    assert 0 < job["progress"] < 100 and job["currentNode"] == "ImageBatch"
