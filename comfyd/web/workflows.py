"""``/v1/comfyui/workflow``: submit, status, cancel."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import msgspec
from aiohttp import web

from comfyd.actors.pending import rank_for
from comfyd.actors.scheduler_state import CancelOutcome
from comfyd.errors import BadRequest, Conflict, NotFound, Unavailable
from comfyd.events import output_view
from comfyd.ids import uuid7
from comfyd.messages import TERMINAL, CancelJob, Enqueue
from comfyd.store.db import now_ms
from comfyd.store.jobs import JobRecord
from comfyd.web.keys import SERVICE
from comfyd.workflow import decode_submit, prefix_outputs

routes = web.RouteTableDef()
ASK_TIMEOUT = 10.0
_encode = msgspec.json.Encoder()


@routes.post("/v1/comfyui/workflow")
async def submit(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = decode_submit(await request.read())
    if body.gpu not in service.pools():
        raise BadRequest(f"no backend is configured for gpu pool {body.gpu!r}; configured pools: "
                         f"{', '.join(sorted(service.pools())) or 'none'}", field="gpu")
    if not service.accepting:
        raise Unavailable("comfyd is shutting down and takes no new work; retry on restart", retry_after=10)
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        if len(key) > 255:
            raise BadRequest("Idempotency-Key is longer than 255 characters", field="Idempotency-Key")
        if (existing := await service.jobs.by_idempotency_key(key)) is not None:
            return await _accepted(service, existing.id, existing.status, replayed=True)
    service.catalogue_check(body.workflow, body.gpu)
    service.check_capacity()
    workflow_id = uuid7()
    workflow = body.workflow if body.keepPrefix else prefix_outputs(body.workflow, workflow_id)
    created_at = now_ms()
    rank = rank_for(body.priority, created_at, service.config.scheduler.aging_seconds)
    seq = service.next_seq()
    timeout = body.timeout or service.config.scheduler.default_timeout or None
    commit = service.jobs.insert(workflow_id=workflow_id, seq=seq, priority=body.priority, pool=body.gpu, rank=rank,
                                 workflow=_encode.encode(workflow), created_at=created_at, timeout=timeout,
                                 idempotency_key=key)
    try:
        position = await service.intake.admit(
            commit, Enqueue(workflow_id=workflow_id, pool=body.gpu, priority=body.priority, rank=rank, seq=seq))
    except sqlite3.IntegrityError:
        if key is not None and (existing := await service.jobs.by_idempotency_key(key)) is not None:
            return await _accepted(service, existing.id, existing.status, replayed=True)
        raise
    body = _encode.encode({"workflowId": workflow_id, "status": "queued", "queuePosition": position})
    return web.Response(body=body, status=202, content_type="application/json",
                        headers={"Location": f"/v1/comfyui/workflow/{workflow_id}"})


async def _accepted(service: Any, workflow_id: str, status: str, *, replayed: bool) -> web.Response:
    position = await service.scheduler.ask_position(workflow_id)
    return web.json_response({"workflowId": workflow_id, "status": status, "queuePosition": position or 0},
                             status=202, headers={"Idempotent-Replayed": "true" if replayed else "false",
                                                  "Location": f"/v1/comfyui/workflow/{workflow_id}"})


@routes.get("/v1/comfyui/workflow/{workflow_id}")
async def status(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    job = await service.jobs.get(request.match_info["workflow_id"])
    if job is None:
        raise NotFound(f"Workflow {request.match_info['workflow_id']} not found")
    position = await service.scheduler.ask_position(job.id) if job.status == "queued" else None
    return web.json_response(job_view(job, position))


def job_view(job: JobRecord, position: int | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "workflowId": job.id,
        "status": job.status,
        "progress": job.progress,
        "currentNode": job.current_node,
        "startTime": job.started_at,
        "completionTime": job.completed_at,
        "outputs": [output_view(o) for o in job.outputs],
        "error": job.error,
        "errorType": job.error_type,
        "errorDetail": job.error_detail,
        "priority": job.priority,
        "gpu": job.pool,
        "backend": job.backend,
        "attempts": job.attempts,
        "createdAt": job.created_at,
    }
    if position is not None:
        view["queuePosition"] = position
    return view


@routes.delete("/v1/comfyui/workflow/{workflow_id}")
async def cancel(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    workflow_id = request.match_info["workflow_id"]
    reply = service.scheduler.ask(CancelJob(workflow_id=workflow_id), service.cancel_wait + ASK_TIMEOUT)
    try:
        outcome: CancelOutcome = await asyncio.wait_for(reply, service.cancel_wait)
    except TimeoutError:
        return web.json_response({"workflowId": workflow_id, "status": "cancelling",
                                  "message": "ComfyUI has not confirmed the interrupt yet"}, status=202)
    if outcome.status == "cancelled":
        return web.json_response({"workflowId": workflow_id, "status": "cancelled"})
    job = await service.jobs.get(workflow_id)
    if job is None:
        raise NotFound(f"Workflow {workflow_id} not found")
    if job.status in TERMINAL or outcome.status is not None:
        raise Conflict("Workflow cannot be cancelled", currentStatus=outcome.status or job.status)
    raise Conflict("Workflow cannot be cancelled", currentStatus=job.status)
