"""The actor base and the supervisor, driven through their handles (tell / ask / stop), never by sleeping."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from comfyd.actors import base, supervisor
from comfyd.actors.base import Actor, ActorStopped, MailboxFull
from comfyd.actors.supervisor import Supervisor
from tests.recording_log import RecordingLog

WAIT = 5.0  # upper bound for anything the tests await; nothing here should come close


class Probe(Actor[Any]):
    """Answers tuples: ("echo", v) -> v, ("boom", text) raises, ("block",) waits for ``gate``, ..."""

    def __init__(self, name: str = "probe", *, mailbox_size: int | None = None) -> None:
        super().__init__(name, mailbox_size=mailbox_size)
        self.seen: list[Any] = []
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.stops = 0
        self.children: list[asyncio.Task[Any]] = []

    async def on_stop(self) -> None:
        self.stops += 1

    async def handle(self, message: Any) -> Any:
        self.seen.append(message)
        match message:
            case ("echo", value):
                return value
            case ("boom", text):
                raise ValueError(text)
            case ("block",):
                self.entered.set()
                await self.gate.wait()
                return "released"
            case ("future", future):
                return future  # an awaitable: the reply is what it yields
            case ("coro", value, gate):
                return self._later(value, gate)
            case ("coro-fail", text, gate, finished):
                return self._fail_later(text, gate, finished)
            case ("side-effect", event):
                return self._set(event)
            case ("spawn", coro):
                task = self.spawn(coro, name="probe:child")
                self.children.append(task)
                return task.get_name()
            case _:
                raise TypeError(f"unexpected {message!r}")

    @staticmethod
    async def _later(value: Any, gate: asyncio.Event) -> Any:
        await gate.wait()
        return value

    @staticmethod
    async def _fail_later(text: str, gate: asyncio.Event, finished: asyncio.Event) -> Any:
        try:
            await gate.wait()
            raise ValueError(text)
        finally:
            finished.set()

    @staticmethod
    async def _set(event: asyncio.Event) -> None:
        event.set()


@pytest.fixture
def actor_log(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recorder = RecordingLog()
    monkeypatch.setattr(base, "log", recorder)
    return recorder


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler ("Task exception was never retrieved", ...)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    actor = Probe()
    actor.start()
    yield actor
    actor.gate.set()
    await actor.stop(WAIT)


# -- ask / tell ----------------------------------------------------------------------------------------------
async def test_ask_returns_the_answer(probe: Probe) -> None:
    assert await probe.ask(("echo", 42), WAIT) == 42
    assert await asyncio.gather(*(probe.ask(("echo", i), WAIT) for i in range(20))) == list(range(20))
    assert probe.seen[1:] == [("echo", i) for i in range(20)]  # one at a time, in mailbox order


async def test_an_error_answering_an_ask_goes_to_the_caller_and_the_actor_lives_on(probe: Probe) -> None:
    with pytest.raises(ValueError, match="no such thing"):
        await probe.ask(("boom", "no such thing"), WAIT)
    assert probe.running
    assert await probe.ask(("echo", "still here"), WAIT) == "still here"


async def test_an_error_handling_a_tell_is_logged_and_the_actor_lives_on(probe: Probe,
                                                                        actor_log: RecordingLog) -> None:
    probe.tell(("boom", "tell went wrong"))
    # The mailbox is FIFO: once this ask is answered, the tell has been handled.
    assert await probe.ask(("echo", 1), WAIT) == 1
    assert probe.running
    failures = [fields for level, event, fields in actor_log.lines if event == "actor_tell_failed"]
    assert len(failures) == 1, actor_log.lines
    assert failures[0]["actor"] == "probe"
    assert failures[0]["message"] == "tuple"


async def test_ask_times_out_and_the_actor_keeps_working(probe: Probe, loop_errors: list[dict[str, Any]]) -> None:
    with pytest.raises(TimeoutError):
        await probe.ask(("block",), timeout=0.05)
    assert probe.entered.is_set()
    probe.gate.set()  # the handler now finishes and its reply has nobody to go to: dropped quietly
    assert await probe.ask(("echo", "after"), WAIT) == "after"
    assert loop_errors == []


async def test_a_question_whose_caller_has_gone_is_not_answered(probe: Probe) -> None:
    probe.tell(("block",))
    await asyncio.wait_for(probe.entered.wait(), WAIT)
    with pytest.raises(TimeoutError):
        await probe.ask(("echo", "timed out"), timeout=0.01)
    cancelled = asyncio.create_task(probe.ask(("echo", "cancelled"), WAIT))
    await asyncio.sleep(0)  # let it put its envelope in the mailbox
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    probe.gate.set()
    assert await probe.ask(("echo", "answered"), WAIT) == "answered"
    assert probe.seen == [("block",), ("echo", "answered")]


async def test_a_chained_reply_whose_caller_has_gone_is_dropped_quietly(
        probe: Probe, loop_errors: list[dict[str, Any]]) -> None:
    gate, finished = asyncio.Event(), asyncio.Event()
    with pytest.raises(TimeoutError):
        await probe.ask(("coro-fail", "too late", gate, finished), timeout=0.05)
    gate.set()
    await asyncio.wait_for(finished.wait(), WAIT)
    for _ in range(5):  # let the done-callbacks run, then let the finished task be collected
        await asyncio.sleep(0)
    gc.collect()
    assert await probe.ask(("echo", 1), WAIT) == 1
    assert loop_errors == [], [c.get("message") for c in loop_errors]


# -- bounded mailbox -----------------------------------------------------------------------------------------
async def test_a_full_mailbox_refuses_tell_and_ask() -> None:
    actor = Probe(mailbox_size=2)
    actor.start()
    try:
        actor.tell(("block",))
        await asyncio.wait_for(actor.entered.wait(), WAIT)  # taken out of the mailbox, now stuck
        actor.tell(("echo", 1))
        actor.tell(("echo", 2))
        assert actor.mailbox_depth == 2
        with pytest.raises(MailboxFull, match="probe"):
            actor.tell(("echo", 3))
        with pytest.raises(MailboxFull):
            await actor.ask(("echo", 4), WAIT)
        assert actor.mailbox_depth == 2
        actor.gate.set()
        async with asyncio.timeout(WAIT):  # room again once the actor takes the next message
            while actor.mailbox_depth == 2:
                await asyncio.sleep(0)
        assert await actor.ask(("echo", 5), WAIT) == 5
        assert actor.seen == [("block",), ("echo", 1), ("echo", 2), ("echo", 5)]
    finally:
        actor.gate.set()
        await actor.stop(WAIT)


# -- stop ----------------------------------------------------------------------------------------------------
async def test_stop_drains_what_was_queued_before_it_then_refuses_more() -> None:
    actor = Probe()
    actor.start()
    actor.tell(("block",))
    await asyncio.wait_for(actor.entered.wait(), WAIT)
    actor.tell(("echo", "a"))
    answer = asyncio.create_task(actor.ask(("echo", "b"), WAIT))
    await asyncio.sleep(0)  # the ask puts its envelope in the mailbox
    actor.tell(("echo", "c"))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(actor.stop(WAIT))
    await asyncio.sleep(0)
    assert not stopping.done()
    actor.gate.set()
    await asyncio.wait_for(stopping, WAIT)
    assert await answer == "b"
    assert actor.seen == [("block",), ("echo", "a"), ("echo", "b"), ("echo", "c")]
    assert not actor.running
    assert actor.stops == 1
    with pytest.raises(ActorStopped):
        await actor.ask(("echo", "late"), WAIT)
    with pytest.raises(ActorStopped):
        actor.tell(("echo", "late"))
    await actor.stop(WAIT)  # stopping twice is harmless
    assert actor.stops == 1


async def test_asks_still_queued_when_the_actor_is_cut_short_fail_with_actor_stopped() -> None:
    actor = Probe(mailbox_size=1)
    actor.start()
    actor.tell(("block",))
    await asyncio.wait_for(actor.entered.wait(), WAIT)
    queued = asyncio.create_task(actor.ask(("echo", "never"), 30))
    await asyncio.sleep(0)
    assert actor.mailbox_depth == 1  # full: the stop message cannot be queued, so stop cancels
    stopped = await asyncio.wait_for(asyncio.gather(actor.stop(WAIT), return_exceptions=True), WAIT)
    (outcome,) = await asyncio.wait_for(asyncio.gather(queued, return_exceptions=True), WAIT)
    assert stopped == [None], f"stop() raised {stopped[0]!r} into its caller"
    assert isinstance(outcome, ActorStopped), repr(outcome)
    assert ("echo", "never") not in actor.seen
    assert not actor.running


async def test_stop_deadline_cancels_a_stuck_actor(actor_log: RecordingLog) -> None:
    actor = Probe()
    task = actor.start()
    actor.tell(("block",))
    await asyncio.wait_for(actor.entered.wait(), WAIT)
    await asyncio.wait_for(actor.stop(timeout=0.05), WAIT)
    assert task.done() and task.cancelled()
    assert not actor.running
    assert actor.stops == 1  # on_stop still runs
    assert "actor_stop_deadline" in actor_log.events("warning")


async def test_an_ask_in_flight_when_the_actor_is_cut_short_fails_with_actor_stopped() -> None:
    actor = Probe()
    actor.start()
    in_flight = asyncio.create_task(actor.ask(("block",), 30))
    await asyncio.wait_for(actor.entered.wait(), WAIT)
    await asyncio.wait_for(actor.stop(timeout=0.05), WAIT)
    # The caller must hear at once that the actor is gone, not sit out its own 30 s timeout.
    with pytest.raises(ActorStopped):
        async with asyncio.timeout(1.0):
            await in_flight


# -- awaitable replies ---------------------------------------------------------------------------------------
async def test_handle_returning_a_future_chains_the_reply_and_frees_the_actor(probe: Probe) -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    reply = asyncio.create_task(probe.ask(("future", future), WAIT))
    # While that answer is outstanding the actor takes other messages.
    assert await probe.ask(("echo", "meanwhile"), WAIT) == "meanwhile"
    assert not reply.done()
    future.set_result("resolved later")
    assert await asyncio.wait_for(reply, WAIT) == "resolved later"


async def test_handle_returning_a_coroutine_chains_the_reply_and_its_error(probe: Probe) -> None:
    gate = asyncio.Event()
    reply = asyncio.create_task(probe.ask(("coro", {"answer": 1}, gate), WAIT))
    assert await probe.ask(("echo", 0), WAIT) == 0
    assert not reply.done()
    gate.set()
    assert await asyncio.wait_for(reply, WAIT) == {"answer": 1}

    gate, finished = asyncio.Event(), asyncio.Event()
    gate.set()
    with pytest.raises(ValueError, match="chained failure"):
        await probe.ask(("coro-fail", "chained failure", gate, finished), WAIT)
    assert probe.running


async def test_a_coroutine_returned_for_a_tell_still_runs(probe: Probe) -> None:
    ran = asyncio.Event()
    probe.tell(("side-effect", ran))
    await asyncio.wait_for(ran.wait(), 1.0)


# -- children ------------------------------------------------------------------------------------------------
async def test_children_spawned_by_the_actor_are_cancelled_on_stop() -> None:
    actor = Probe()
    actor.start()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    await actor.ask(("spawn", forever()), WAIT)
    await asyncio.wait_for(started.wait(), WAIT)
    (child,) = actor.children
    assert not child.done()
    await actor.stop(WAIT)
    assert child.cancelled()


async def test_a_failing_child_is_logged_and_the_actor_lives_on(probe: Probe, actor_log: RecordingLog) -> None:
    async def broken() -> None:
        raise RuntimeError("child broke")

    await probe.ask(("spawn", broken()), WAIT)
    (child,) = probe.children
    await asyncio.wait([child], timeout=WAIT)
    await asyncio.sleep(0)  # the done-callback runs on the next loop turn
    assert "actor_child_failed" in actor_log.events("error")
    assert await probe.ask(("echo", "alive"), WAIT) == "alive"


# -- supervisor ----------------------------------------------------------------------------------------------
class Crash(BaseException):
    """Escapes ``handle``'s error net (which catches ``Exception``): a crash of the loop itself."""


