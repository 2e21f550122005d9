"""A small actor runtime: one task owns the state, a bounded mailbox feeds it, handles are the only way in.

Modelled on aiosqlite's worker/handle split and pykka's envelopes: the mailbox holds ``Envelope(message,
reply_to)``, so messages stay pure data. ``tell`` is for events, ``ask`` for questions (always with a
timeout). An error raised while answering an ``ask`` goes back to the caller and the actor lives on; an error
while handling a ``tell`` is logged and the actor lives on. Stop is an ordinary message with a deadline:
what was queued before it is still handled, asks that arrive after it fail with ``ActorStopped``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

log = structlog.get_logger("comfyd.actors")

M = TypeVar("M")


class ActorStopped(RuntimeError):
    """The actor is stopped (or stopping) and cannot take the message."""


class MailboxFull(RuntimeError):
    """The actor's bounded mailbox is full: the caller should shed load (429/503 at the edge)."""


class _Stop:
    __slots__ = ()


_STOP = _Stop()


@dataclass(slots=True)
class Envelope:
    message: Any
    reply_to: asyncio.Future[Any] | None = None


class Actor(Generic[M]):
    """Base class. Subclasses implement ``handle`` (and optionally ``on_start`` / ``on_stop``).

    ``handle`` may return an awaitable (a future or a coroutine): the reply to an ``ask`` is then what the
    awaitable yields, resolved outside the message loop, so the actor is free to take its next message while
    a slow answer (e.g. a database commit) completes.
    """

    mailbox_size: int = 1000

    def __init__(self, name: str, *, mailbox_size: int | None = None) -> None:
        self.name = name
        self._mailbox: asyncio.Queue[Envelope] = asyncio.Queue(mailbox_size or self.mailbox_size)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._children: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        """Runs in the actor's task before the first message."""

    async def on_stop(self) -> None:
        """Runs in the actor's task after the stop message (or a crash)."""

    async def handle(self, message: M) -> Any:
        raise NotImplementedError

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"actor:{self.name}")
        return self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the actor to stop after what is already queued; cancel it if it overruns ``timeout``."""
        task = self._task
        if task is None or task.done():
            return
        self._stopping = True
        try:
            self._mailbox.put_nowait(Envelope(_STOP))
        except asyncio.QueueFull:
            log.warning("actor_stop_mailbox_full", actor=self.name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            log.warning("actor_stop_deadline", actor=self.name, timeout=timeout)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        except Exception:  # a crash during stop has been logged by _run
            pass

    # -- mailbox -----------------------------------------------------------------------------------------
    def tell(self, message: M) -> None:
        """Deliver an event without waiting. Raises ``MailboxFull`` rather than growing without bound."""
        if self._stopping:
            raise ActorStopped(f"{self.name} is stopping")
        try:
            self._mailbox.put_nowait(Envelope(message))
        except asyncio.QueueFull:
            raise MailboxFull(f"{self.name} mailbox is full ({self._mailbox.maxsize})") from None

    async def send(self, message: M) -> None:
        """Deliver an event, waiting for room in the mailbox (back-pressure for reports that must not drop)."""
        if self._stopping:
            raise ActorStopped(f"{self.name} is stopping")
        await self._mailbox.put(Envelope(message))

    async def ask(self, message: M, timeout: float) -> Any:
        """Deliver a question and wait for its answer, at most ``timeout`` seconds."""
        return await self.ask_nowait(message, timeout)

    def ask_nowait(self, message: M, timeout: float) -> asyncio.Future[Any]:
        """Deliver a question; the answer arrives on the returned future, which fails with ``TimeoutError``
        after ``timeout`` seconds. Cancelling the future withdraws the question."""
        if self._stopping or not self.running:
            raise ActorStopped(f"{self.name} is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        try:
            self._mailbox.put_nowait(Envelope(message, future))
        except asyncio.QueueFull:
            raise MailboxFull(f"{self.name} mailbox is full ({self._mailbox.maxsize})") from None
        expiry = loop.call_later(timeout, _expire, future, self.name, timeout)
        future.add_done_callback(lambda _f: expiry.cancel())
        return future

    @property
    def mailbox_depth(self) -> int:
        return self._mailbox.qsize()

    # -- helpers for subclasses --------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run a child task owned by this actor; it is cancelled when the actor stops."""
        task = asyncio.create_task(coro, name=name or f"{self.name}:child")
        self._children.add(task)
        task.add_done_callback(self._child_done)
        return task

    def every(self, seconds: float, message: Callable[[], M], *, now: bool = False) -> None:
        """Tell this actor ``message()`` every ``seconds`` (and at once with ``now``), from a child task that stop
        cancels. A tick that finds the mailbox full is skipped: the next one comes soon enough."""

        async def ticks() -> None:
            if now:
                self._tell_quietly(message())
            while True:
                await asyncio.sleep(seconds)  # the period of a timer, not a wait for a condition
                self._tell_quietly(message())

        self.spawn(ticks(), name=f"{self.name}:every")

    def _tell_quietly(self, message: M) -> None:
        try:
            self.tell(message)
        except (MailboxFull, ActorStopped):
            pass

    def _child_done(self, task: asyncio.Task[Any]) -> None:
        self._children.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("actor_child_failed", actor=self.name, task=task.get_name(), error=repr(exc),
                      exc_info=exc)

    # -- the loop ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self.on_start()
            while True:
                envelope = await self._mailbox.get()
                if envelope.message is _STOP:
                    break
                await self._deliver(envelope)
        finally:
            self._stopping = True
            try:
                await self.on_stop()
            finally:
                await self._cancel_children()
                self._fail_pending()

    async def _deliver(self, envelope: Envelope) -> None:
        reply_to = envelope.reply_to
        if reply_to is not None and reply_to.done():
            return  # the caller has gone (timed out or cancelled): don't answer a question nobody waits for
        try:
            result = await self.handle(envelope.message)
        except asyncio.CancelledError:
            if reply_to is not None and not reply_to.done():
                reply_to.set_exception(ActorStopped(f"{self.name} stopped while answering"))
            raise
        except Exception as exc:
            if reply_to is None:
                log.exception("actor_tell_failed", actor=self.name, message=type(envelope.message).__name__)
            elif not reply_to.done():
                reply_to.set_exception(exc)
            return
        if isinstance(result, Awaitable):
            _chain(result, reply_to, self.name)
        elif reply_to is not None and not reply_to.done():
            reply_to.set_result(result)

    async def _cancel_children(self) -> None:
        children = list(self._children)
        for task in children:
            task.cancel()
        if children:
            await asyncio.gather(*children, return_exceptions=True)

    def _fail_pending(self) -> None:
        while True:
            try:
                envelope = self._mailbox.get_nowait()
            except asyncio.QueueEmpty:
                return
            if envelope.reply_to is not None and not envelope.reply_to.done():
                envelope.reply_to.set_exception(ActorStopped(f"{self.name} stopped"))


def _expire(future: asyncio.Future[Any], actor: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"{actor} did not answer within {timeout} s"))


def _chain(awaitable: Awaitable[Any], reply_to: asyncio.Future[Any] | None, actor: str) -> None:
    """Resolve ``reply_to`` with what ``awaitable`` yields; for a tell (no reply), log its failure."""
    future = asyncio.ensure_future(awaitable)

    def copy(done: asyncio.Future[Any]) -> None:
        exc = None if done.cancelled() else done.exception()  # always retrieved: no "never retrieved" noise
        if reply_to is None:
            if exc is not None:
                log.error("actor_tell_failed", actor=actor, error=repr(exc), exc_info=exc)
            return
        if reply_to.done():
            return
        if done.cancelled():
            reply_to.cancel()
        elif exc is not None:
            reply_to.set_exception(exc)
        else:
            reply_to.set_result(done.result())

    future.add_done_callback(copy)


Factory = Callable[[], Actor[Any]]
