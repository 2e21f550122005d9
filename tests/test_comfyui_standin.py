"""The stand-in ComfyUI behaves as the recorded traces of a real ComfyUI show.

Each scenario test drives the stand-in the way the trace's client drove the
real server (same request bodies, same order; hold()/release() reproduce
"while node N runs") and compares, socket by socket, the sequence of WS
messages (types and key fields) with the trace.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from PIL import Image

try:
    from tests.comfyui_standin import StandInComfyUI
    from tests.comfyui_standin.fixtures import comfy_standin, comfy_standin_factory
    from tests.comfyui_standin.tracekit import (
        Labels,
        WsClient,
        expected_frames,
        live_frames,
        load_trace,
        norm_images,
        trace_http,
        trace_posts,
    )
except ImportError:  # tests/ is not a package: tests/ itself is on sys.path
    from comfyui_standin import StandInComfyUI  # type: ignore[no-redef]
    from comfyui_standin.fixtures import comfy_standin, comfy_standin_factory  # noqa: F401
    from comfyui_standin.tracekit import (  # type: ignore[no-redef]
        Labels,
        WsClient,
        expected_frames,
        live_frames,
        load_trace,
        norm_images,
        trace_http,
        trace_posts,
    )


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A fresh TCP connection per request, so a restarted server is seen as such.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


@pytest.fixture
def standin(comfy_standin: StandInComfyUI) -> StandInComfyUI:
    return comfy_standin


async def request(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {} if body is None else {"data": body} if isinstance(body, str) else {"json": body}
    async with session.request(method, url, **kwargs) as response:
        text = await response.text()
        if response.content_type == "application/json":
            return response.status, json.loads(text)
        return response.status, text


class Run:
    """Replays one trace: its POST bodies, prompt-id labels on both sides, WS comparison."""

    def __init__(self, standin: StandInComfyUI, session: aiohttp.ClientSession, trace_name: str) -> None:
        self.standin, self.session = standin, session
        self.trace = load_trace(trace_name)
        self.posts = trace_posts(self.trace)
        self.expected_labels, self.live_labels = Labels(), Labels()
        for post in self.posts:
            if post["status"] == 200:
                self.expected_labels.add(post["body_json"]["prompt_id"])
        self.ids: list[str] = []

    async def socket(self, client_id: str | None, **kwargs: Any) -> WsClient:
        client = await WsClient(self.session, self.standin.ws_url, client_id, **kwargs).connect()
        await client.wait_message("status")
        return client

    async def advance_counter(self, to: int) -> None:
        """Invalid posts advance the server's `number` too: make ours equal the trace's."""
        for _ in range(to):
            status, body = await request(self.session, "POST", self.standin.url + "/prompt", {})
            assert status == 400 and body["error"]["type"] == "no_prompt"

    async def post(self, index: int, **changes: Any) -> dict[str, Any]:
        recorded = self.posts[index]
        body = copy.deepcopy(recorded["request_json"])
        body.update(changes)
        status, answer = await request(self.session, "POST", self.standin.url + "/prompt", body)
        assert status == recorded["status"], answer
        assert answer["number"] == recorded["body_json"]["number"]
        assert answer["node_errors"] == recorded["body_json"]["node_errors"]
        self.live_labels.add(answer["prompt_id"])
        self.ids.append(answer["prompt_id"])
        return answer

    async def settle(self, *clients: WsClient) -> None:
        await self.standin.idle()
        for client in clients:
            await client.barrier()

    def check(self, client: WsClient, ws_name: str) -> None:
        expected = expected_frames(self.trace, ws_name, self.expected_labels)
        assert live_frames(client, self.live_labels) == expected

    async def history(self, index: int) -> dict[str, Any]:
        prompt_id = self.ids[index]
        status, body = await request(self.session, "GET", f"{self.standin.url}/history/{prompt_id}")
        assert status == 200
        return body[prompt_id]

    def recorded_history(self, index: int) -> dict[str, Any]:
        prompt_id = self.posts[index]["body_json"]["prompt_id"]
        for event in trace_http(self.trace, "GET", f"/history/{prompt_id}"):
            return event["body_json"][prompt_id]
        raise AssertionError("no recorded history for this prompt")


def norm_history(entry: dict[str, Any], label: Labels) -> dict[str, Any]:
    def data(d: dict[str, Any]) -> dict[str, Any]:
        d = {k: v for k, v in d.items() if k != "timestamp"}
        d["prompt_id"] = label(d["prompt_id"])
        for key in ("executed", "current_outputs"):
            if key in d:
                d[key] = sorted(d[key])
        if "traceback" in d:
            d["traceback"] = bool(d["traceback"])
        if "current_inputs" in d:
            d["current_inputs"] = sorted(d["current_inputs"])
        return d

    number, prompt_id, prompt, extra, outputs = entry["prompt"]
    return {
        "prompt": [number, label(prompt_id), prompt, extra, sorted(outputs)],
        "outputs": {k: norm_images(v) for k, v in entry["outputs"].items()},
        "status": {
            "status_str": entry["status"]["status_str"],
            "completed": entry["status"]["completed"],
            "messages": [[event, data(d)] for event, d in entry["status"]["messages"]],
        },
        "meta": entry["meta"],
    }


def assert_history_matches(run: Run, index: int, live: dict[str, Any]) -> None:
    expected = norm_history(run.recorded_history(index), run.expected_labels)
    assert norm_history(live, run.live_labels) == expected


# -- one prompt ------------------------------------------------------------------------
async def test_s01_quick_success(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s01")
    ws = await run.socket(run.trace["client_id"])
    await run.post(0)
    await run.settle(ws)
    run.check(ws, "ws")
    assert_history_matches(run, 0, await run.history(0))
    assert ws.texts()[0]["data"]["sid"] == run.trace["client_id"]  # the first message is status + sid
    for kind, raw in ws.frames:  # text frames use json.dumps' default separators
        assert kind == "text" and raw == json.dumps(json.loads(raw))

    view = f"{standin.url}/view?filename=peer_quick_00001_.png&subfolder=&type=output"
    async with session.get(view) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "image/png"
        assert response.headers["Content-Disposition"] == 'filename="peer_quick_00001_.png"'
        with Image.open(io.BytesIO(await response.read())) as img:
            assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")
            assert json.loads(img.text["prompt"]) == run.posts[0]["request_json"]["prompt"]
    async with session.get(view + "&preview=webp;50") as response:
        assert response.headers["Content-Type"] == "image/webp"
    async with session.get(view + "&channel=a") as response:
        with Image.open(io.BytesIO(await response.read())) as img:
            assert (response.headers["Content-Type"], img.mode, img.size) == ("image/png", "RGBA", (64, 64))


async def test_s02_cached_rerun_replays_old_file(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s02")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(1)
    await run.post(0)
    await standin.idle()
    await run.post(1)
    await run.settle(ws)
    run.check(ws, "ws")
    for index in (0, 1):
        assert_history_matches(run, index, await run.history(index))
    assert sorted(p.name for p in standin.output_dir.iterdir()) == ["peer_quick_00001_.png"]


async def test_s03_slow_success(comfy_standin_factory: Any, session: aiohttp.ClientSession) -> None:
    standin = await comfy_standin_factory(node_time=0.002)
    run = Run(standin, session, "s03")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(3)
    await run.post(0)
    await run.settle(ws)
    run.check(ws, "ws")
    assert_history_matches(run, 0, await run.history(0))
    with Image.open(standin.output_dir / "peer_slow_00001_.png") as img:
        assert img.size == (320, 320)


@pytest.mark.parametrize("trace_name", ["s04", "s05"])
async def test_s04_s05_progress_and_binary_frames(
    standin: StandInComfyUI, session: aiohttp.ClientSession, trace_name: str
) -> None:
    run = Run(standin, session, trace_name)
    flags = {"supports_preview_metadata": True} if trace_name == "s05" else None
    ws = await run.socket(run.trace["client_id"], feature_flags=flags)
    if flags:
        await ws.wait_message("feature_flags")
    await run.advance_counter(run.posts[0]["body_json"]["number"])
    await run.post(0)
    await run.settle(ws)
    run.check(ws, "ws")
    live = await run.history(0)
    assert_history_matches(run, 0, live)
    name = live["outputs"]["6"]["images"][0]["filename"]
    async with session.get(f"{standin.url}/view?filename={name}&subfolder=&type=temp") as response:
        with Image.open(io.BytesIO(await response.read())) as img:
            assert img.size == (256, 32) and "prompt" in img.text


async def test_s06_execution_error(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s06")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(6)
    await run.post(0)
    await run.settle(ws)
    run.check(ws, "ws")
    assert_history_matches(run, 0, await run.history(0))


async def test_s07_and_every_recorded_post_prompt_answer(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    def without_tracebacks(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_tracebacks(v) for k, v in value.items() if k not in ("traceback", "prompt_id")}
        if isinstance(value, list):
            return [without_tracebacks(v) for v in value]
        return value

    run = Run(standin, session, "s07")
    ws = await run.socket(run.trace["client_id"])
    exchanges = [e for e in load_trace("post_prompt_responses") if e["scenario"] == "s07_validation_errors"]
    await run.advance_counter(7)
    for exchange in exchanges:
        body = exchange["request_raw"] if exchange["request_json"] is None else exchange["request_json"]
        async with session.post(f"{standin.url}/prompt", data=body if isinstance(body, str) else json.dumps(body)) as r:
            assert (r.status, r.headers["Content-Type"]) == (exchange["status"], exchange["content_type"]), exchange["label"]
            answer = json.loads(await r.text()) if r.content_type == "application/json" else await r.text()
        assert without_tracebacks(answer) == without_tracebacks(exchange["body"]), exchange["label"]
        if exchange["status"] == 200:
            run.live_labels.add(answer["prompt_id"])
    await run.settle(ws)
    run.check(ws, "ws")
    assert await request(session, "GET", standin.url + "/queue") == (200, {"queue_running": [], "queue_pending": []})


# -- interrupts and the queue ------------------------------------------------------------
async def test_s08_global_interrupt_lands_at_next_node(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s08")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(21)
    standin.hold("4")
    await run.post(0)
    await standin.wait_for(lambda: standin.held == (run.ids[0], "4"))
    assert await request(session, "POST", standin.url + "/interrupt") == (200, "")
    standin.release()
    await run.settle(ws)
    run.check(ws, "ws")
    assert_history_matches(run, 0, await run.history(0))


async def test_s09_targeted_interrupt(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s09")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(22)
    standin.hold("1")
    await run.post(0)
    await standin.wait_for(lambda: standin.held == (run.ids[0], "1"))
    await run.post(1)
    await request(session, "POST", standin.url + "/interrupt", {"prompt_id": run.ids[1]})  # pending: no-op
    standin.hold("2")
    await standin.wait_for(lambda: standin.held == (run.ids[0], "2"))
    await request(session, "POST", standin.url + "/interrupt", {"prompt_id": run.ids[0]})
    standin.release()
    await run.settle(ws)
    run.check(ws, "ws")
    for index in (0, 1):
        assert_history_matches(run, index, await run.history(index))
    assert standin.interrupt_calls == [{"prompt_id": run.ids[1]}, {"prompt_id": run.ids[0]}]


async def test_s10_queue_delete_front_number(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s10")
    recorded_queues = iter(e["body_json"] for e in trace_http(run.trace, "GET", "/queue"))

    async def check_queue() -> None:
        def norm(body: dict[str, Any], label: Labels) -> Any:
            return {k: [[i[0], label(i[1]), i[3], i[4]] for i in v] for k, v in body.items()}

        _, live = await request(session, "GET", standin.url + "/queue")
        assert norm(live, run.live_labels) == norm(next(recorded_queues), run.expected_labels)

    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(24)
    standin.hold("2")
    await run.post(0)  # A, slow
    await standin.wait_for(lambda: standin.held == (run.ids[0], "2"))
    for index in (1, 2, 3):  # B, C, D
        await run.post(index)
    await check_queue()
    assert await request(session, "GET", standin.url + "/prompt") == (200, {"exec_info": {"queue_remaining": 4}})
    for target in (run.ids[2], "no-such-prompt-id", run.ids[0]):  # C, unknown, the running A
        assert await request(session, "POST", standin.url + "/queue", {"delete": [target]}) == (200, "")
    await check_queue()
    await run.post(4)  # E front
    await run.post(5)  # F number 0.5
    await check_queue()
    standin.release()
    await run.settle(ws)
    run.check(ws, "ws")
    by_label = {v: k for k, v in run.live_labels.names.items()}
    order = [run.expected_labels(pid) for pid in (run.trace["prompt_ids"][k] for k in run.trace["execution_order"])]
    assert standin.executed_prompt_ids == [by_label[label] for label in order]
    assert await request(session, "GET", f"{standin.url}/history/{run.ids[2]}") == (200, {})


# -- routing, sockets, restarts ------------------------------------------------------------
async def test_s12_routing_other_clients_and_no_client_id(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s12")
    observer = await run.socket("peer-observer-c8adc468")
    owner = await run.socket("peer-other-65f4ae9b")
    await run.advance_counter(32)
    await run.post(0)  # (a) owner's prompt
    await run.settle(observer, owner)
    await run.post(1)  # (b) no client_id
    await run.settle(observer, owner)
    standin.hold("2")
    await run.post(2)  # (c) no client_id, interrupted
    await standin.wait_for(lambda: standin.held == (run.ids[2], "2"))
    await request(session, "POST", standin.url + "/interrupt")
    standin.release()
    await run.settle(observer, owner)
    run.check(observer, "observer")
    run.check(owner, "owner")
    for index in (1, 2):
        assert_history_matches(run, index, await run.history(index))


async def test_s13_duplicate_client_id(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s13")
    client_id = run.trace["client_id"]
    old = await run.socket(client_id)
    new = await run.socket(client_id)
    await run.advance_counter(35)
    await run.post(0)
    await run.settle(old, new)
    run.check(old, "ws1(old)")
    await old.close()
    await standin.wait_for(lambda: client_id not in standin.client_ids)  # closing the OLD one removed the id
    await run.post(1)
    await run.settle(new)
    run.check(new, "ws2(new)")  # nothing at all for run 2
    assert (await run.history(1))["status"]["status_str"] == "success"


async def test_s16_restart(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s16")
    client_id = run.trace["client_id"]
    ws = await run.socket(client_id)
    (standin.output_dir / "peer_quick_00010_.png").write_bytes(b"")  # files and counters survive restarts
    await run.advance_counter(40)
    standin.hold("2")
    await run.post(0)
    await ws.wait_message("executing", node="2")
    port = standin.port
    await standin.stop()
    await asyncio.wait_for(ws.closed.wait(), 5)
    assert ws.close_code == 1006
    with pytest.raises(aiohttp.ClientConnectorError):
        await session.ws_connect(f"{standin.ws_url}?clientId={client_id}")
    with pytest.raises(aiohttp.ClientConnectorError):
        await request(session, "GET", standin.url + "/queue")
    standin.release()
    await standin.start()
    assert standin.port == port
    again = await run.socket(client_id)
    assert await request(session, "GET", standin.url + "/queue") == (200, {"queue_running": [], "queue_pending": []})
    assert await request(session, "GET", f"{standin.url}/history/{run.ids[0]}") == (200, {})
    assert await request(session, "GET", standin.url + "/history") == (200, {})
    answer = await run.post(1)
    assert answer["number"] == 0
    await run.settle(again)
    run.check(ws, "ws")
    run.check(again, "ws(reconnected)")
    assert standin.posted == [p["request_json"] for p in run.posts]
    assert standin.executed_prompt_ids == run.ids


async def test_s17_server_sid_idle_interrupt_batch_and_formatted_prefix(
    standin: StandInComfyUI, session: aiohttp.ClientSession
) -> None:
    run = Run(standin, session, "s17")
    ws = await run.socket(None)
    sid = ws.texts()[0]["data"]["sid"]
    assert len(sid) == 32 and int(sid, 16) >= 0
    assert await request(session, "POST", standin.url + "/interrupt") == (200, "")
    assert await request(session, "POST", standin.url + "/interrupt", {"prompt_id": "not-running"}) == (200, "")
    await run.advance_counter(1)
    await run.post(0, client_id=sid)
    await run.settle(ws)
    run.check(ws, "ws(no clientId)")
    live = await run.history(0)
    expected = norm_history(run.recorded_history(0), run.expected_labels)
    expected["prompt"][3] = {"client_id": sid}
    assert norm_history(live, run.live_labels) == expected
    folder = live["outputs"]["3"]["images"][0]["subfolder"]
    with Image.open(standin.output_dir / folder / "img_48x32_00002_.png") as img:
        assert img.size == (48, 32)


async def test_s18_reconnect_mid_run(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s18")
    client_id = run.trace["client_id"]
    first = await run.socket(client_id)
    await run.advance_counter(2)
    standin.hold("2")
    await run.post(0)
    await first.wait_message("executing", node="2")
    await first.close()
    await standin.wait_for(lambda: client_id not in standin.client_ids)
    standin.hold("4")
    await standin.wait_for(lambda: standin.held == (run.ids[0], "4"))
    second = await run.socket(client_id)
    await second.wait_message("executing", node="4")
    standin.release()
    await run.settle(second)
    run.check(first, "ws1")
    run.check(second, "ws2(same clientId)")
    assert_history_matches(run, 0, await run.history(0))


async def test_s11_queue_clear(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s11")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(29)
    standin.hold("2")
    await run.post(0)
    await standin.wait_for(lambda: standin.held == (run.ids[0], "2"))
    await run.post(1)
    await run.post(2)
    assert await request(session, "POST", standin.url + "/queue", {"clear": True}) == (200, "")
    _, queue = await request(session, "GET", standin.url + "/queue")
    assert ([i[1] for i in queue["queue_running"]], queue["queue_pending"]) == ([run.ids[0]], [])
    standin.release()
    await run.settle(ws)
    run.check(ws, "ws")
    assert await request(session, "GET", f"{standin.url}/history/{run.ids[1]}") == (200, {})


async def test_s14_client_prompt_id_extra_data_and_reuse(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    run = Run(standin, session, "s14")
    ws = await run.socket(run.trace["client_id"])
    await run.advance_counter(37)
    first = await run.post(0)
    assert first["prompt_id"] == run.posts[0]["request_json"]["prompt_id"]  # used verbatim
    await standin.idle()
    _, queue_less = await request(session, "GET", f"{standin.url}/history/{first['prompt_id']}")
    assert queue_less[first["prompt_id"]]["prompt"][3] == {"job": "test-123", "extra_pnginfo": {"workflow": {"note": "hi"}},
                                                            "client_id": run.trace["client_id"]}  # fmt: skip
    with Image.open(standin.output_dir / "peer_quick_00001_.png") as img:
        assert sorted(img.text) == ["prompt", "workflow"] and json.loads(img.text["workflow"]) == {"note": "hi"}
    await run.post(1)  # the same prompt_id again: history entry overwritten
    await run.settle(ws)
    assert_history_matches(run, 1, await run.history(1))
    _, latest = await request(session, "GET", standin.url + "/history?max_items=1")
    assert list(latest) == [first["prompt_id"]]


async def test_s15_endpoints(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    trace = load_trace("s15")
    recorded = {e["path"]: e for e in trace["events"] if e["kind"] == "http" and e["method"] == "GET"}
    url = standin.url
    for path in ("/features", "/models", "/models/checkpoints", "/embeddings", "/object_info/SaveImage",
                 "/object_info/EmptyImage", "/object_info/NoSuchNode", "/prompt", "/queue"):  # fmt: skip
        assert await request(session, "GET", url + path) == (200, recorded[path]["body_json"]), path
        assert await request(session, "GET", url + "/api" + path) == (200, recorded[path]["body_json"]), path
    _, stats = await request(session, "GET", url + "/system_stats")
    expected = recorded["/system_stats"]["body_json"]
    assert stats.keys() == expected.keys() and stats["system"].keys() == expected["system"].keys()
    assert stats["devices"][0].keys() == expected["devices"][0].keys() and stats["devices"][0]["type"] == "cpu"
    assert await request(session, "GET", url + "/models/no_such_folder") == (404, "")
    _, folders = await request(session, "GET", url + "/experiment/models")
    assert [f["name"] for f in folders] == [f["name"] for f in recorded["/experiment/models"]["body_json"]]
    (standin.models_dir / "checkpoints" / "sd").mkdir(parents=True)
    (standin.models_dir / "checkpoints" / "sd" / "model.safetensors").write_bytes(b"x")
    assert await request(session, "GET", url + "/models/checkpoints") == (200, ["sd/model.safetensors"])
    _, catalogue = await request(session, "GET", url + "/object_info")
    real = json.loads((Path(__file__).parent / "comfyui_standin" / "object_info.json").read_text())
    assert {k: v for k, v in catalogue.items() if k in real and k != "LoadImage"} == {
        k: v for k, v in real.items() if k != "LoadImage"
    }
    assert {"StandInRaise", "StandInSleep"} <= catalogue.keys()
    for path, status in (("nope.png&type=output", 404), ("../../etc/passwd&type=output", 400),
                         ("x.png&type=bogus", 400), ("x.png&type=output&subfolder=../..", 403)):  # fmt: skip
        assert await request(session, "GET", f"{url}/view?filename={path}") == (status, "")

    png = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(png, format="PNG")
    for subfolder in ("", "jobs/x"):
        form = aiohttp.FormData()
        form.add_field("image", png.getvalue(), filename="peer_upload.png", content_type="image/png")
        form.add_field("overwrite", "true")
        form.add_field("subfolder", subfolder)
        async with session.post(url + "/upload/image", data=form) as response:
            assert await response.json() == {"name": "peer_upload.png", "subfolder": subfolder, "type": "input"}
    _, listed = await request(session, "GET", url + "/object_info/LoadImage")
    assert listed["LoadImage"]["input"]["required"]["image"][0] == ["peer_upload.png"]

    run = Run(standin, session, "s15")
    ws_open = next(e for e in run.trace["events"] if e["kind"] == "ws_open")
    ws = await run.socket(ws_open["url"].split("clientId=")[1])
    await run.advance_counter(39)
    await run.post(0)
    await run.settle(ws)
    run.check(ws, "ws")
    assert_history_matches(run, 0, await run.history(0))
    async with session.get(f"{url}/view?filename=peer_loaded_00001_.png&subfolder=jobs&type=output") as response:
        with Image.open(io.BytesIO(await response.read())) as img:
            assert img.size == (32, 24)

    assert await request(session, "POST", url + "/free", {"unload_models": True, "free_memory": True}) == (200, "")
    assert standin.free_calls == [{"unload_models": True, "free_memory": True}]
    assert await request(session, "POST", url + "/history", {"delete": [run.ids[0]]}) == (200, "")
    assert await request(session, "GET", f"{url}/history/{run.ids[0]}") == (200, {})
    async with session.get(url + "/prompt", headers={"Origin": "http://evil.example:8080"}) as response:
        assert response.status == 403


# -- behaviour the brief asks for beyond single traces ---------------------------------------
QUICK = load_trace("s01")["workflow"]


def quick(color: int, prefix: str = "peer_quick") -> dict[str, Any]:
    prompt = copy.deepcopy(QUICK)
    prompt["1"]["inputs"]["color"] = color
    prompt["3"]["inputs"]["filename_prefix"] = prefix
    return prompt


async def test_history_lags_the_socket(comfy_standin_factory: Any, session: aiohttp.ClientSession) -> None:
    standin = await comfy_standin_factory(history_lag=0.3)
    ws = await WsClient(session, standin.ws_url, "lag").connect()
    _, answer = await request(session, "POST", standin.url + "/prompt", {"prompt": quick(1), "client_id": "lag"})
    pid = answer["prompt_id"]
    await ws.wait_message("execution_success", prompt_id=pid)
    assert await request(session, "GET", f"{standin.url}/history/{pid}") == (200, {})
    await ws.wait_message("executing", node=None, prompt_id=pid)
    _, entry = await request(session, "GET", f"{standin.url}/history/{pid}")
    assert entry[pid]["status"]["status_str"] == "success"
    await ws.close()


async def test_restart_keeps_files_and_counters_only(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    await request(session, "POST", standin.url + "/prompt", {"prompt": quick(1)})
    preview = {"1": QUICK["1"], "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    await request(session, "POST", standin.url + "/prompt", {"prompt": preview})
    await standin.idle()
    assert len(list(standin.temp_dir.iterdir())) == 1
    await standin.restart()
    assert list(standin.temp_dir.iterdir()) == []
    _, answer = await request(session, "POST", standin.url + "/prompt", {"prompt": quick(1)})  # same prompt: cache gone too
    assert answer["number"] == 0
    await standin.idle()
    assert sorted(p.name for p in standin.output_dir.iterdir()) == ["peer_quick_00001_.png", "peer_quick_00002_.png"]
    assert len(standin.posted) == 3 and len(standin.executed_prompt_ids) == 3


async def test_partial_cache_reruns_only_changed_nodes(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    ws = await WsClient(session, standin.ws_url, "cache").connect()
    for prefix in ("first", "second"):
        await request(session, "POST", standin.url + "/prompt", {"prompt": quick(7, prefix), "client_id": "cache"})
    await standin.idle()
    await ws.barrier()
    second = [m for m in ws.texts() if m["data"].get("prompt_id") == standin.executed_prompt_ids[1]]
    assert second[1]["data"]["nodes"] == ["1", "2"]  # execution_cached
    assert [m["data"]["node"] for m in second if m["type"] == "executing"] == ["3", None]
    states = [m["data"]["nodes"] for m in second if m["type"] == "progress_state"]
    assert list(states[-1]) == ["3"]
    await ws.close()


async def test_test_nodes_oom_error_and_progress_interrupt(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    ws = await WsClient(session, standin.ws_url, "t").connect()
    oom = {"1": QUICK["1"], "2": {"class_type": "StandInRaise", "inputs": {
        "exception_type": "torch.OutOfMemoryError", "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB",
        "image": ["1", 0]}}}  # fmt: skip
    _, answer = await request(session, "POST", standin.url + "/prompt", {"prompt": oom, "client_id": "t"})
    error = await ws.wait_message("execution_error", prompt_id=answer["prompt_id"])
    assert error["data"]["exception_type"] == "torch.OutOfMemoryError" and error["data"]["node_id"] == "2"
    assert error["data"]["exception_message"].startswith("CUDA out of memory. Tried to allocate 2.00 GiB\nThis error means")
    sleep = {"1": {"class_type": "StandInSleep", "inputs": {"seconds": 0.0, "steps": 3}}}
    standin.hold("1")
    _, answer = await request(session, "POST", standin.url + "/prompt", {"prompt": sleep, "client_id": "t"})
    await standin.wait_for(lambda: standin.held is not None)
    await request(session, "POST", standin.url + "/interrupt", {"prompt_id": answer["prompt_id"]})
    standin.release()
    stopped = await ws.wait_message("execution_interrupted", prompt_id=answer["prompt_id"])
    assert stopped["data"]["node_id"] == "1"  # inside a ProgressBar update: the current node
    _, answer = await request(session, "POST", standin.url + "/prompt", {"prompt": sleep, "client_id": "t"})
    await ws.wait_message("execution_success", prompt_id=answer["prompt_id"])
    progress = [m["data"]["value"] for m in ws.texts() if m["type"] == "progress" and m["data"]["prompt_id"] == answer["prompt_id"]]
    assert progress == [1, 2, 3]
    await ws.close()


async def test_silent_keeps_socket_open_and_keeps_working(standin: StandInComfyUI, session: aiohttp.ClientSession) -> None:
    ws = await WsClient(session, standin.ws_url, "s").connect()
    await ws.wait_message("status")
    standin.set_silent(True)
    _, answer = await request(session, "POST", standin.url + "/prompt", {"prompt": quick(3), "client_id": "s"})
    await standin.idle()
    await ws.barrier()
    assert len(ws.frames) == 1 and not ws.closed.is_set()
    _, entry = await request(session, "GET", f"{standin.url}/history/{answer['prompt_id']}")
    assert entry[answer["prompt_id"]]["status"]["completed"] is True
    standin.set_silent(False)
    await ws.close()
