"""Run comfyd in-process on a real loopback port, and talk to it as a client would (HTTP + WebSocket)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from comfyd.config import BackendConfig, Config, load_config
from comfyd.service import Service
from comfyd.web.app import create_app

WORKFLOWS = Path(__file__).parent / "workflows"
API_KEY = "test-key"
TERMINAL = ("workflow:completed", "workflow:error", "workflow:cancelled")


def workflow(name: str, **changes: Any) -> dict[str, Any]:
    """A recorded workflow; ``changes={"1.color": 5}`` sets inputs (to defeat ComfyUI's cache)."""
    graph = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for key, value in changes.items():
        node, name_ = key.split(".", 1)
        graph[node]["inputs"][name_] = value
    return graph


def make_config(tmp: Path, backends: list[str], **scheduler: Any) -> Config:
    config = load_config(None, env={"MANAGEMENT_API_KEY": API_KEY}, overrides={"data_dir": str(tmp / "data")})
    config.backends = [BackendConfig(url=url, name=f"gpu{i}", gpu=i, silence_seconds=scheduler.pop("silence", 30.0))
                       for i, url in enumerate(backends)]
    config.scheduler.progress_interval = 0.0  # every progress change: tests follow a job's nodes one by one
    for key, value in scheduler.items():
        setattr(config.scheduler, key, value)
    return config


class Comfyd:
    """A running comfyd: its service, its URL, and a client session with the API key."""

    def __init__(self, config: Config, **service_options: Any) -> None:
        self.config = config
        self.service_options = service_options
        self.service: Service | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> Comfyd:
        self.service = Service(self.config, **{"reconnect_min": 0.05, "cancel_wait": 10.0, **self.service_options})
        await self.service.start()
        self.runner = web.AppRunner(create_app(self.service), handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession(headers={"X-API-Key": API_KEY})
        return self

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.service is not None:
            await self.service.broadcaster.stop(5)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.service is not None:
            await self.service.stop()

    # -- REST ---------------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.url + path, **kw) as response:
            body = await response.read()
            try:
                return response.status, json.loads(body) if body else None
            except ValueError:
                return response.status, body

    async def submit(self, graph: dict[str, Any], **fields: Any) -> str:
        status, body = await self.request("POST", "/v1/comfyui/workflow", json={"workflow": graph, **fields})
        assert status == 202, body
        return body["workflowId"]

    async def get(self, workflow_id: str) -> dict[str, Any]:
        status, body = await self.request("GET", f"/v1/comfyui/workflow/{workflow_id}")
        assert status == 200, body
        return body

    # -- WebSocket ----------------------------------------------------------------------------------------
    def stream(self) -> Any:
        assert self.http is not None
        return self.http.ws_connect(self.url + "/v1/comfyui/stream")

    async def wait_end(self, workflow_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """Subscribe and await the workflow's terminal event (its current state comes first)."""
        async with self.stream() as ws:
            await ws.send_json({"type": "subscribe", "workflowId": workflow_id})
            async with asyncio.timeout(timeout):
                async for message in ws:
                    event = json.loads(message.data)
                    if event.get("workflowId") == workflow_id and event["type"] in TERMINAL:
                        return event
        raise AssertionError(f"stream closed before {workflow_id} ended")

    async def wait_status(self, workflow_id: str, statuses: tuple[str, ...], timeout: float = 15.0) -> dict[str, Any]:
        """Await, via the stream, until the workflow reaches one of ``statuses``."""
        wanted = {"running": ("workflow:started", "workflow:progress"), "queued": ("workflow:queued",)}
        types = {t for s in statuses for t in wanted.get(s, ())}
        async with self.stream() as ws:
            await ws.send_json({"type": "subscribe", "workflowId": workflow_id})
            async with asyncio.timeout(timeout):
                async for message in ws:
                    event = json.loads(message.data)
                    if event.get("workflowId") != workflow_id:
                        continue
                    if event["type"] in types or event["type"] in TERMINAL:
                        return await self.get(workflow_id)
        raise AssertionError("stream closed")


async def until(predicate: Callable[[], Any], timeout: float = 10.0, *, event: asyncio.Event | None = None) -> None:
    """Await a condition without sleeping blindly: re-check it on every loop turn (or when ``event`` fires)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            if event is not None:
                await event.wait()
                event.clear()
            else:
                await asyncio.sleep(0)
