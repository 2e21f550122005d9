"""Supervision: restart a crashed actor with a rate limit, otherwise give up so systemd restarts the process.

A crash is an actor task that ends with an exception without having been asked to stop (errors inside a
single message never crash an actor: see ``base.Actor``). The supervisor restarts it in place (its
``on_start`` reloads what it needs); more than ``max_restarts`` crashes within ``window`` seconds set
``failed``, which the composition root turns into a non-zero exit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog

from comfyd.actors.base import Actor

log = structlog.get_logger("comfyd.supervisor")


class Supervisor:
    def __init__(self, *, max_restarts: int = 5, window: float = 60.0) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self._actors: list[Actor] = []
        self._crashes: dict[str, deque[float]] = {}
        self._stopping = False

    def start(self, actor: Actor) -> None:
        self._actors.append(actor)
        self._watch(actor)

    def _watch(self, actor: Actor) -> None:
        task = actor.start()
        task.add_done_callback(lambda t, a=actor: self._on_exit(a, t))

    def _on_exit(self, actor: Actor, task: asyncio.Task) -> None:
        if self._stopping or task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        now = time.monotonic()
        crashes = self._crashes.setdefault(actor.name, deque())
        crashes.append(now)
        while crashes and now - crashes[0] > self.window:
            crashes.popleft()
        if len(crashes) > self.max_restarts:
            self.failure = f"{actor.name} crashed {len(crashes)} times in {self.window:.0f}s: {exc!r}"
            log.critical("actor_gave_up", actor=actor.name, error=repr(exc), crashes=len(crashes))
            self.failed.set()
            return
        log.error("actor_crashed", actor=actor.name, error=repr(exc), restarts=len(crashes), exc_info=exc)
        actor._task = None  # noqa: SLF001 - the supervisor owns restarts
        actor._stopping = False  # noqa: SLF001
        self._watch(actor)

    async def stop_all(self, timeouts: dict[str, float] | None = None) -> None:
        """Stop every actor in reverse start order."""
        self._stopping = True
        for actor in reversed(self._actors):
            await actor.stop((timeouts or {}).get(actor.name, 10.0))
