"""The scheduler owns the queue: which job runs next, on which backend, and every state change after.

It keeps only ids and ranks of waiting jobs in memory (workflow JSON stays in SQLite until dispatch),
hands the next job of a pool to an executor with a free slot, and records each transition through the
store before anyone hears of it: events and metrics follow the commit, never precede it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from comfyd import events
from comfyd.actors.base import Actor
from comfyd.actors.pending import PendingQueue
from comfyd.actors.scheduler_state import (
    ActiveJob,
    Backend,
    CancelOutcome,
    Dispatched,
    Tick,
)
from comfyd.actors.transitions import Recorder
from comfyd.messages import (AddBackend, BackendState, CancelJob, Enqueue, EnqueueMany, Interrupt, JobError,
    JobFinished, JobProgress, JobStarted, Message, QueuePosition, Released, RetireBackend, Returned, Run,
    SchedulerSnapshot, StopIntake, Withdraw)
from comfyd.metrics import Metrics
from comfyd.store.jobs import JobStore

log = structlog.get_logger("comfyd.scheduler")


class Scheduler(Actor[Message]):
    mailbox_size = 10_000

    def __init__(self, jobs: JobStore, publish: Callable[[events.WorkflowEvent], None], metrics: Metrics, *,
                 max_attempts: int = 2, backend_wait: float = 600.0,
                 publish_raw: Callable[[str, bytes], None] | None = None) -> None:
        super().__init__("scheduler")
        self.jobs = jobs
        self.publish = publish
        self.publish_raw = publish_raw  # backend:up / backend:down for stream clients on topic "backend"
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.backend_wait = backend_wait
        self.pool_down_since: dict[str, float] = {}
        self.record = Recorder(jobs, publish, metrics)
        self.pending = PendingQueue()
        self.active: dict[str, ActiveJob] = {}
        self.backends: dict[str, Backend] = {}
        self.intake_open = True
        self.recovered = asyncio.Event()
        self.idle = asyncio.Event()  # set while no job is on a backend (drain waits for it)

    def add_backend(self, name: str, pool: str, capacity: int, executor: Actor[Any]) -> None:
        """Wiring, before start (the composition root) or via ``AddBackend`` at run time."""
        self.backends[name] = Backend(name, pool, capacity, executor)
        self.metrics.backend_up.labels(backend=name, pool=pool).set(0)
        self.metrics.backend_busy.labels(backend=name, pool=pool).set(0)

    # -- recovery ------------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        # Also the path of a restart after a crash: rebuild everything from the store.
        self.pending = PendingQueue()
        self.active.clear()
        for backend in self.backends.values():
            backend.assigned.clear()
        rows = await self.jobs.active()
        reattached = 0
        for row in rows:
            backend = self.backends.get(row["backend"] or "")
            if row["prompt_id"] and backend is not None:
                # It may be inside ComfyUI: the executor reconciles it by prompt_id before taking new work.
                job = ActiveJob(row["id"], row["pool"], row["rank"], row["seq"], backend.name,
                                status="running" if row["status"] == "running" else "dispatching",
                                attempt=row["attempts"], started_at=row["started_at"])
                self.active[job.workflow_id] = job
                backend.assigned.add(job.workflow_id)
                self.spawn(self._prepare(job, reattach=True))
                reattached += 1
            else:
                self.pending.push(row["id"], row["pool"], row["rank"], row["seq"])
        self._update_gauges()
        now = time.monotonic()
        up_pools = {b.pool for b in self.backends.values() if b.up}
        self.pool_down_since = {b.pool: now for b in self.backends.values() if b.pool not in up_pools}
        self.every(max(0.05, min(self.backend_wait / 4, 5.0)), Tick)
        log.info("scheduler_recovered", queued=len(self.pending), reattaching=reattached)
        self.recovered.set()

    # -- messages ------------------------------------------------------------------------------------------
    async def handle(self, message: Message) -> Any:
        match message:
            case Enqueue():
                return self._enqueue((message,))[0]
            case EnqueueMany():
                return self._enqueue(message.jobs)
            case QueuePosition():
                return self.position(message.workflow_id)
            case CancelJob():
                return self._cancel(message.workflow_id)
            case JobStarted():
                self._started(message)
            case JobProgress():
                self._progress(message)
            case JobFinished():
                self._finished(message)
            case Returned():
                self._returned(message)
            case Released():
                if (job := self.active.get(message.workflow_id)) is not None:
                    self._release(job)  # the slot serves the next job while the result is read
            case BackendState():
                self._backend_state(message)
            case Dispatched():
                self._hand_over(message)
            case SchedulerSnapshot():
                return self.snapshot()
            case AddBackend():
                if (known := self.backends.get(message.name)) is not None:
                    known.capacity = message.capacity  # a retired backend that registered again
                else:
                    self.add_backend(message.name, message.pool, message.capacity, message.executor)
                    self.pool_down_since.setdefault(message.pool, time.monotonic())
            case RetireBackend():
                if (backend := self.backends.get(message.name)) is not None:
                    backend.capacity = 0
            case StopIntake():
                self._stop_intake()
            case Tick():
                self._fail_unserved_pools()
            case _:
                raise TypeError(f"scheduler cannot handle {type(message).__name__}")
        self._dispatch()
        return None

    def _enqueue(self, jobs: tuple[Enqueue, ...]) -> list[int]:
        positions = [self._admit(msg) for msg in jobs]
        self._dispatch()
        for msg in jobs:  # a newcomer at the head of its pool may take a waiting prompt's place in ComfyUI
            if msg.workflow_id in self.pending and self.pending.peek(msg.pool) == msg.workflow_id:
                self._outrank(msg.pool, msg.rank)
        return positions

    def _admit(self, msg: Enqueue) -> int:
        if msg.workflow_id in self.pending or msg.workflow_id in self.active:  # a retried Enqueue
            return self.position(msg.workflow_id) or 0
        self.pending.push(msg.workflow_id, msg.pool, msg.rank, msg.seq)
        self.record.count("queued")
        position = self.pending.position(msg.workflow_id) or 0
        self.publish(events.WorkflowQueued(workflowId=msg.workflow_id, timestamp=events.now_ms(),
                                           queuePosition=position, priority=msg.priority, gpu=msg.pool))
        log.info("workflow_queued", workflow_id=msg.workflow_id, pool=msg.pool, priority=msg.priority,
                 position=position)
        return position

    def _stop_intake(self) -> None:
        """Draining: nothing new starts. Prompts still waiting inside ComfyUI are taken back, so they stay
        queued in comfyd (and survive the restart) rather than run while the process is going away."""
        self.intake_open = False
        for job in self.active.values():
            if job.status == "dispatched" and not job.withdrawing:
                job.withdrawing = True
                self.backends[job.backend].executor.tell(Withdraw(workflow_id=job.workflow_id))

    def _outrank(self, pool: str, rank: int) -> None:
        """A more urgent job waits while a less urgent one sits inside ComfyUI's queue: take that one back."""
        waiting = [j for j in self.active.values()
                   if j.pool == pool and j.status == "dispatched" and not j.withdrawing and j.rank > rank]
        if waiting:
            job = max(waiting, key=lambda j: (j.rank, j.seq))
            job.withdrawing = True
            self.backends[job.backend].executor.tell(Withdraw(workflow_id=job.workflow_id))
            log.info("workflow_outranked", workflow_id=job.workflow_id, backend=job.backend)

    async def ask_position(self, workflow_id: str) -> int | None:
        return await self.ask(QueuePosition(workflow_id=workflow_id), 10.0)

    @property
    def queued_count(self) -> int:
        return len(self.pending)

    def position(self, workflow_id: str) -> int | None:
        position = self.pending.position(workflow_id)
        if position is None:
            return 0 if workflow_id in self.active else None
        return position

    def _cancel(self, workflow_id: str) -> Any:
        if self.pending.remove(workflow_id):
            done = self.record.cancelled(workflow_id)
            self._update_gauges()
            return _then(done, CancelOutcome("cancelled"))
        job = self.active.get(workflow_id)
        if job is None:
            return CancelOutcome(None)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        job.waiters.append(waiter)
        if not job.cancel_requested:
            job.cancel_requested = True
            if job.status != "dispatching":
                self.backends[job.backend].executor.tell(Interrupt(workflow_id=workflow_id))
        log.info("workflow_cancel_requested", workflow_id=workflow_id, backend=job.backend, state=job.status)
        return _wrap(waiter)

    def _started(self, msg: JobStarted) -> None:
        job = self.active.get(msg.workflow_id)
        if job is None or job.status == "running":
            return
        job.status = "running"
        job.started_at = msg.started_at
        self.record.started(msg.workflow_id, msg.backend, msg.started_at)
        if job.created_at:
            self.metrics.queue_wait.labels(gpu_type=job.pool).observe(max(0, msg.started_at - job.created_at) / 1000)
        self._update_gauges()

    def _progress(self, msg: JobProgress) -> None:
        if msg.workflow_id not in self.active:
            return
        self.record.progress(msg.workflow_id, msg.progress, msg.current_node)

    def _finished(self, msg: JobFinished) -> None:
        job = self.active.pop(msg.workflow_id, None)
        if job is None:
            return
        self._release(job)
        if msg.retry and job.attempt < self.max_attempts and not job.cancel_requested:
            self._requeue(job, reason=msg.error.message if msg.error else "backend lost")
            return
        done = self.record.finished(msg, pool=job.pool, started_at=job.started_at)
        for waiter in job.waiters:
            done.add_done_callback(lambda _f, w=waiter, s=msg.status: w.done() or w.set_result(s))
        self._update_gauges()

    def _requeue(self, job: ActiveJob, reason: str) -> None:
        self.pending.push(job.workflow_id, job.pool, job.rank, job.seq)
        self.record.requeued(job.workflow_id, backend=job.backend, reason=reason, attempt=job.attempt)
        self._update_gauges()

    def _returned(self, msg: Returned) -> None:
        job = self.active.pop(msg.workflow_id, None)
        if job is None:
            return
        self._release(job)
        if job.cancel_requested:  # it never reached ComfyUI: the cancel completes here
            self._cancel_unsent(job)
            return
        self.pending.push(job.workflow_id, job.pool, job.rank, job.seq)
        self.jobs.update(job.workflow_id, backend=None, attempts=max(0, job.attempt - 1))
        log.info("workflow_returned", workflow_id=job.workflow_id, backend=msg.backend, reason=msg.reason)
        self._update_gauges()

    def _backend_state(self, msg: BackendState) -> None:
        backend = self.backends.get(msg.backend)
        if backend is None or backend.up == msg.up:
            return
        backend.up = msg.up
        if any(b.up for b in self.backends.values() if b.pool == backend.pool):
            self.pool_down_since.pop(backend.pool, None)
        else:
            self.pool_down_since.setdefault(backend.pool, time.monotonic())
        self.metrics.backend_up.labels(backend=backend.name, pool=backend.pool).set(1 if msg.up else 0)
        if self.publish_raw is not None:
            self.publish_raw("backend", events.encoder.encode(events.BackendEvent(
                type="backend:up" if msg.up else "backend:down", backend=backend.name, pool=backend.pool,
                error=msg.error, timestamp=events.now_ms())))
        log.info("backend_up" if msg.up else "backend_down", backend=backend.name, pool=backend.pool,
                 error=msg.error)

    def _fail_unserved_pools(self) -> None:
        now = time.monotonic()
        for pool, since in list(self.pool_down_since.items()):
            if now - since < self.backend_wait:
                continue
            error = JobError(error_type="backend_unavailable",
                             message=f"no backend of pool {pool!r} has been up for {now - since:.0f}s "
                                     f"(scheduler.backend_wait = {self.backend_wait:g}s)")
            while (workflow_id := self.pending.pop(pool)) is not None:
                self.record.failed(workflow_id, error)
        self._update_gauges()

    # -- dispatch ------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if not self.intake_open:
            return
        for backend in sorted(self.backends.values(), key=lambda b: len(b.assigned)):
            while backend.free > 0:
                workflow_id = self.pending.pop(backend.pool)
                if workflow_id is None:
                    break
                job = ActiveJob(workflow_id, backend.pool, 0, 0, backend.name)
                self.active[workflow_id] = job
                backend.assigned.add(workflow_id)
                self.spawn(self._prepare(job, reattach=False))
        self._update_gauges()

    async def _prepare(self, job: ActiveJob, *, reattach: bool) -> None:
        row = self.jobs.db.lookup(
            "SELECT workflow, attempts, dispatches, timeout, created_at, rank, seq, prompt_id FROM workflows "
            "WHERE id = ?", (job.workflow_id,))
        if row is None:  # pruned while waiting: nothing to run
            log.error("workflow_vanished", workflow_id=job.workflow_id)
            return
        job.rank, job.seq, job.created_at = row["rank"], row["seq"], row["created_at"]
        if reattach:
            attempt, prompt_id = row["attempts"], row["prompt_id"]
        else:
            attempt = row["attempts"] + 1
            prompt_id = f"{job.workflow_id}-{row['dispatches'] + 1}"
            await self.jobs.update(job.workflow_id, backend=job.backend, prompt_id=prompt_id, attempts=attempt,
                                   dispatches=row["dispatches"] + 1)
        job.attempt = attempt
        run = Run(workflow_id=job.workflow_id, prompt_id=prompt_id, workflow=msgspec.json.decode(row["workflow"]),
                  attempt=attempt, timeout=row["timeout"] or None, reattach=reattach,
                  was_running=reattach and job.status == "running")
        await self.send(Dispatched(workflow_id=job.workflow_id, run=run, created_at=row["created_at"]))

    def _hand_over(self, msg: Dispatched) -> None:
        job = self.active.get(msg.workflow_id)
        if job is None:
            return
        if job.cancel_requested and not msg.run.reattach:
            self.active.pop(msg.workflow_id)
            self._release(job)
            self._cancel_unsent(job)
            return
        if not self.intake_open and not msg.run.reattach:  # draining began while it was being prepared
            self._returned(Returned(workflow_id=job.workflow_id, backend=job.backend, reason="draining"))
            return
        if job.status == "dispatching":
            job.status = "dispatched"
        self.backends[job.backend].executor.tell(msg.run)
        if job.cancel_requested:
            self.backends[job.backend].executor.tell(Interrupt(workflow_id=job.workflow_id))
        log.info("workflow_dispatched", workflow_id=job.workflow_id, backend=job.backend, attempt=msg.run.attempt,
                 prompt_id=msg.run.prompt_id, reattach=msg.run.reattach)

    def _cancel_unsent(self, job: ActiveJob) -> None:
        """Cancel a job that was taken from the queue but never reached ComfyUI."""
        self.pending.push(job.workflow_id, job.pool, job.rank, job.seq)
        cancelled = self._cancel(job.workflow_id)
        for waiter in job.waiters:
            cancelled.add_done_callback(lambda _f, w=waiter: w.done() or w.set_result("cancelled"))

    def _release(self, job: ActiveJob) -> None:
        backend = self.backends.get(job.backend)
        if backend is not None:
            backend.assigned.discard(job.workflow_id)

    # -- reporting -----------------------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        if self.active:
            self.idle.clear()
        else:
            self.idle.set()
        waiting = len(self.pending) + sum(1 for j in self.active.values() if j.status != "running")
        self.metrics.queue_length.set(waiting)
        self.metrics.workflows_running.set(sum(1 for j in self.active.values() if j.status == "running"))
        for backend in self.backends.values():
            self.metrics.backend_busy.labels(backend=backend.name, pool=backend.pool).set(len(backend.assigned))

    def snapshot(self) -> dict[str, Any]:
        return {
            "queued": len(self.pending),
            "running": sum(1 for j in self.active.values() if j.status == "running"),
            "intakeOpen": self.intake_open,
            "backends": {
                b.name: {"pool": b.pool, "up": b.up, "capacity": b.capacity, "jobs": sorted(b.assigned)}
                for b in self.backends.values()
            },
        }


async def _wrap(waiter: asyncio.Future[str]) -> CancelOutcome:
    return CancelOutcome(await waiter)


def _then(done: asyncio.Future[None], value: Any) -> asyncio.Future[Any]:
    async def wait() -> Any:
        await done
        return value

    return asyncio.ensure_future(wait())
