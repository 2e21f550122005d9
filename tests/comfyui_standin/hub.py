"""The WebSocket side: the socket table, the ordered outgoing message queue, /ws.

Like the real server, every message is queued and sent by one consumer task, so
the order of messages is the order in which they were emitted. A message for a
client id is looked up in the socket table when it is sent; if no socket has
that id, it is dropped (no replay). ``sid=None`` means broadcast.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
PNG = 2

SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}


def text_frame(event: str, data: Any) -> str:
    # json.dumps defaults: ", " and ": " separators, as aiohttp's send_json.
    return json.dumps({"type": event, "data": data})


def preview_frame(png: bytes) -> bytes:
    return struct.pack(">II", PREVIEW_IMAGE, PNG) + png


def preview_with_metadata_frame(png: bytes, metadata: dict[str, Any]) -> bytes:
    meta = json.dumps(metadata).encode("utf-8")
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + png


def progress_text_frame(node_id: str, text: str) -> bytes:
    node = node_id.encode("utf-8")
    return struct.pack(">II", TEXT, len(node)) + node + text.encode("utf-8")


class Hub:
    def __init__(self, changed: Callable[[], None], queue_info: Callable[[], dict[str, Any]]) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self.silent = False
        self.pending = 0  # emitted but not yet written
        self.connections: set[asyncio.BaseTransport] = set()
        self.handlers = 0  # /ws handlers still running
        # (prompt client_id, current node) of the running prompt, for reconnects
        self.owner: Callable[[], tuple[str | None, str | None]] = lambda: (None, None)
        self._changed = changed
        self._queue_info = queue_info
        self._queue: asyncio.Queue[tuple[str | bytes, str | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    # -- emitting -----------------------------------------------------------------
    def emit(self, event: str, data: Any, sid: str | None = None) -> None:
        """Queue a JSON text message (data is serialised now, so later edits don't leak)."""
        self._put(text_frame(event, data), sid)

    def emit_binary(self, payload: bytes, sid: str | None = None) -> None:
        self._put(payload, sid)

    def _put(self, frame: str | bytes, sid: str | None) -> None:
        self.pending += 1
        self._queue.put_nowait((frame, sid))

    def supports_preview_metadata(self, sid: str | None) -> bool:
        if sid is None:
            return False
        return bool(self.flags.get(sid, {}).get("supports_preview_metadata", False))

    async def flush(self) -> None:
        """Wait until every emitted message was written (or dropped)."""
        await self._queue.join()

    # -- sending ------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="standin-ws-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            frame, sid = await self._queue.get()
            try:
                if not self.silent:
                    if sid is None:
                        targets = list(self.sockets.values())
                    else:
                        ws = self.sockets.get(sid)
                        targets = [ws] if ws is not None else []
                    for ws in targets:
                        await _send(ws, frame)
            finally:
                self.pending -= 1
                self._queue.task_done()
                self._changed()

    # -- /ws ----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()  # no heartbeat: the server never pings
        await ws.prepare(request)
        transport = request.transport
        if transport is not None:
            self.connections.add(transport)
        sid = request.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)  # the newest socket replaces the older one
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.flags[sid] = {}
        self.handlers += 1
        self._changed()
        try:
            if not self.silent:
                await _send(ws, text_frame("status", {"status": self._queue_info(), "sid": sid}))
                client_id, node = self.owner()
                if client_id == sid and node is not None:
                    await _send(ws, text_frame("executing", {"node": node}))
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data", {})
                    self.flags[sid] = flags if isinstance(flags, dict) else {}
                    if not self.silent:
                        await _send(ws, text_frame("feature_flags", SERVER_FEATURES))
                first = False
        finally:
            # Whichever socket closes removes the id, even if a newer one owns it now.
            self.sockets.pop(sid, None)
            self.flags.pop(sid, None)
            if transport is not None:
                self.connections.discard(transport)
            self.handlers -= 1
            self._changed()
        return ws

    def abort_connections(self) -> None:
        """Drop every socket without a close frame (the client sees 1006)."""
        for transport in list(self.connections):
            transport.abort()
        self.connections.clear()


async def _send(ws: web.WebSocketResponse, frame: str | bytes) -> None:
    if ws.closed:
        return
    try:
        if isinstance(frame, str):
            await ws.send_str(frame)
        else:
            await ws.send_bytes(frame)
    except (ConnectionError, RuntimeError):
        pass
