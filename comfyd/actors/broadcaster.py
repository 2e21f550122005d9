"""Fan events out to WebSocket clients, each through its own bounded queue.

An event is encoded once; the same bytes go to every interested client. The broadcaster never awaits a
socket: each client's writer task drains its own queue. A client is closed (1013, "too slow") rather than
allowed to slow the others or the scheduler when its queue is full, or when more than ``max_backlog``
bytes sent to it sit unacknowledged (the kernel's send queue plus the transport's buffer): a reader that
stopped reading is found after a bounded amount of data, whatever the kernel's buffers would absorb.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from comfyd import events
from comfyd.actors.base import Actor
from comfyd.messages import Message
from comfyd.metrics import Metrics

log = structlog.get_logger("comfyd.broadcaster")

TOO_SLOW = 1013  # "try again later": the client fell behind


class Publish(Message, frozen=True):
    event: events.WorkflowEvent


class DropClient(Message, frozen=True):
    """A client's writer found it too far behind."""

    client: object


class PublishRaw(Message, frozen=True):
    """A non-workflow event (backend/gpu) for clients that asked for ``topic``."""

    topic: str
    payload: bytes


@dataclass(eq=False)
class StreamClient:
    ws: web.WebSocketResponse
    queue_size: int = 256
    subscriptions: set[str] = field(default_factory=set)
    narrowed: bool = False  # until its first subscribe a client receives every workflow's events
    topics: set[str] = field(default_factory=set)  # "backend", "gpu"
    max_backlog: int = 4 * 1024 * 1024
    on_lagging: Callable[[StreamClient], None] | None = None
    queue: asyncio.Queue[bytes | None] = field(init=False)
    dropped: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)

    def wants(self, workflow_id: str) -> bool:
        return not self.narrowed or workflow_id in self.subscriptions

    def offer(self, data: bytes) -> bool:
        try:
            self.queue.put_nowait(data)
            return True
        except asyncio.QueueFull:
            return False

    async def write_loop(self) -> None:
        """Send what is queued, in order, until closed."""
        while (data := await self.queue.get()) is not None:
            try:
                await self.ws.send_frame(data, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError):
                return
            if self.backlog() > self.max_backlog:
                if self.on_lagging is not None:
                    self.on_lagging(self)
                return

    def backlog(self) -> int:
        """Bytes written to this client that it has not acknowledged yet."""
        transport = self.ws._req.transport if self.ws._req is not None else None  # noqa: SLF001
        if transport is None:
            return 0
        pending = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return pending


class Broadcaster(Actor[Message]):
    mailbox_size = 10_000

    def __init__(self, metrics: Metrics) -> None:
        super().__init__("broadcaster")
        self.metrics = metrics
        self.clients: set[StreamClient] = set()

    def register(self, client: StreamClient) -> None:
        client.on_lagging = self._lagging
        self.clients.add(client)
        self.metrics.ws_clients.set(len(self.clients))

    def unregister(self, client: StreamClient) -> None:
        self.clients.discard(client)
        self.metrics.ws_clients.set(len(self.clients))

    def _lagging(self, client: StreamClient) -> None:
        try:
            self.tell(DropClient(client=client))
        except Exception:  # stopping: it is closed with everyone else
            pass

    def publish(self, event: events.WorkflowEvent) -> None:
        if not self.clients:
            return  # nobody to tell (a client that connects later asks for the state it missed)
        try:
            self.tell(Publish(event=event))
        except Exception as exc:  # stopping or full: telemetry must never break the caller
            self.metrics.ws_dropped.labels(reason="broadcaster_busy").inc()
            log.warning("event_dropped", workflow_id=event.workflowId, type=type(event).__name__, error=str(exc))

    async def handle(self, message: Message) -> Any:
        match message:
            case Publish():
                data = events.encoder.encode(message.event)
                workflow_id = message.event.workflowId
                for client in list(self.clients):
                    if client.wants(workflow_id) and not client.offer(data):
                        self._drop(client)
            case DropClient():
                if message.client in self.clients:
                    self._drop(message.client)  # type: ignore[arg-type]
            case PublishRaw():
                for client in list(self.clients):
                    if message.topic in client.topics and not client.offer(message.payload):
                        self._drop(client)
            case _:
                raise TypeError(f"broadcaster cannot handle {type(message).__name__}")

    def _drop(self, client: StreamClient) -> None:
        self.unregister(client)
        client.dropped = True
        self.metrics.ws_disconnected_slow.inc()
        self.metrics.ws_dropped.labels(reason="slow_client").inc()
        log.warning("ws_client_too_slow", queued=client.queue.qsize())
        self.spawn(_close(client, TOO_SLOW, b"too slow: client did not keep up with events"))

    async def on_stop(self) -> None:
        for client in list(self.clients):
            await _close(client, WSCloseCode.GOING_AWAY, b"server shutting down")
        self.clients.clear()


async def _close(client: StreamClient, code: int, reason: bytes) -> None:
    try:
        client.queue.put_nowait(None)
    except asyncio.QueueFull:
        pass
    try:
        await asyncio.wait_for(client.ws.close(code=code, message=reason), 5)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        pass
