"""The HTTP edge of a real comfyd on a loopback port, with a backend nobody listens on: auth, refusals and their
bodies, the queue as clients see it, idempotency, cancel, and the output download (including path traversal)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from comfyd.store.outputs import encode_cursor
from tests.harness import API_KEY, Comfyd, make_config, workflow

DOWN = "http://127.0.0.1:9"  # the discard port: nothing answers there
BODY_LIMIT = 16 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
SECRET = b"TOP-SECRET-do-not-serve-0123456789"


@pytest.fixture
async def comfyd(tmp_path: Path) -> AsyncIterator[Comfyd]:
    config = make_config(tmp_path, [DOWN])
    config.server.max_body_bytes = BODY_LIMIT
    running = await Comfyd(config).start()  # starts although its only backend is down
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def anonymous() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def metric(comfyd: Comfyd, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(comfyd.url + "/metrics") as response:
        assert response.status == 200  # /metrics needs no key
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def assert_error_body(body: Any, status_reason: str) -> None:
    assert isinstance(body, dict), body
    assert body["error"] == status_reason
    assert isinstance(body["message"], str) and body["message"]


# -- open routes and auth ------------------------------------------------------------------------------------
async def test_root_and_health_need_no_key(comfyd: Comfyd, anonymous: aiohttp.ClientSession) -> None:
    async with anonymous.get(comfyd.url + "/") as response:
        assert response.status == 200
        index = await response.json()
    assert index["name"] == "comfyd"
    assert index["endpoints"]["comfyui"]["submitWorkflow"] == "POST /v1/comfyui/workflow"
    async with anonymous.get(comfyd.url + "/health") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "degraded"  # the service runs; its only backend does not
    assert (health["backends"], health["backendsUp"], health["queued"]) == (1, 0, 0)


async def test_metrics_need_no_key(comfyd: Comfyd, anonymous: aiohttp.ClientSession) -> None:
    async with anonymous.get(comfyd.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    for name in ("comfyui_workflow_total", "comfyui_workflow_duration_seconds", "comfyui_workflow_errors_total",
                 "comfyui_queue_length"):
        assert f"# TYPE {name}" in text


PROTECTED = [
    ("POST", "/v1/comfyui/workflow"),
    ("GET", "/v1/comfyui/workflow/00000000-0000-0000-0000-000000000000"),
    ("DELETE", "/v1/comfyui/workflow/00000000-0000-0000-0000-000000000000"),
    ("GET", "/v1/comfyui/models"),
    ("GET", "/v1/comfyui/models?type=checkpoints"),
    ("GET", "/v1/comfyui/outputs"),
    ("GET", "/v1/comfyui/output/image.png"),
    ("GET", "/v1/comfyui/backends"),
    ("GET", "/v1/comfyui/stream"),
    ("POST", "/v1/services/register"),
    ("GET", "/v1/no/such/route"),
]


@pytest.mark.parametrize("key", [None, "wrong-key", "", API_KEY + "x", API_KEY[:-1]])
async def test_every_v1_route_needs_the_key(comfyd: Comfyd, anonymous: aiohttp.ClientSession,
                                            key: str | None) -> None:
    headers = {} if key is None else {"X-API-Key": key}
    for method, path in PROTECTED:
        async with anonymous.request(method, comfyd.url + path, headers=headers,
                                     json={"workflow": workflow("quick")}) as response:
            assert response.status == 401, (method, path, key)
            assert response.content_type == "application/json", (method, path)
            body = await response.json()
        assert_error_body(body, "Unauthorized")
        assert ("missing" in body["message"]) == (key is None), body
    # Nothing was submitted by any of those.
    assert await metric(comfyd, 'comfyui_workflow_total{status="queued"}') == 0.0


async def test_the_stream_refuses_a_wrong_key_in_the_query(comfyd: Comfyd, anonymous: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as error:
        await anonymous.ws_connect(comfyd.url + "/v1/comfyui/stream?apiKey=wrong")
    assert error.value.status == 401
    async with anonymous.ws_connect(comfyd.url + f"/v1/comfyui/stream?apiKey={API_KEY}") as ws:
        await ws.send_json({"type": "ping"})
        assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "pong"


async def test_the_right_key_opens_the_v1_routes(comfyd: Comfyd) -> None:
    for path in ("/v1/comfyui/models", "/v1/comfyui/outputs", "/v1/comfyui/backends"):
        status, body = await comfyd.request("GET", path)
        assert status == 200, (path, body)
    status, body = await comfyd.request("GET", "/v1/comfyui/backends")
    assert [b.get("name") for b in body["backends"]] == ["gpu0"]


# -- refusals ------------------------------------------------------------------------------------------------
SUBMIT = "/v1/comfyui/workflow"
BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    # (description, request kwargs, field named in the 400)
    ("not json", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "body"),
    ("empty", {"data": b""}, "body"),
    ("no workflow", {"json": {"priority": "high"}}, "workflow"),
    ("workflow not an object", {"json": {"workflow": [1, 2]}}, "workflow"),
    ("node without class_type", {"json": {"workflow": {"1": {"inputs": {}}}}}, "workflow.1.class_type"),
    ("ui format", {"json": {"workflow": {"nodes": [], "links": []}}}, "workflow"),
    ("bad priority", {"json": {"workflow": workflow("quick"), "priority": "urgent"}}, "priority"),
    ("negative timeout", {"json": {"workflow": workflow("quick"), "timeout": -5}}, "timeout"),
    ("unknown gpu pool", {"json": {"workflow": workflow("quick"), "gpu": "salad"}}, "gpu"),
]


@pytest.mark.parametrize(("what", "kwargs", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_a_bad_body_is_a_400_naming_the_field(comfyd: Comfyd, what: str, kwargs: dict[str, Any],
                                                    field: str) -> None:
    status, body = await comfyd.request("POST", SUBMIT, **kwargs)
    assert status == 400, body
    assert_error_body(body, "Bad Request")
    assert body["field"] == field, body
    if what == "unknown gpu pool":
        assert "salad" in body["message"] and "local" in body["message"]
    if what == "ui format":
        assert "API" in body["message"]


async def test_a_body_over_the_limit_is_a_413(comfyd: Comfyd) -> None:
    big = {"workflow": workflow("quick"), "padding": "x" * (BODY_LIMIT * 4)}
    async with comfyd.http.post(comfyd.url + SUBMIT, json=big) as response:  # type: ignore[union-attr]
        assert response.status == 413
        assert response.content_type == "application/json"
        body = await response.json()
    assert_error_body(body, "Payload Too Large")
    assert str(BODY_LIMIT) in body["message"]


async def test_a_chunked_body_over_the_limit_is_a_413(comfyd: Comfyd) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"workflow": {"1": {"class_type": "X", "inputs": {"pad": "'
        for _ in range(8):
            yield b"x" * BODY_LIMIT
        yield b'"}}}}'

    async with comfyd.http.post(comfyd.url + SUBMIT, data=chunks(),  # type: ignore[union-attr]
                                headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413
        body = await response.json()
    assert_error_body(body, "Payload Too Large")


async def test_nothing_is_queued_for_a_rejected_request(comfyd: Comfyd) -> None:
    for _, kwargs, _ in BAD_BODIES:
        status, _ = await comfyd.request("POST", SUBMIT, **kwargs)
        assert status == 400
    big = {"workflow": workflow("quick"), "padding": "x" * (BODY_LIMIT * 4)}
    status, _ = await comfyd.request("POST", SUBMIT, json=big)
    assert status == 413
    assert await metric(comfyd, 'comfyui_workflow_total{status="queued"}') == 0.0
    assert await metric(comfyd, "comfyui_queue_length") == 0.0
    status, health = await comfyd.request("GET", "/health")
    assert health["queued"] == 0
    assert comfyd.service is not None and await comfyd.service.jobs.recent(10) == []


async def test_bad_query_values_are_400s(comfyd: Comfyd) -> None:
    for path, field in [("/v1/comfyui/outputs?limit=lots", "limit"), ("/v1/comfyui/outputs?limit=0", "limit"),
                        ("/v1/comfyui/outputs?cursor=!!!", "cursor"), ("/v1/comfyui/models?type=salad", "type")]:
        status, body = await comfyd.request("GET", path)
        assert status == 400, (path, body)
        assert body["field"] == field


async def test_a_cursor_with_numbers_sqlite_cannot_hold_is_a_400(comfyd: Comfyd) -> None:
    status, body = await comfyd.request("GET", f"/v1/comfyui/outputs?cursor={encode_cursor(10**30, 1)}")
    assert status == 400, body
    assert body["field"] == "cursor"


# -- the queue -----------------------------------------------------------------------------------------------
async def test_a_valid_submit_is_queued_and_can_be_cancelled_once(comfyd: Comfyd) -> None:
    status, body = await comfyd.request("POST", SUBMIT, json={"workflow": workflow("quick")})
    assert status == 202, body
    assert body["status"] == "queued" and body["queuePosition"] == 0
    workflow_id = body["workflowId"]
    assert re.fullmatch(r"[0-9a-f-]{36}", workflow_id)

    job = await comfyd.get(workflow_id)
    assert job["workflowId"] == workflow_id
    assert job["status"] == "queued"
    assert job["queuePosition"] == 0
    assert (job["progress"], job["startTime"], job["completionTime"], job["outputs"], job["error"]) == (
        0, None, None, [], None)
    assert await metric(comfyd, 'comfyui_workflow_total{status="queued"}') == 1.0

    status, body = await comfyd.request("DELETE", f"{SUBMIT}/{workflow_id}")
    assert (status, body) == (200, {"workflowId": workflow_id, "status": "cancelled"})
    job = await comfyd.get(workflow_id)
    assert job["status"] == "cancelled" and job["completionTime"] is not None

    status, body = await comfyd.request("DELETE", f"{SUBMIT}/{workflow_id}")
    assert status == 409, body
    assert_error_body(body, "Conflict")
    assert body["currentStatus"] == "cancelled"
    assert await metric(comfyd, 'comfyui_workflow_total{status="cancelled"}') == 1.0


async def test_unknown_workflows_are_404(comfyd: Comfyd) -> None:
    status, body = await comfyd.request("GET", f"{SUBMIT}/no-such-workflow")
    assert status == 404
    assert_error_body(body, "Not Found")
    assert "no-such-workflow" in body["message"]
    status, body = await comfyd.request("DELETE", f"{SUBMIT}/no-such-workflow")
    assert status == 404
    assert_error_body(body, "Not Found")


async def test_the_same_idempotency_key_gives_the_same_workflow(comfyd: Comfyd) -> None:
    headers = {"Idempotency-Key": "order-42"}
    status, first = await comfyd.request("POST", SUBMIT, json={"workflow": workflow("quick")}, headers=headers)
    assert status == 202
    async with comfyd.http.post(comfyd.url + SUBMIT, json={"workflow": workflow("quick")},  # type: ignore[union-attr]
                                headers=headers) as response:
        assert response.status == 202
        assert response.headers["Idempotent-Replayed"] == "true"
        second = await response.json()
    assert second["workflowId"] == first["workflowId"]
    assert second["status"] == "queued"
    status, other = await comfyd.request("POST", SUBMIT, json={"workflow": workflow("quick")},
                                         headers={"Idempotency-Key": "order-43"})
    assert other["workflowId"] != first["workflowId"]
    assert comfyd.service is not None
    assert len(await comfyd.service.jobs.recent(10)) == 2
    assert await metric(comfyd, 'comfyui_workflow_total{status="queued"}') == 2.0


async def test_concurrent_submits_with_one_idempotency_key_make_one_job(comfyd: Comfyd) -> None:
    headers = {"Idempotency-Key": "burst"}
    replies = await asyncio.gather(*(comfyd.request("POST", SUBMIT, json={"workflow": workflow("quick")},
                                                    headers=headers) for _ in range(8)))
    assert {status for status, _ in replies} == {202}
    assert len({body["workflowId"] for _, body in replies}) == 1
    assert comfyd.service is not None and len(await comfyd.service.jobs.recent(20)) == 1
    assert await metric(comfyd, 'comfyui_workflow_total{status="queued"}') == 1.0


async def test_queue_positions_follow_priority_then_arrival(comfyd: Comfyd) -> None:
    ids = {}
    for name, priority in [("low", "low"), ("normal-1", "normal"), ("high-1", "high"), ("normal-2", "normal"),
                           ("high-2", "high")]:
        ids[name] = await comfyd.submit(workflow("quick", **{"1.color": len(ids)}), priority=priority)
    positions = {name: (await comfyd.get(workflow_id))["queuePosition"] for name, workflow_id in ids.items()}
    assert positions == {"high-1": 0, "high-2": 1, "normal-1": 2, "normal-2": 3, "low": 4}
    # Cancelling from the middle moves those behind it up.
    status, _ = await comfyd.request("DELETE", f"{SUBMIT}/{ids['high-2']}")
    assert status == 200
    positions = {name: (await comfyd.get(workflow_id)).get("queuePosition") for name, workflow_id in ids.items()}
    assert positions == {"high-1": 0, "high-2": None, "normal-1": 1, "normal-2": 2, "low": 3}
    assert await metric(comfyd, "comfyui_queue_length") == 4.0


# -- output download -----------------------------------------------------------------------------------------
@pytest.fixture
def files(comfyd: Comfyd, tmp_path: Path) -> dict[str, Path]:
    outputs = comfyd.config.outputs_dir
    assert outputs.is_dir()
    (outputs / "sub").mkdir()
    image = outputs / "image.png"
    image.write_bytes(PNG)
    (outputs / "sub" / "nested.png").write_bytes(PNG[::-1])
    secret = comfyd.config.data_dir / "secret.txt"  # beside the outputs folder (and beside the database)
    secret.write_bytes(SECRET)
    (tmp_path / "secret.txt").write_bytes(SECRET)  # two levels up
    (outputs / "link.png").symlink_to(secret)
    (outputs / "linkdir").symlink_to(comfyd.config.data_dir, target_is_directory=True)
    return {"image": image, "secret": secret}


ESCAPES = [
    "../secret.txt",
    "../../secret.txt",
    "%2e%2e/secret.txt",
    "%2E%2E/secret.txt",
    "%2e%2e%2fsecret.txt",
    "%2e%2e%2f%2e%2e%2fsecret.txt",
    "..%2fsecret.txt",
    "..%2Fsecret.txt",
    ".%2e/secret.txt",
    "%2e./secret.txt",
    "%252e%252e%252fsecret.txt",  # double-encoded
    "%25252e%25252e%25252fsecret.txt",  # triple-encoded
    "..%5csecret.txt",
    "%2e%2e%5csecret.txt",
    "..%255csecret.txt",
    "....//secret.txt",
    "...//secret.txt",
    "..;/secret.txt",
    "%2fetc%2fpasswd",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "//etc/passwd",
    "%2f%2e%2e%2fsecret.txt",
    "secret.txt%00.png",
    "%00../secret.txt",
    "..%00/secret.txt",
    "link.png",  # a symlink inside that leads out
    "linkdir/secret.txt",  # a symlinked folder that leads out
    "linkdir/comfyd.db",
    "a/../../secret.txt",
    "sub/../../secret.txt",
    "sub/..%2f..%2fsecret.txt",
    "sub%2f..%2f..%2fsecret.txt",
    "./../secret.txt",
    ".%2f..%2fsecret.txt",
    "%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 dots
    "%c0%ae%c0%ae%c0%afsecret.txt",
    "%e0%80%ae%e0%80%ae/secret.txt",
    "%ef%bc%8e%ef%bc%8e/secret.txt",  # fullwidth full stops
    "%e2%80%a4%e2%80%a4/secret.txt",  # one dot leaders
    "%u002e%u002e/secret.txt",
    "..%c0%afsecret.txt",
    "..%c1%9csecret.txt",
    "../comfyd.db",
    "..%2fcomfyd.db",
    "sub",  # a folder, not a file
    ".",
    "%2e",
    "",
]


async def get_raw(session: aiohttp.ClientSession, base: str, raw_path: str,
                  **kw: Any) -> tuple[int, bytes, CIMultiDict[str]]:
    url = URL(base + "/v1/comfyui/output/" + raw_path, encoded=True)  # sent exactly as written
    async with session.get(url, allow_redirects=False, **kw) as response:
        return response.status, await response.read(), CIMultiDict(response.headers)


async def test_no_encoding_of_a_path_leads_out_of_the_outputs_folder(comfyd: Comfyd, files: dict[str, Path]) -> None:
    assert comfyd.http is not None
    served = []
    for raw in ESCAPES:
        status, body, _ = await get_raw(comfyd.http, comfyd.url, raw)
        if not 400 <= status < 500 or SECRET in body or body.startswith(b"SQLite format 3") or b"root:" in body:
            served.append((raw, status, body[:60]))
    assert served == []


async def test_raw_backslashes_lead_nowhere(comfyd: Comfyd, files: dict[str, Path]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(comfyd.url.rsplit(":", 1)[1]))
    try:
        for raw in ("..\\secret.txt", "sub\\..\\..\\secret.txt", "..\\..\\secret.txt"):
            writer.write(f"GET /v1/comfyui/output/{raw} HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 5)
            status = int(response.split(b" ", 2)[1])
            assert 400 <= status < 500, (raw, response[:200])
            assert SECRET not in response
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", int(comfyd.url.rsplit(":", 1)[1]))
    finally:
        writer.close()


async def test_escapes_are_refused_with_the_usual_error_body(comfyd: Comfyd, files: dict[str, Path]) -> None:
    assert comfyd.http is not None
    for raw in ESCAPES:
        status, body, headers = await get_raw(comfyd.http, comfyd.url, raw)
        assert status in (400, 404), (raw, status)
        assert headers["Content-Type"].startswith("application/json"), (raw, headers["Content-Type"])
        error = json.loads(body)
        assert {"error", "message"} <= error.keys(), (raw, error)
        if status == 400:
            assert error["field"] == "filename", (raw, error)


async def test_a_legitimate_file_is_served(comfyd: Comfyd, files: dict[str, Path]) -> None:
    assert comfyd.http is not None
    status, body, headers = await get_raw(comfyd.http, comfyd.url, "image.png")
    assert status == 200
    assert body == PNG
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, body, headers = await get_raw(comfyd.http, comfyd.url, "sub/nested.png")
    assert (status, body) == (200, PNG[::-1])
    status, body, _ = await get_raw(comfyd.http, comfyd.url, "sub%2fnested.png")
    assert (status, body) == (200, PNG[::-1])


async def test_a_range_request_gets_exactly_those_bytes(comfyd: Comfyd, files: dict[str, Path]) -> None:
    assert comfyd.http is not None
    status, body, headers = await get_raw(comfyd.http, comfyd.url, "image.png", headers={"Range": "bytes=2-5"})
    assert status == 206
    assert body == PNG[2:6]
    assert headers["Content-Range"] == f"bytes 2-5/{len(PNG)}"


async def test_a_matching_etag_is_a_304(comfyd: Comfyd, files: dict[str, Path]) -> None:
    assert comfyd.http is not None
    status, _, headers = await get_raw(comfyd.http, comfyd.url, "image.png")
    etag = headers["ETag"]
    status, body, _ = await get_raw(comfyd.http, comfyd.url, "image.png", headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")
    status, body, _ = await get_raw(comfyd.http, comfyd.url, "image.png", headers={"If-None-Match": '"other"'})
    assert (status, body) == (200, PNG)


async def test_a_missing_output_is_a_json_404(comfyd: Comfyd, files: dict[str, Path]) -> None:
    status, body = await comfyd.request("GET", "/v1/comfyui/output/nope.png")
    assert status == 404
    assert_error_body(body, "Not Found")
