"""How comfyd drives ComfyUI as it really behaves: restarts, silent sockets, timeouts, OOM, cache, validation."""

from __future__ import annotations

import json

from tests.harness import Comfyd, until, workflow


def quick(n: int) -> dict:
    return workflow("quick", **{"1.color": 2000 + n})


async def _backend(comfyd: Comfyd) -> dict:
    status, body = await comfyd.request("GET", "/v1/comfyui/backends")
    assert status == 200
    return body["backends"][0]


async def test_comfyui_restart_mid_job_retries_and_backend_goes_down_then_up(standin, comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory([standin], max_attempts=2)
    standin.hold()
    workflow_id = await comfyd.submit(quick(0))
    await standin.wait_for(lambda: standin.held is not None)
    await standin.stop()  # like a crash: the socket ends with 1006, the prompt is gone
    backend = comfyd.service.scheduler.backends["gpu0"]
    await until(lambda: not backend.up)
    assert (await _backend(comfyd))["state"] == "down"
    standin.release()
    await standin.start()  # comes back empty: queue and history gone
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed"
    assert backend.up and (await _backend(comfyd))["state"] == "up"
    job = await comfyd.get(workflow_id)
    assert job["attempts"] == 2
    assert [p["prompt_id"] for p in standin.posted] == [f"{workflow_id}-1", f"{workflow_id}-2"]


async def test_comfyui_restart_without_retries_fails_backend_lost(standin, comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory([standin], max_attempts=1)
    standin.hold()
    workflow_id = await comfyd.submit(quick(1))
    await standin.wait_for(lambda: standin.held is not None)
    await standin.stop()
    standin.release()
    await standin.start()
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:error" and end["errorType"] == "backend_lost"
    # and the backend takes the next job
    assert (await comfyd.wait_end(await comfyd.submit(quick(2))))["type"] == "workflow:completed"


async def test_silent_socket_completes_from_history(standin, comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory([standin], silence=0.2)
    standin.hold()
    workflow_id = await comfyd.submit(quick(3))
    await standin.wait_for(lambda: standin.held is not None)
    standin.set_silent(True)  # the socket stays open but says nothing more
    standin.release()
    await standin.wait_for(lambda: f"{workflow_id}-1" in standin.history)
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed" and len(end["outputs"]) == 1


async def test_a_run_heard_whole_completes_from_its_frames_without_reading_history(comfyd: Comfyd, standin) -> None:
    workflow_id = await comfyd.submit(quick(5))
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed" and len(end["outputs"]) == 1
    assert f"{workflow_id}-1" not in standin.history_reads  # execution_success and executed frames said it all


async def test_a_run_whose_socket_dropped_completes_from_history(comfyd: Comfyd, standin) -> None:
    standin.hold()
    workflow_id = await comfyd.submit(quick(6))
    prompt_id = f"{workflow_id}-1"
    await standin.wait_for(lambda: standin.held is not None)
    standin.drop_sockets()  # frames sent meanwhile would be lost: comfyd must not trust the socket alone
    await standin.wait_for(lambda: prompt_id in standin.history_reads)  # reconnected: asked where it is
    before = standin.history_reads.count(prompt_id)
    standin.release()
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed" and len(end["outputs"]) == 1
    assert standin.history_reads.count(prompt_id) > before  # the end was confirmed from /history


async def test_cached_rerun_still_has_outputs(comfyd: Comfyd, standin) -> None:
    graph = quick(4)
    first = await comfyd.submit(graph, keepPrefix=True)
    assert (await comfyd.wait_end(first))["type"] == "workflow:completed"
    second = await comfyd.submit(graph, keepPrefix=True)  # identical: ComfyUI serves it from its cache
    end = await comfyd.wait_end(second)
    assert end["type"] == "workflow:completed"
    assert [o["filename"] for o in end["outputs"]] == [o["filename"] for o in (await comfyd.get(first))["outputs"]]


async def test_timeout_interrupts_and_fails(comfyd: Comfyd, standin) -> None:
    standin.hold()
    workflow_id = await comfyd.submit(quick(5), timeout=0.2)
    await standin.wait_for(lambda: len(standin.interrupt_calls) == 1, timeout=5)
    assert standin.interrupt_calls == [{"prompt_id": f"{workflow_id}-1"}]
    standin.release()
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:error" and end["errorType"] == "timeout"
    assert "timeout" in end["error"]


async def test_oom_is_mapped_and_memory_freed_before_next_job(comfyd: Comfyd, standin) -> None:
    graph = {"1": {"class_type": "StandInRaise", "inputs": {
        "exception_type": "torch.OutOfMemoryError",
        "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"}}}
    workflow_id = await comfyd.submit(graph)
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:error" and end["errorType"] == "oom"
    assert "out of memory" in end["error"].lower() and "StandInRaise" in end["error"]
    assert standin.free_calls == []
    assert (await comfyd.wait_end(await comfyd.submit(quick(6))))["type"] == "workflow:completed"
    assert standin.free_calls == [{"unload_models": True, "free_memory": True}]


async def test_validation_at_the_door(comfyd: Comfyd) -> None:
    executor = comfyd.service.executors["gpu0"]
    await until(lambda: executor.catalogue is not None)
    unknown = workflow("fail_validation_unknown_class")
    status, body = await comfyd.request("POST", "/v1/comfyui/workflow", json={"workflow": unknown})
    assert status == 400 and "NoSuchNodeClass" in body["message"] and body["field"] == "workflow.2.class_type"
    status, body = await comfyd.request("POST", "/v1/comfyui/workflow", json={"workflow": workflow("fail_validation")})
    assert status == 400 and body["field"] == "workflow.1.inputs.width" and "width" in body["message"]
    dangling = quick(7)
    dangling["2"]["inputs"]["image"] = ["99", 0]
    status, body = await comfyd.request("POST", "/v1/comfyui/workflow", json={"workflow": dangling})
    assert status == 400 and "99" in body["message"] and body["field"] == "workflow.2.inputs.image"
    ui = {"nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "version": 0.4}
    status, body = await comfyd.request("POST", "/v1/comfyui/workflow", json={"workflow": ui})
    assert status == 400 and "API format" in body["message"]
    status, text = await comfyd.request("GET", "/metrics")
    assert 'comfyui_workflow_total{status="queued"} 0.0' in text.decode()


async def test_binary_frames_do_not_break_the_executor_and_previews_are_kept(comfyd: Comfyd) -> None:
    graph = json.loads(json.dumps(workflow("progress_ws")))
    workflow_id = await comfyd.submit(graph)
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed"
    status, listing = await comfyd.request("GET", f"/v1/comfyui/outputs?workflowId={workflow_id}")
    previews = [o for o in listing["outputs"] if o["folder"] == "temp"]
    assert previews and all(o["filename"].startswith(f"{workflow_id}/_previews/") for o in previews)
    async with comfyd.http.get(comfyd.url + previews[0]["url"]) as response:
        assert response.status == 200 and (await response.read()).startswith(b"\x89PNG")


async def test_no_backend_of_the_pool_up_fails_backend_unavailable(comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory(["http://127.0.0.1:9"], backend_wait=0.2)  # nothing listens there
    workflow_id = await comfyd.submit(quick(8))
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:error" and end["errorType"] == "backend_unavailable"
    assert "local" in end["error"]


async def test_backend_events_reach_clients_that_ask_for_them(standin, comfyd_factory) -> None:
    comfyd: Comfyd = await comfyd_factory([standin])
    backend = comfyd.service.scheduler.backends["gpu0"]
    await until(lambda: backend.up)
    async with comfyd.stream() as watcher, comfyd.stream() as other:
        await watcher.send_json({"type": "subscribe", "topics": ["backend"]})
        await watcher.send_json({"type": "ping"})
        assert (await watcher.receive_json(timeout=5))["type"] == "pong"  # the subscription is in place
        await standin.stop()
        down = await watcher.receive_json(timeout=10)
        assert down["type"] == "backend:down" and down["backend"] == "gpu0" and "1006" in down["error"]
        await standin.start()
        up = await watcher.receive_json(timeout=10)
        assert up["type"] == "backend:up" and up["backend"] == "gpu0"
        await other.send_json({"type": "ping"})
        assert (await other.receive_json(timeout=5))["type"] == "pong"  # no backend events without asking
