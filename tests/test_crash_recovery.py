"""Crash safety: comfyd runs as a real process and is SIGKILLed at chosen points, then restarted on the same
database and port. Whatever got a 202 must survive and end, nothing may be posted to ComfyUI twice for one
attempt, no workflow may succeed twice, and what finished inside ComfyUI while comfyd was down is collected.

The ComfyUI side is the stand-in; ``hold()`` keeps a node running for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.comfyui_standin import StandInComfyUI
from tests.harness import workflow
from tests.process import ComfydProcess, comfyd_process  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)

MakeComfyd = Callable[..., Awaitable[ComfydProcess]]
_colors = itertools.count(1000)
WORKFLOW_LOG_EVENTS = ("workflow_queued", "workflow_dispatched", "workflow_started", "workflow_completed")


def quick() -> dict[str, Any]:
    return workflow("quick", **{"1.color": next(_colors)})  # a new input each time: ComfyUI's cache never answers


def slow() -> dict[str, Any]:
    return workflow("slow", **{"1.color": next(_colors)})


def wid_of(prompt_id: str) -> str:
    return prompt_id.rsplit("-", 1)[0]


@pytest.fixture
def standin_node_time() -> float:
    """Nodes take 10 ms: a quick job is in ComfyUI for ~40 ms, long enough to be caught there by a kill."""
    return 0.01


# -- what every case checks ----------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What the clients were told, and where ComfyUI's lifetimes (stand-in restarts) begin."""

    standin: StandInComfyUI
    accepted: list[str] = field(default_factory=list)  # every workflowId that came back with a 202
    lifetimes: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])  # (posted, executed) at start

    def comfyui_restarted(self) -> None:
        self.lifetimes.append((len(self.standin.posted), len(self.standin.executed_prompt_ids)))

    def posted_by_lifetime(self) -> list[list[str]]:
        ends = [*self.lifetimes[1:], (len(self.standin.posted), len(self.standin.executed_prompt_ids))]
        return [[body["prompt_id"] for body in self.standin.posted[a:b]]
                for (a, _), (b, _) in zip(self.lifetimes, ends)]

    def executed_by_lifetime(self) -> list[list[str]]:
        ends = [*self.lifetimes[1:], (len(self.standin.posted), len(self.standin.executed_prompt_ids))]
        return [self.standin.executed_prompt_ids[a:b] for (_, a), (_, b) in zip(self.lifetimes, ends)]