class Flaky(Actor[Any]):
    def __init__(self, failures: int) -> None:
        super().__init__("flaky")
        self.failures = failures
        self.starts = 0
        self.ready = asyncio.Event()
        self.stops = 0

    async def on_start(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise RuntimeError(f"start {self.starts} failed")
        self.ready.set()

    async def on_stop(self) -> None:
        self.stops += 1

    async def handle(self, message: Any) -> Any:
        if message == "crash":
            self.ready.clear()
            raise Crash("the loop broke")
        return ("pong", self.starts)


@pytest.fixture
def quiet_supervisor(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recorder = RecordingLog()
    monkeypatch.setattr(supervisor, "log", recorder)
    return recorder


async def test_supervisor_restarts_an_actor_whose_start_crashes(quiet_supervisor: RecordingLog) -> None:
    sup = Supervisor(max_restarts=5, window=60)
    actor = Flaky(failures=2)
    sup.start(actor)
    await asyncio.wait_for(actor.ready.wait(), WAIT)
    assert await actor.ask("ping", WAIT) == ("pong", 3)
    assert actor.starts == 3
    assert not sup.failed.is_set()
    assert quiet_supervisor.events("error") == ["actor_crashed", "actor_crashed"]
    await sup.stop_all()
    assert not actor.running
    await asyncio.sleep(0)
    assert actor.starts == 3  # a requested stop is not a crash: no restart


async def test_supervisor_restarts_an_actor_whose_loop_crashes(quiet_supervisor: RecordingLog) -> None:
    sup = Supervisor(max_restarts=5, window=60)
    actor = Flaky(failures=0)
    sup.start(actor)
    await asyncio.wait_for(actor.ready.wait(), WAIT)
    actor.tell("crash")
    await asyncio.wait_for(actor.ready.wait(), WAIT)  # set again by the restarted on_start
    assert actor.starts == 2
    assert actor.stops == 1  # on_stop ran for the crashed incarnation
    assert await actor.ask("ping", WAIT) == ("pong", 2)
    assert not sup.failed.is_set()
    await sup.stop_all()


async def test_supervisor_gives_up_after_too_many_crashes_in_the_window(quiet_supervisor: RecordingLog) -> None:
    sup = Supervisor(max_restarts=2, window=60)
    actor = Flaky(failures=1000)
    sup.start(actor)
    await asyncio.wait_for(sup.failed.wait(), WAIT)
    assert actor.starts == 3  # the first start and two restarts, then no more
    assert sup.failure is not None and "flaky" in sup.failure and "start 3 failed" in sup.failure
    assert "actor_gave_up" in quiet_supervisor.events("critical")
    for _ in range(5):
        await asyncio.sleep(0)
    assert actor.starts == 3
    assert not actor.running


async def test_supervisor_forgets_crashes_older_than_the_window(quiet_supervisor: RecordingLog,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 100))  # every crash 100 s after the previous one
    monkeypatch.setattr(supervisor, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    sup = Supervisor(max_restarts=1, window=60)
    actor = Flaky(failures=6)
    sup.start(actor)
    await asyncio.wait_for(actor.ready.wait(), WAIT)
    assert actor.starts == 7
    assert not sup.failed.is_set()
    await sup.stop_all()


async def test_a_crash_in_start_fails_asks_already_queued() -> None:
    release = asyncio.Event()

    class SlowToFail(Actor[Any]):
        async def on_start(self) -> None:
            await release.wait()
            raise RuntimeError("could not load state")

        async def handle(self, message: Any) -> Any:
            return message

    actor = SlowToFail("slow")
    task = actor.start()
    waiting = asyncio.create_task(actor.ask("hello", 30))
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(ActorStopped):
        await asyncio.wait_for(waiting, WAIT)
    with pytest.raises(RuntimeError, match="could not load state"):
        await task
