"""The WebSocket events clients receive on ``/v1/comfyui/stream`` (the seed's server messages).

Each carries ``type``, ``workflowId`` and ``timestamp`` (epoch ms). They are encoded once by the
broadcaster and the same bytes go to every client.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import msgspec

from comfyd.messages import JobError, Output

OUTPUT_URL_PREFIX = "/v1/comfyui/output/"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    workflowId: str
    timestamp: int


class WorkflowQueued(Event, frozen=True, tag="workflow:queued"):
    queuePosition: int
    priority: str
    gpu: str


class WorkflowStarted(Event, frozen=True, tag="workflow:started"):
    backend: str


class WorkflowProgress(Event, frozen=True, tag="workflow:progress"):
    progress: float
    currentNode: str | None


class WorkflowCompleted(Event, frozen=True, tag="workflow:completed"):
    outputs: list[dict[str, Any]]


class WorkflowError(Event, frozen=True, tag="workflow:error"):
    error: str
    errorType: str
    errorDetail: dict[str, Any] | None = None


class WorkflowCancelled(Event, frozen=True, tag="workflow:cancelled"):
    pass


class WorkflowRequeued(Event, frozen=True, tag="workflow:requeued"):
    """Extension: the job lost its backend and waits again (attempt counts up)."""

    reason: str
    attempt: int


class BackendEvent(msgspec.Struct, frozen=True, kw_only=True):
    """``backend:up`` / ``backend:down``, for stream clients subscribed to topic ``backend``."""

    type: str
    backend: str
    pool: str
    error: str | None
    timestamp: int


WorkflowEvent = (WorkflowQueued | WorkflowStarted | WorkflowProgress | WorkflowCompleted | WorkflowError
                 | WorkflowCancelled | WorkflowRequeued)

encoder = msgspec.json.Encoder()


def now_ms() -> int:
    return int(time.time() * 1000)


def output_url(output: Output) -> str:
    return OUTPUT_URL_PREFIX + quote(output.relpath)


def output_view(output: Output, workflow_id: str | None = None, created_at: int | None = None) -> dict[str, Any]:
    """An output as clients see it: the seed's ``{filename, type, url}`` plus what the index knows."""
    view: dict[str, Any] = {
        "filename": output.relpath,
        "type": output.kind or "other",
        "format": output.format,
        "size": output.size,
        "url": output_url(output),
        "node": output.node_id,
    }
    if output.sha256:
        view["sha256"] = output.sha256
    if output.width is not None:
        view["width"], view["height"] = output.width, output.height
    if workflow_id is not None:
        view["workflowId"] = workflow_id
    if created_at is not None:
        view["createdAt"] = created_at
    return view


def error_event(workflow_id: str, error: JobError) -> WorkflowError:
    return WorkflowError(workflowId=workflow_id, timestamp=now_ms(), error=error.message,
                         errorType=error.error_type, errorDetail=error.detail)
