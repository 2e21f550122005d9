"""The scheduler's own state: what it knows of each backend and of each job that has left the queue, and its
private messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec

from comfyd.actors.base import Actor
from comfyd.messages import Message, Run


class Dispatched(Message, frozen=True):
    """Private: a job's dispatch is committed and its workflow loaded; hand it over now."""

    workflow_id: str
    run: Run
    created_at: int


class Tick(Message, frozen=True):
    """Private: periodic checks (pools without any backend up)."""


class CancelOutcome(msgspec.Struct, frozen=True):
    status: str | None  # the job's status after the cancel, None if the scheduler does not hold the job


@dataclass(slots=True)
class Backend:
    name: str
    pool: str
    capacity: int
    executor: Actor[Any]
    up: bool = False
    assigned: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - len(self.assigned) if self.up else 0


@dataclass(slots=True)
class ActiveJob:
    workflow_id: str
    pool: str
    rank: int
    seq: int
    backend: str
    status: str = "dispatching"  # dispatching -> dispatched -> running
    attempt: int = 0
    created_at: int = 0
    started_at: int | None = None
    cancel_requested: bool = False
    withdrawing: bool = False
    waiters: list[asyncio.Future[str]] = field(default_factory=list)
