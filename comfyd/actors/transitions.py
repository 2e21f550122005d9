"""Recording job transitions for the scheduler: commit first, then publish, count and log, in commit order.

A ``Recorder`` is the scheduler's collaborator (it runs inside the scheduler's task, it is not an actor):
each method queues the transition's statements on the group commit and returns the commit future; the
event, the metrics and the one log line per transition follow only once the commit succeeded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from comfyd import events
from comfyd.messages import JobError, JobFinished
from comfyd.metrics import Metrics
from comfyd.store.db import now_ms
from comfyd.store.jobs import JobStore

log = structlog.get_logger("comfyd.scheduler")


class Recorder:
    def __init__(self, jobs: JobStore, publish: Callable[[events.WorkflowEvent], None], metrics: Metrics) -> None:
        self.jobs = jobs
        self.publish = publish
        self.metrics = metrics
        self._totals: dict[str, Any] = {}  # workflow_total's child per status (labels() takes a lock each call)

    def count(self, status: str) -> None:
        if (child := self._totals.get(status)) is None:
            child = self._totals[status] = self.metrics.workflow_total.labels(status=status)
        child.inc()

    def announce(self, done: asyncio.Future[None], event: events.WorkflowEvent, *, status: str,
                 **fields: Any) -> None:
        """Publish and count a transition once it is committed, in commit order."""

        def after_commit(future: asyncio.Future[None]) -> None:
            if future.cancelled() or future.exception() is not None:
                log.error("workflow_state_not_stored", status=status, error=repr(future.exception()), **fields)
                return
            if status != "requeued":
                self.count(status)
            log.info(f"workflow_{status}", **{k: v for k, v in fields.items() if v is not None})
            self.publish(event)

        done.add_done_callback(after_commit)

    def cancelled(self, workflow_id: str) -> asyncio.Future[None]:
        done = self.jobs.db.write([self.jobs.finish(workflow_id, status="cancelled", completed_at=now_ms())])
        self.announce(done, events.WorkflowCancelled(workflowId=workflow_id, timestamp=events.now_ms()),
                      status="cancelled", workflow_id=workflow_id)
        return done

    def started(self, workflow_id: str, backend: str, started_at: int) -> None:
        done = self.jobs.update(workflow_id, status="running", started_at=started_at, backend=backend)
        self.announce(done, events.WorkflowStarted(workflowId=workflow_id, timestamp=started_at, backend=backend),
                      status="started", workflow_id=workflow_id, backend=backend)

    def progress(self, workflow_id: str, progress: float, current_node: str | None) -> None:
        done = self.jobs.update(workflow_id, progress=progress, current_node=current_node)
        event = events.WorkflowProgress(workflowId=workflow_id, timestamp=events.now_ms(), progress=progress,
                                        currentNode=current_node)
        # Published after its commit like every transition, so it can never overtake workflow:started.
        done.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self.publish(event))

    def finished(self, msg: JobFinished, *, pool: str, started_at: int | None) -> asyncio.Future[None]:
        completed_at = now_ms()
        statements = [self.jobs.finish(msg.workflow_id, status=msg.status, completed_at=completed_at,
                                       outputs=msg.outputs, error=msg.error, current_node=msg.current_node,
                                       progress=100.0 if msg.status == "completed" else msg.progress)]
        statements += output_rows(msg, completed_at)
        done = self.jobs.db.write(statements)
        event: events.WorkflowEvent
        if msg.status == "completed":
            event = events.WorkflowCompleted(workflowId=msg.workflow_id, timestamp=completed_at,
                                             outputs=[events.output_view(o) for o in msg.outputs])
            if started_at is not None:
                self.metrics.workflow_duration.labels(gpu_type=pool).observe(max(0, completed_at - started_at) / 1000)
        elif msg.status == "cancelled":
            event = events.WorkflowCancelled(workflowId=msg.workflow_id, timestamp=completed_at)
        else:
            error = msg.error or JobError(error_type="internal", message="the job failed")
            event = events.error_event(msg.workflow_id, error)
            self.metrics.workflow_errors.labels(error_type=error.error_type).inc()
        self.announce(done, event, status=msg.status, workflow_id=msg.workflow_id, backend=msg.backend,
                      error_type=msg.error.error_type if msg.error else None)
        return done

    def failed(self, workflow_id: str, error: JobError) -> None:
        """A job that never ran fails (no backend of its pool came up)."""
        done = self.jobs.db.write([self.jobs.finish(workflow_id, status="failed", completed_at=now_ms(),
                                                    error=error)])
        self.metrics.workflow_errors.labels(error_type=error.error_type).inc()
        self.announce(done, events.error_event(workflow_id, error), status="failed", workflow_id=workflow_id,
                      error_type=error.error_type)

    def requeued(self, workflow_id: str, *, backend: str, reason: str, attempt: int) -> None:
        done = self.jobs.update(workflow_id, status="queued", backend=None, progress=0.0, current_node=None,
                                started_at=None)
        self.announce(done, events.WorkflowRequeued(workflowId=workflow_id, timestamp=events.now_ms(),
                                                    reason=reason, attempt=attempt),
                      status="requeued", workflow_id=workflow_id, backend=backend, reason=reason)


def output_rows(msg: JobFinished, created_at: int) -> list[tuple[str, tuple[Any, ...]]]:
    return [(
        "INSERT INTO outputs (path, workflow_id, filename, subfolder, folder_type, kind, format, size, sha256, "
        "width, height, node_id, backend, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT(path) DO UPDATE SET workflow_id = excluded.workflow_id, size = excluded.size, "
        "sha256 = excluded.sha256, created_at = excluded.created_at",
        (o.relpath, msg.workflow_id, o.filename, o.subfolder, o.folder_type, o.kind or "other", o.format or "",
         o.size or 0, o.sha256, o.width, o.height, o.node_id, msg.backend, created_at),
    ) for o in msg.outputs if o.size is not None]