async def submit_quietly(proc: ComfydProcess, graph: dict[str, Any], *,
                         hold_back: asyncio.Event | None = None) -> str | None:
    """Submit; the workflowId on a 202, None when comfyd died before answering. With ``hold_back`` only the
    first half of the body is sent until that event is set (a request caught mid-upload by a kill)."""
    body = json.dumps({"workflow": graph}).encode()

    async def halves() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        assert hold_back is not None
        await hold_back.wait()
        yield body[len(body) // 2:]

    try:
        status, reply = await proc.request("POST", "/v1/comfyui/workflow", data=body if hold_back is None else halves(),
                                           headers={"Content-Type": "application/json"})
    except (aiohttp.ClientError, RuntimeError):  # killed mid-request / session already gone
        return None
    assert status == 202, (status, reply)
    return str(reply["workflowId"])


async def check_recovered(proc: ComfydProcess, ledger: Ledger, *, finished_while_down: Collection[str] = (),
                          note: str = "", timeout: float = 45.0) -> dict[str, dict[str, Any]]:
    """The invariants, after the last restart. Returns the final view of every checked workflow."""
    standin = ledger.standin
    context = f"{note}\n--- comfyd log tail ---\n{proc.tail(80)}"
    # every 202 is known after the restart
    for workflow_id in ledger.accepted:
        status, body = await proc.request("GET", f"/v1/comfyui/workflow/{workflow_id}")
        assert status == 200, f"accepted {workflow_id} is unknown after the restart: {status} {body}{context}"
        assert body["status"] in ("queued", "running", "completed"), (workflow_id, body, context)
    # rows committed whose 202 never reached the client (killed mid-answer) must end as well
    stored = proc.stored_jobs()
    assert set(ledger.accepted) <= set(stored), sorted(set(ledger.accepted) - set(stored))
    checked = [*ledger.accepted, *(w for w in stored if w not in set(ledger.accepted))]
    ended = await proc.wait_terminal(checked, timeout=timeout)
    assert set(ended.values()) == {"completed"}, (
        f"not all completed: {Counter(ended.values())} "
        f"{[(w, s) for w, s in ended.items() if s != 'completed'][:5]}{context}")
    assert set(proc.stored_jobs().values()) == {"completed"}, (proc.stored_jobs(), context)
    await standin.idle()

    # no prompt is posted twice for one attempt (inside one ComfyUI lifetime; after ComfyUI restarted and lost
    # its queue, a prompt that never started there may be posted again under the same attempt, by design)
    posted_lives, executed_lives = ledger.posted_by_lifetime(), ledger.executed_by_lifetime()
    for life, posted in enumerate(posted_lives):
        twice = {p: n for p, n in Counter(posted).items() if n > 1}
        assert not twice, f"posted twice for one attempt in ComfyUI lifetime {life}: {twice}{context}"
    for life, posted in enumerate(posted_lives[1:], start=1):
        earlier = set(itertools.chain.from_iterable(executed_lives[:life]))
        again = sorted(set(posted) & earlier)
        assert not again, (f"prompts that had started executing in an earlier ComfyUI lifetime were posted again "
                           f"under the same attempt (a lost running job must be retried as a new attempt): "
                           f"{again}{context}")
    for life, executed in enumerate(executed_lives):
        twice = {p: n for p, n in Counter(executed).items() if n > 1}
        assert not twice, f"executed twice in ComfyUI lifetime {life}: {twice}{context}"
    assert all(body["prompt_id"].rsplit("-", 1)[1].isdigit() for body in standin.posted)
    assert {wid_of(body["prompt_id"]) for body in standin.posted} <= set(checked)

    # one successful execution per workflow: exactly one output file in its folder, the one comfyd lists
    views: dict[str, dict[str, Any]] = {}
    for workflow_id in checked:
        view = await proc.get(workflow_id)
        views[workflow_id] = view
        folder = standin.output_dir / workflow_id
        on_disk = sorted(str(p.relative_to(standin.output_dir)) for p in folder.rglob("*") if p.is_file())
        listed = sorted(o["filename"] for o in view["outputs"])
        executed = [p for p in standin.executed_prompt_ids if wid_of(p) == workflow_id]
        assert len(on_disk) == 1, (f"{workflow_id} ran successfully {len(on_disk)} times in ComfyUI "
                                   f"(attempts {view['attempts']}): {on_disk}; prompts executed: {executed}{context}")
        assert listed == on_disk, (workflow_id, listed, on_disk, context)
        for name in listed:
            assert Path(name).parts[0] == workflow_id and (standin.output_dir / name).is_file()
        indexed = sorted(o["filename"] for o in await proc.outputs(workflow_id))
        while_down = " (it finished inside ComfyUI while comfyd was down)" if workflow_id in finished_while_down else ""
        assert indexed == on_disk, f"{workflow_id}: output index {indexed} != files {on_disk}{while_down}{context}"
    for workflow_id in finished_while_down:  # collected from ComfyUI's history, not run again
        assert views[workflow_id]["status"] == "completed"
        assert sum(1 for p in standin.executed_prompt_ids if wid_of(p) == workflow_id) == 1, (workflow_id, context)
    assert not proc.errors(), f"errors or tracebacks in comfyd's output:\n{proc.tail(20, proc.errors())}{context}"
    return views


def finished_inside_comfyui(proc: ComfydProcess, standin: StandInComfyUI) -> set[str]:
    """Workflows whose prompt ended successfully in ComfyUI but whose completion comfyd never logged."""
    logged = {line.get("workflow_id") for line in proc.events("workflow_completed")}
    return {wid_of(prompt_id) for prompt_id, entry in standin.history.items()
            if entry.get("status", {}).get("status_str") == "success" and wid_of(prompt_id) not in logged}


async def watch_stream(proc: ComfydProcess, on_event: Callable[[dict[str, Any]], None],
                       subscribed: asyncio.Event) -> None:
    """Every workflow event (no subscription = all of them) until the process dies."""
    try:
        async with proc.stream() as ws:
            subscribed.set()
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                on_event(json.loads(message.data))
    except aiohttp.ClientError:
        pass
    finally:
        subscribed.set()


# -- the cases --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_kill_right_after_202(synchronous: str, standin: StandInComfyUI, comfyd_process: MakeComfyd) -> None:
    """Both commit paths: on the event loop (NORMAL) and in the writer thread (FULL)."""
    proc = await comfyd_process(standin, env={"COMFYD_SYNCHRONOUS": synchronous})
    status, body = await proc.request("POST", "/v1/comfyui/workflow", json={"workflow": quick()})
    proc.kill()  # SIGKILL the moment the 202 is read
    assert status == 202, body
    workflow_id = body["workflowId"]
    assert await proc.wait() == -9
    await proc.restart()
    view = await proc.get(workflow_id)
    assert view["status"] in ("queued", "running", "completed"), view
    ledger = Ledger(standin, accepted=[workflow_id])
    views = await check_recovered(proc, ledger)
    assert views[workflow_id]["status"] == "completed"


async def _kill_with_slow_job_held(proc: ComfydProcess, standin: StandInComfyUI, ledger: Ledger) -> str:
    """A slow job held mid-run inside ComfyUI, one more waiting there, three queued in comfyd: SIGKILL."""
    standin.hold()
    held = await proc.submit(slow())
    ledger.accepted.append(held)
    await standin.wait_for(lambda: standin.held is not None, 10)
    ledger.accepted += [await proc.submit(quick()) for _ in range(4)]
    await standin.wait_for(lambda: len(standin.pending_prompt_ids) == 1, 10)
    await proc.wait_line(lambda l: l.get("event") == "workflow_started" and l.get("workflow_id") == held, 10)
    proc.kill()
    assert await proc.wait() == -9
    return held


async def _kill_during_intake_burst(proc: ComfydProcess, standin: StandInComfyUI, ledger: Ledger) -> set[str]:
    """30 concurrent submits; SIGKILL the moment the first 202 arrives. Half of the requests are still
    uploading their body then; of the others some are committed, some answered, some neither."""
    accepted: list[str] = []
    killed = asyncio.Event()

    async def one(trickle: bool) -> None:
        workflow_id = await submit_quietly(proc, quick(), hold_back=killed if trickle else None)
        if workflow_id is not None:
            accepted.append(workflow_id)
            proc.kill()
            killed.set()

    await asyncio.gather(*(one(trickle=n % 2 == 1) for n in range(30)))
    assert await proc.wait() == -9, proc.tail()
    ledger.accepted += accepted
    assert 1 <= len(accepted) <= 15, len(accepted)
    await proc.restart()
    return set()


async def _kill_while_slow_job_held(proc: ComfydProcess, standin: StandInComfyUI, ledger: Ledger) -> set[str]:
    """A slow job held mid-run inside ComfyUI, one more waiting there, three queued in comfyd: kill, restart,
    and only then let ComfyUI go on. The running prompt is followed again, not posted again."""
    held = await _kill_with_slow_job_held(proc, standin, ledger)
    assert standin.held == (f"{held}-1", "1")
    await proc.restart()
    await proc.wait_event("backend_up", 10)  # its socket is back: ComfyUI's frames reach comfyd again
    assert (await proc.get(held))["status"] == "running"
    standin.release()
    await proc.wait_terminal([held], 20)
    assert standin.executed_prompt_ids[0] == f"{held}-1"
    assert (await proc.get(held))["attempts"] == 1
    return set()


async def _kill_at_nth_completion(proc: ComfydProcess, standin: StandInComfyUI, ledger: Ledger) -> set[str]:
    """A stream of quick jobs; SIGKILL the moment the 5th ``workflow:completed`` arrives on the stream. Those
    in ComfyUI at that moment finish while comfyd is down and must be collected from its history."""
    completed = 0
    subscribed = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        nonlocal completed
        if event.get("type") == "workflow:completed":
            completed += 1
            if completed == 5:
                proc.kill()

    watcher = asyncio.create_task(watch_stream(proc, on_event, subscribed))
    await subscribed.wait()
    for _ in range(20):
        workflow_id = await submit_quietly(proc, quick())
        if workflow_id is None:
            break
        ledger.accepted.append(workflow_id)
    await watcher
    assert await proc.wait() == -9
    await standin.idle(10)  # ComfyUI goes on alone: what it holds finishes while comfyd is down
    finished = finished_inside_comfyui(proc, standin)
    assert finished, f"nothing was inside ComfyUI at the kill; executed {standin.executed_prompt_ids}"
    await proc.restart()
    return finished


async def _kill_while_comfyui_down_too(proc: ComfydProcess, standin: StandInComfyUI, ledger: Ledger) -> set[str]:
    """comfyd dies while a slow job runs and one waits in ComfyUI; then ComfyUI dies too (losing both). comfyd
    comes back first (takes work while its backend is down), then ComfyUI. The running job is retried as
    attempt 2; the waiting one, which never started, is posted again; the rest run once."""
    standin.hold()
    held = await proc.submit(slow())
    ledger.accepted.append(held)
    await standin.wait_for(lambda: standin.held is not None, 10)
    ledger.accepted += [await proc.submit(quick()) for _ in range(4)]
    await standin.wait_for(lambda: len(standin.pending_prompt_ids) == 1, 10)
    waiting = wid_of(standin.pending_prompt_ids[0])
    await proc.wait_line(lambda l: l.get("event") == "workflow_started" and l.get("workflow_id") == held, 10)
    proc.kill()
    assert await proc.wait() == -9
    await standin.stop()
    standin.release()
    await proc.restart()  # ready although its only backend is down
    during = [await proc.submit(quick()) for _ in range(3)]
    ledger.accepted += during
    for workflow_id in during:
        assert (await proc.get(workflow_id))["status"] == "queued"
    ledger.comfyui_restarted()
    await standin.start()
    await proc.wait_terminal(ledger.accepted, 30)
    view = await proc.get(held)
    assert (view["attempts"], view["status"]) == (2, "completed"), (
        f"the job running when ComfyUI died should be retried as attempt 2: {view}; "
        f"posted {[b['prompt_id'] for b in standin.posted if wid_of(b['prompt_id']) == held]}\n{proc.tail(60)}")
    assert (await proc.get(waiting))["attempts"] == 1
    return set()


async def _kill_again_during_recovery(proc: ComfydProcess, standin: StandInComfyUI, ledger: Ledger) -> set[str]:
    """Killed while a slow job is held, then killed again by the restart itself, the moment its recovery hands
    the first job back to the executor; the third run recovers what the second left half-done."""
    held = await _kill_with_slow_job_held(proc, standin, ledger)
    await proc.restart(kill_when=lambda l: l.get("event") == "workflow_dispatched" and l.get("reattach") is True)
    assert await proc.wait() == -9, proc.tail()
    await proc.restart()
    await proc.wait_event("backend_up", 10)
    standin.release()
    await proc.wait_terminal([held], 20)
    assert (await proc.get(held))["attempts"] == 1
    return set()


KILL_POINTS: dict[str, Callable[[ComfydProcess, StandInComfyUI, Ledger], Awaitable[set[str]]]] = {
    "intake_burst": _kill_during_intake_burst,
    "intake_burst_full": _kill_during_intake_burst,
    "slow_job_held": _kill_while_slow_job_held,
    "nth_completion": _kill_at_nth_completion,
    "comfyui_down_too": _kill_while_comfyui_down_too,
    "again_during_recovery": _kill_again_during_recovery,
}


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
async def test_kill_point(kill_point: str, standin: StandInComfyUI, comfyd_process: MakeComfyd) -> None:
    # the intake burst also with commits in the writer thread (synchronous = FULL)
    proc = await comfyd_process(standin, env={"COMFYD_SYNCHRONOUS": "FULL"} if kill_point == "intake_burst_full"
                                else None)
    ledger = Ledger(standin)
    finished_while_down = await KILL_POINTS[kill_point](proc, standin, ledger)
    ledger.accepted += [await proc.submit(quick()) for _ in range(3)]  # and life goes on after the restart
    await check_recovered(proc, ledger, finished_while_down=finished_while_down, note=f"kill point {kill_point}")
    assert set(proc.returncodes) == {-9}


async def test_random_kill_point(standin: StandInComfyUI, comfyd_process: MakeComfyd) -> None:
    """SIGKILL at a random log line among the job transitions (set COMFYD_CRASH_SEED to replay a seed)."""
    seed = int(os.environ.get("COMFYD_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    jobs = rng.randint(8, 20)
    kill_at = rng.randint(1, 4 * jobs - 1)  # about four transition lines per job
    wait_for_comfyui = rng.random() < 0.5  # let ComfyUI finish what it holds before comfyd comes back
    note = (f"COMFYD_CRASH_SEED={seed}: {jobs} jobs, kill at transition line {kill_at}, "
            f"wait for ComfyUI {wait_for_comfyui}")
    try:
        await _random_kill(standin, comfyd_process, rng, jobs, kill_at, wait_for_comfyui, note)
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{note}\n{exc}") from exc


async def _random_kill(standin: StandInComfyUI, comfyd_process: MakeComfyd, rng: random.Random, jobs: int,
                       kill_at: int, wait_for_comfyui: bool, note: str) -> None:
    proc = await comfyd_process(standin)
    ledger = Ledger(standin)
    seen = 0

    def at_kill_point(line: dict[str, Any]) -> bool:
        nonlocal seen
        seen += line.get("event") in WORKFLOW_LOG_EVENTS
        return seen == kill_at

    proc.kill_when(at_kill_point)
    for _ in range(jobs):
        workflow_id = await submit_quietly(proc, rng.choice((quick, quick, quick, slow))())
        if workflow_id is None:
            break
        ledger.accepted.append(workflow_id)
    if proc.alive:  # the kill point is still to come: the jobs' own transitions bring it
        try:
            await proc.wait(15)
        except TimeoutError:
            proc.kill()
    assert await proc.wait() == -9
    finished: set[str] = set()
    if wait_for_comfyui:
        await standin.idle(10)
        finished = finished_inside_comfyui(proc, standin)
    await proc.restart()
    ledger.accepted += [await proc.submit(quick()) for _ in range(2)]
    await check_recovered(proc, ledger, finished_while_down=finished, note=note)


async def test_timeout_still_applies_to_a_job_running_across_a_restart(
        standin: StandInComfyUI, comfyd_process: MakeComfyd) -> None:
    """A job with a timeout that was running when comfyd died is still interrupted when its time is up."""
    proc = await comfyd_process(standin)
    standin.hold()
    held = await proc.submit(slow(), timeout=1.0)
    await standin.wait_for(lambda: standin.held is not None, 10)
    await proc.wait_line(lambda l: l.get("event") == "workflow_started" and l.get("workflow_id") == held, 10)
    proc.kill()
    assert await proc.wait() == -9
    await proc.restart()
    try:
        await standin.wait_for(lambda: standin.interrupt_calls, 10)
    except TimeoutError:
        raise AssertionError(f"the 1 s timeout of {held}, running across the restart, never fired: ComfyUI was "
                             f"not asked to interrupt it within 10 s\n{proc.tail(20)}") from None
    assert standin.interrupt_calls == [{"prompt_id": f"{held}-1"}]
    standin.release()  # the interrupt lands at the next node
    assert (await proc.wait_terminal([held], 10))[held] == "failed"
    assert (await proc.get(held))["errorType"] == "timeout"


async def test_sigterm_drains_then_restart_resumes(standin: StandInComfyUI, comfyd_process: MakeComfyd) -> None:
    """The graceful path for contrast: SIGTERM stops intake, waits out the drain deadline for a held job, exits
    0; the job still running inside ComfyUI and those still queued are picked up by the next run."""
    proc = await comfyd_process(standin, env={"COMFYD_DRAIN_SECONDS": "0.5"})
    ledger = Ledger(standin)
    standin.hold()
    held = await proc.submit(slow())
    await standin.wait_for(lambda: standin.held is not None, 10)
    ledger.accepted += [held, *[await proc.submit(quick()) for _ in range(3)]]
    assert await proc.terminate() == 0
    assert [l["event"] for l in proc.run_lines() if l.get("event") in ("drain_deadline_passed", "exited")] == [
        "drain_deadline_passed", "exited"]
    await proc.restart()
    await proc.wait_event("backend_up", 10)
    standin.release()
    ledger.accepted += [await proc.submit(quick())]
    await check_recovered(proc, ledger, note="after SIGTERM")
    assert standin.executed_prompt_ids[0] == f"{held}-1" and (await proc.get(held))["attempts"] == 1
    assert proc.returncodes == [0]
