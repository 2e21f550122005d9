"""The stream under load: 200 clients, one of which never reads, through a 50-job run."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import API_KEY, Comfyd

JOBS = int(os.environ.get("FANOUT_JOBS", 50))
CLIENTS = int(os.environ.get("FANOUT_CLIENTS", 200))


def progress_job(n: int) -> dict:
    return {"1": {"class_type": "StandInSleep", "inputs": {"seconds": 0.0, "steps": 20 + n % 3}}}


async def _stuck_client(url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads (tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /v1/comfyui/stream HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"X-API-Key: {API_KEY}\r\n\r\n")
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_200_clients_one_stuck_all_others_get_everything_in_order(comfyd: Comfyd) -> None:
    comfyd.service.stream_queue_size = 256
    comfyd.service.stream_max_backlog = 64 * 1024  # a client 64 KiB behind is too slow
    session = aiohttp.ClientSession(headers={"X-API-Key": API_KEY}, connector=aiohttp.TCPConnector(limit=0))
    stuck = await _stuck_client(comfyd.url)
    sockets = [await session.ws_connect(comfyd.url + "/v1/comfyui/stream") for _ in range(CLIENTS - 1)]
    broadcaster = comfyd.service.broadcaster
    assert len(broadcaster.clients) == CLIENTS
    received: list[list[tuple[str, str, float | None]]] = [[] for _ in sockets]
    completed = [0] * len(sockets)
    all_done = asyncio.Event()

    async def read(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            event = json.loads(message.data)
            received[index].append((event["workflowId"], event["type"], event.get("progress")))
            if event["type"] == "workflow:completed":
                completed[index] += 1
                if all(c == JOBS for c in completed):
                    all_done.set()

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
    try:
        ids = [await comfyd.submit(progress_job(n)) for n in range(JOBS)]
        try:
            await asyncio.wait_for(all_done.wait(), 50)
        except asyncio.TimeoutError:
            raise AssertionError(f"completed per client: {sorted(set(completed))}, clients {len(broadcaster.clients)}, "
                                 f"events seen by first: {len(received[0])}, snapshot "
                                 f"{await comfyd.service.ask_snapshot()}") from None
        reference = received[0]
        assert all(r == reference for r in received), "every reading client sees the same events in the same order"
        for workflow_id in ids:
            mine = [(t, p) for w, t, p in reference if w == workflow_id]
            types = [t for t, _ in mine]
            assert types[0] == "workflow:queued" and types[1] == "workflow:started"
            assert types[-1] == "workflow:completed" and types.count("workflow:completed") == 1
            progress = [p for t, p in mine if t == "workflow:progress"]
            assert progress == sorted(progress) and len(progress) >= 10
        # the stuck client was dropped, and only it; nothing grew without bound for it
        assert len(broadcaster.clients) == CLIENTS - 1
        assert all(c.queue.qsize() <= c.queue.maxsize for c in broadcaster.clients)
        status, text = await comfyd.request("GET", "/metrics")
        values = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
        assert values["comfyd_ws_slow_clients_dropped_total"] == 1
        assert values["comfyd_ws_clients"] == CLIENTS - 1
    finally:
        stuck.close()
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
        await session.close()
