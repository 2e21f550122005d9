"""``WS /v1/comfyui/stream``: the seed's client messages (subscribe, unsubscribe, ping) and server events.

A client with no subscription receives every workflow event; ``subscribe`` narrows it to the listed
workflows and first sends each one's current state, so an end that happened before the subscription is
not missed. Bad client messages get an ``error`` message, not a disconnect.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import structlog
from aiohttp import WSMsgType, web

from comfyd import events
from comfyd.actors.broadcaster import StreamClient
from comfyd.store.jobs import JobRecord
from comfyd.web.keys import SERVICE

log = structlog.get_logger("comfyd.stream")
routes = web.RouteTableDef()
TOPICS = frozenset({"backend", "gpu"})


class ClientMessage(msgspec.Struct, kw_only=True):
    type: str
    workflowId: str | None = None  # noqa: N815
    workflowIds: list[str] | None = None  # noqa: N815
    topics: list[str] | None = None


_decode = msgspec.json.Decoder(ClientMessage)
_encode = msgspec.json.Encoder()


@routes.get("/v1/comfyui/stream")
async def stream(request: web.Request) -> web.WebSocketResponse:
    service = request.app[SERVICE]
    # No permessage-deflate: compressing every event once per client costs more than the whole fan-out.
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024, compress=False)
    await ws.prepare(request)
    client = StreamClient(ws, queue_size=service.stream_queue_size, max_backlog=service.stream_max_backlog)
    service.broadcaster.register(client)
    writer = asyncio.create_task(client.write_loop(), name="stream:writer")
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await _on_message(service, client, message.data)
            elif message.type == WSMsgType.BINARY:
                _reply(client, {"type": "error", "message": "send JSON text messages"})
    finally:
        service.broadcaster.unregister(client)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    return ws


def _reply(client: StreamClient, payload: dict[str, Any]) -> None:
    if not client.offer(_encode.encode(payload)):
        log.warning("ws_reply_dropped", type=payload.get("type"))


async def _on_message(service: Any, client: StreamClient, text: str) -> None:
    try:
        message = _decode.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _reply(client, {"type": "error", "message": f"bad message: {exc}"})
        return
    ids = [*(message.workflowIds or []), *([message.workflowId] if message.workflowId else [])]
    match message.type:
        case "ping":
            _reply(client, {"type": "pong", "timestamp": events.now_ms()})
        case "subscribe":
            if not ids and not message.topics:
                _reply(client, {"type": "error", "message": "subscribe needs workflowId (or topics)"})
                return
            unknown = set(message.topics or []) - TOPICS
            if unknown:
                _reply(client, {"type": "error", "message": f"unknown topics {sorted(unknown)}; one of "
                                                            f"{sorted(TOPICS)}"})
                return
            client.topics.update(message.topics or [])
            client.subscriptions.update(ids)
            client.narrowed = client.narrowed or bool(ids)
            for workflow_id in ids:
                job = await service.jobs.get(workflow_id)
                if job is None:
                    client.subscriptions.discard(workflow_id)
                    _reply(client, {"type": "error", "workflowId": workflow_id,
                                    "message": f"Workflow {workflow_id} not found"})
                else:
                    client.offer(events.encoder.encode(await current_state(service, job)))
        case "unsubscribe":
            client.subscriptions.difference_update(ids)
            client.topics.difference_update(message.topics or [])
        case _:
            _reply(client, {"type": "error", "message": f"unknown message type {message.type!r}; "
                                                        "expected subscribe, unsubscribe or ping"})


async def current_state(service: Any, job: JobRecord) -> events.WorkflowEvent:
    now = events.now_ms()
    if job.status == "completed":
        return events.WorkflowCompleted(workflowId=job.id, timestamp=job.completed_at or now,
                                        outputs=[events.output_view(o) for o in job.outputs])
    if job.status == "failed":
        return events.WorkflowError(workflowId=job.id, timestamp=job.completed_at or now, error=job.error or "",
                                    errorType=job.error_type or "internal", errorDetail=job.error_detail)
    if job.status == "cancelled":
        return events.WorkflowCancelled(workflowId=job.id, timestamp=job.completed_at or now)
    if job.status == "running":
        return events.WorkflowProgress(workflowId=job.id, timestamp=now, progress=job.progress,
                                       currentNode=job.current_node)
    position = await service.scheduler.ask_position(job.id)
    return events.WorkflowQueued(workflowId=job.id, timestamp=now, queuePosition=position or 0,
                                 priority=job.priority, gpu=job.pool)
