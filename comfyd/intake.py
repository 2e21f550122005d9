"""Intake: hands jobs to the scheduler once they are committed, all of one group commit in one message.

A submit stores its row and then needs its queue position from the scheduler. Asking once per request costs
a mailbox round trip, a task switch and a dispatch pass each; under load the group commit has already
gathered the requests of one loop turn, so their ``Enqueue`` messages travel together as one ``EnqueueMany``
and the scheduler answers all positions at once. Each request awaits one future: its position, or the error
its commit failed with.

The job is durable before it is handed over, so a scheduler that cannot take it now (mailbox full, stopping,
slow to answer) never fails the request: the job is handed over in the background, or found by recovery.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import structlog

from comfyd.actors.base import Actor, ActorStopped, MailboxFull
from comfyd.messages import Enqueue, EnqueueMany

log = structlog.get_logger("comfyd.intake")

ANSWER_TIMEOUT = 10.0


class Intake:
    def __init__(self, scheduler: Actor[Any], *, answer_timeout: float = ANSWER_TIMEOUT) -> None:
        self.scheduler = scheduler
        self.answer_timeout = answer_timeout
        self._batch: list[tuple[Enqueue, asyncio.Future[int]]] = []
        self._flush_scheduled = False
        self._background: set[asyncio.Task[None]] = set()

    def admit(self, commit: asyncio.Future[None], message: Enqueue) -> asyncio.Future[int]:
        """The queue position of the job ``commit`` stores, once it is committed and queued."""
        position: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        commit.add_done_callback(partial(self._committed, message, position))
        return position

    def _committed(self, message: Enqueue, position: asyncio.Future[int], commit: asyncio.Future[None]) -> None:
        if commit.cancelled() or (error := commit.exception()) is not None:
            if not position.done():
                position.cancel() if commit.cancelled() else position.set_exception(error)
            return
        self._batch.append((message, position))  # stored: it is queued even if its request has gone away
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            answer = self.scheduler.ask_nowait(EnqueueMany(jobs=tuple(m for m, _ in batch)), self.answer_timeout)
        except (MailboxFull, ActorStopped) as exc:
            self._defer(batch, exc)
            return
        answer.add_done_callback(partial(self._answered, batch))

    def _answered(self, batch: list[tuple[Enqueue, asyncio.Future[int]]], answer: asyncio.Future[Any]) -> None:
        error = None if answer.cancelled() else answer.exception()
        if answer.cancelled() or error is not None:
            self._defer(batch, error)
            return
        for (_, position), value in zip(batch, answer.result()):
            if not position.done():
                position.set_result(int(value))

    def _defer(self, batch: list[tuple[Enqueue, asyncio.Future[int]]], error: BaseException | None) -> None:
        """Stored but not queued yet: answer with the queue's length and hand the jobs over when there is room."""
        queued = getattr(self.scheduler, "queued_count", 0)
        for message, position in batch:
            log.warning("enqueue_deferred", workflow_id=message.workflow_id, error=repr(error))
            if not position.done():
                position.set_result(queued)
        task = asyncio.create_task(self._hand_over_later([m for m, _ in batch]), name="intake:deferred")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hand_over_later(self, messages: list[Enqueue]) -> None:
        try:
            await self.scheduler.send(EnqueueMany(jobs=tuple(messages)))
        except ActorStopped:  # stopping or restarting: recovery loads the jobs from the database
            pass

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
