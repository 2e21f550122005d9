"""Intake: committed jobs reach the scheduler many per message; failures reach only their own request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from comfyd.actors.base import Actor
from comfyd.errors import StorageError
from comfyd.intake import Intake
from comfyd.messages import Enqueue, EnqueueMany
from tests.harness import until

WAIT = 5.0


class Queue(Actor[Any]):
    """A scheduler that only queues: answers each EnqueueMany with positions, optionally held at a gate."""

    def __init__(self, *, mailbox_size: int = 100) -> None:
        super().__init__("queue", mailbox_size=mailbox_size)
        self.order: list[str] = []
        self.messages = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    @property
    def queued_count(self) -> int:
        return len(self.order)

    async def handle(self, message: EnqueueMany) -> list[int]:
        self.entered.set()
        await self.gate.wait()
        self.messages += 1
        positions = []
        for job in message.jobs:
            self.order.append(job.workflow_id)
            positions.append(len(self.order))
        return positions


def job(n: int) -> Enqueue:
    return Enqueue(workflow_id=f"wf-{n}", pool="local", priority="normal", rank=n, seq=n)


def committed() -> asyncio.Future[None]:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


@pytest.fixture
async def queue() -> Any:
    actor = Queue()
    actor.start()
    yield actor
    actor.gate.set()
    await actor.stop(WAIT)


async def test_one_group_commit_is_one_scheduler_message(queue: Queue) -> None:
    intake = Intake(queue)
    commits = [asyncio.get_running_loop().create_future() for _ in range(50)]
    positions = [intake.admit(c, job(i)) for i, c in enumerate(commits)]
    for commit in commits:  # the store settles one batch's futures together
        commit.set_result(None)
    assert await asyncio.wait_for(asyncio.gather(*positions), WAIT) == list(range(1, 51))
    assert queue.messages == 1
    assert queue.order == [f"wf-{i}" for i in range(50)]


async def test_a_failed_commit_fails_its_request_and_queues_nothing(queue: Queue) -> None:
    intake = Intake(queue)
    bad = asyncio.get_running_loop().create_future()
    bad.set_exception(StorageError("the database is busy", retry_after=2))
    good = intake.admit(committed(), job(1))
    refused = intake.admit(bad, job(2))
    with pytest.raises(StorageError):
        await asyncio.wait_for(refused, WAIT)
    assert await asyncio.wait_for(good, WAIT) == 1
    assert queue.order == ["wf-1"]


async def test_a_stored_job_is_queued_even_if_its_request_went_away(queue: Queue) -> None:
    intake = Intake(queue)
    commit = asyncio.get_running_loop().create_future()
    position = intake.admit(commit, job(7))
    position.cancel()  # the client disconnected while the commit was under way
    commit.set_result(None)
    follower = intake.admit(committed(), job(8))
    await asyncio.wait_for(follower, WAIT)
    assert queue.order == ["wf-7", "wf-8"]


async def test_a_full_mailbox_defers_the_hand_over_without_failing_the_request() -> None:
    queue = Queue(mailbox_size=1)
    queue.start()
    try:
        queue.gate.clear()
        intake = Intake(queue)
        first = intake.admit(committed(), job(1))
        await until(lambda: queue.entered.is_set())  # the first batch is being handled, held at the gate
        queue.tell(EnqueueMany(jobs=(job(2),)))  # and this one fills the mailbox
        third = intake.admit(committed(), job(3))
        assert await asyncio.wait_for(third, WAIT) == 0  # answered with the queue's length, not failed
        assert not first.done()
        queue.gate.set()
        assert await asyncio.wait_for(first, WAIT) == 1
        await until(lambda: len(queue.order) == 3)  # the deferred job is handed over once there is room
        assert queue.order == ["wf-1", "wf-2", "wf-3"]
    finally:
        queue.gate.set()
        await queue.stop(WAIT)
