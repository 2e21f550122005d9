"""One executor per backend (one ComfyUI server, usually one GPU): it drives the jobs the scheduler hands it.

It posts each prompt with its own ``client_id`` under a prompt_id chosen and persisted by comfyd before the
POST (so after a crash the prompt is found again, never posted twice), follows the WebSocket, and reports
upward with ``tell`` only. It never trusts the socket alone: silent runs, and every run after a reconnect,
are checked against ``/history`` and ``/queue``. Network calls run in child tasks whose results come back
as messages, so the message loop never waits on ComfyUI."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog

from comfyd.actors import executor_state as inbox  # the executor's private messages
from comfyd.actors.base import Actor, MailboxFull
from comfyd.actors.executor_state import RunState
from comfyd.actors.progress import ProgressReports
from comfyd.comfy import probe
from comfyd.comfy.catalogue import Catalogue
from comfyd.comfy.client import BackendError, BackendUnreachable, ComfyClient
from comfyd.comfy.connection import Frame, follow
from comfyd.comfy.outcome import conclude, job_result, stopped_result
from comfyd.comfy.tracker import PromptTracker
from comfyd.config import BackendConfig
from comfyd.messages import (
    BackendState,
    Interrupt,
    JobError,
    JobProgress,
    JobStarted,
    Message,
    Released,
    Returned,
    Run,
    Withdraw,
)

log = structlog.get_logger("comfyd.executor")


class Executor(Actor[Message]):
    mailbox_size = 4096

    def __init__(self, config: BackendConfig, scheduler: Actor[Message], session: aiohttp.ClientSession, *,
                 outputs_dir: Path, instance_id: str, cancel_grace: float = 30.0,
                 reconnect_min: float = 0.2, progress_interval: float = 0.1) -> None:
        super().__init__(f"executor:{config.name}")
        self.config = config
        self.scheduler = scheduler
        self.session = session
        self.client = ComfyClient(config.url, session)
        self.outputs_dir = outputs_dir
        self.client_id = f"comfyd-{config.name}-{instance_id}"
        self.cancel_grace = cancel_grace
        self.reconnect_min = reconnect_min
        self.progress_interval = progress_interval
        self.up = False
        self.down_since = time.monotonic()
        self.last_error: str | None = None
        self.catalogue: Catalogue | None = None
        self.retired = False  # deregistered: finishes what it holds, takes nothing new
        self.runs: dict[str, RunState] = {}  # prompt_id -> state, in hand-over order
        self.by_workflow: dict[str, str] = {}
        self.needs_free = False

    @property
    def capacity(self) -> int:
        """One running, ``prefetch`` waiting inside ComfyUI, one staged here to post the moment a prompt ends."""
        return 2 + max(0, self.config.prefetch)

    def _in_comfyui(self) -> int:
        return sum(1 for s in self.runs.values() if not s.staged and not s.finishing)

    def _post_staged(self) -> None:
        for state in self.runs.values():
            if self._in_comfyui() >= 1 + max(0, self.config.prefetch) or not self.up:
                return
            if state.staged:
                state.staged = False
                self.spawn(self._post(state.run), name=f"{self.name}:post")

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.spawn(follow(self.session, self.client.ws_url(self.client_id),
                          on_open=lambda: self.send(inbox.Connected()),
                          on_frame=lambda frame: self.send(inbox.FrameIn(frame=frame)),
                          on_close=lambda reason: self.send(inbox.Disconnected(reason=reason)),
                          backoff_min=self.reconnect_min),
                   name=f"{self.name}:socket")
        self.every(max(0.05, min(self.config.silence_seconds / 4, 5.0)), inbox.Tick)

    async def on_stop(self) -> None:
        for state in self.runs.values():
            state.cancel_timers()

    # -- messages ------------------------------------------------------------------------------------------
    async def handle(self, message: Message) -> Any:
        match message:
            case Run():
                self._accept(message)
            case Interrupt():
                self._stop_run(message.workflow_id, message.reason)
            case Withdraw():
                self._withdraw(message.workflow_id)
            case inbox.CatalogueLoaded():
                self.catalogue = Catalogue(message.object_info)
            case inbox.FrameIn():
                self._frame(message.frame)
            case inbox.Posted():
                self._posted(message.prompt_id)
            case inbox.Rejected():
                self._finish(message.prompt_id, "failed", error=message.error)
            case inbox.Unreachable():
                self._unreachable(message.prompt_id, message.reason)
            case inbox.Checked():
                self._checked(message)
            case inbox.Done():
                self._done(message)
            case inbox.Connected():
                self._connected()
            case inbox.Disconnected():
                self._mark_down(message.reason)
            case inbox.Tick():
                self._tick()
            case _:
                raise TypeError(f"executor cannot handle {type(message).__name__}")

    def _accept(self, run: Run) -> None:
        state = RunState(run, PromptTracker(run.workflow))
        self.runs[run.prompt_id] = state
        self.by_workflow[run.workflow_id] = run.prompt_id
        if run.reattach:
            state.posted = True  # maybe: find out before posting again
            state.started = run.was_running
            if run.was_running:
                self._arm_timeout(state)  # its deadline counts again from the re-attachment
            self._check(state)
        elif not self.up:
            self._return(state, "backend is down")
        elif self._in_comfyui() > 1 + max(0, self.config.prefetch):  # counts this one too
            state.staged = True
        else:
            self.spawn(self._post(state.run), name=f"{self.name}:post")

    async def _post(self, run: Run) -> None:
        free_first, self.needs_free = self.needs_free, False
        await self.send(await probe.post(self.client, run, self.client_id, free_first=free_first))

    def _posted(self, prompt_id: str) -> None:
        state = self.runs.get(prompt_id)
        if state is None:
            return
        state.posted = True
        state.last_heard = time.monotonic()
        if state.stop_reason is not None:
            self._ask_comfyui_to_stop(state)

    def _unreachable(self, prompt_id: str, reason: str) -> None:
        state = self.runs.get(prompt_id)
        if state is not None and not state.posted:
            self._return(state, reason)
        self._mark_down(reason)

    # -- frames --------------------------------------------------------------------------------------------
    def _frame(self, frame: Frame) -> None:
        data = frame.data
        prompt_id = data.get("prompt_id")
        state = self.runs.get(prompt_id) if isinstance(prompt_id, str) else None
        if state is None:
            if frame.type == "executing" and "prompt_id" not in data and data.get("node") is not None:
                for running in self.runs.values():  # reconnect mid-run (s18): the node of our running prompt
                    if running.started:
                        running.tracker.on_executing(data["node"])
                        running.last_heard = time.monotonic()
            return
        state.last_heard = time.monotonic()
        if frame.type == "execution_start":
            state.heard_all = True  # from its start on, every frame of the run comes over this socket
        match state.tracker.apply(frame.type, data):
            case "start":
                self._started(state, int(data.get("timestamp") or time.time() * 1000))
            case "end":
                self._ended(state)  # the history entry is there now (PROTOCOL: it lags the socket)
                return
        self._report_progress(state)

    def _started(self, state: RunState, timestamp: int) -> None:
        if state.started:
            return
        state.started = True
        state.progress = ProgressReports(self.progress_interval, partial(self._progress_report, state.run.workflow_id))
        self._report(JobStarted(workflow_id=state.run.workflow_id, backend=self.config.name, started_at=timestamp))
        self._arm_timeout(state)

    def _arm_timeout(self, state: RunState) -> None:
        if state.run.timeout and state.timer is None:
            state.timer = asyncio.get_running_loop().call_later(
                state.run.timeout, self._timeout_due, state.run.workflow_id)

    def _timeout_due(self, workflow_id: str) -> None:
        try:
            self.tell(Interrupt(workflow_id=workflow_id, reason="timeout"))
        except Exception:  # stopping: the run ends with the executor
            pass

    def _report_progress(self, state: RunState) -> None:
        if state.progress is not None:
            state.progress.update(state.tracker.progress, state.tracker.current_class)

    def _progress_report(self, workflow_id: str, progress: float, node: str | None) -> None:
        self._report(JobProgress(workflow_id=workflow_id, progress=progress, current_node=node))

    def _ended(self, state: RunState) -> None:
        if state.finishing:
            return
        state.finishing = True
        state.close_progress()
        self._report(Released(workflow_id=state.run.workflow_id, backend=self.config.name))
        self.spawn(self._conclude(state), name=f"{self.name}:conclude")
        self._post_staged()

    # -- ending a run --------------------------------------------------------------------------------------
    async def _conclude(self, state: RunState, entry: dict[str, Any] | None = None) -> None:
        try:
            result, oom = await conclude(self.client, state, self.config, self.outputs_dir, entry)
        except Exception as exc:  # never leave a run finishing forever
            log.exception("run_conclude_failed", backend=self.config.name, workflow_id=state.run.workflow_id)
            result, oom = job_result(state, self.config.name, "failed", error=JobError(
                error_type="internal", message=f"comfyd could not read the result: {exc!r}")), False
        if oom:
            self.needs_free = True
        await self.send(inbox.Done(prompt_id=state.run.prompt_id, result=result))

    def _finish(self, prompt_id: str, status: str, *, error: JobError | None = None, retry: bool = False) -> None:
        state = self.runs.get(prompt_id)
        if state is not None:
            result = job_result(state, self.config.name, status, error=error, retry=retry)
            self._done(inbox.Done(prompt_id=prompt_id, result=result))

    def _done(self, message: inbox.Done) -> None:
        state = self.runs.pop(message.prompt_id, None)
        if state is None:
            return
        self.by_workflow.pop(state.run.workflow_id, None)
        state.cancel_timers()
        self._report(message.result)
        self._post_staged()

    def _return(self, state: RunState, reason: str) -> None:
        state.cancel_timers()
        self.runs.pop(state.run.prompt_id, None)
        self.by_workflow.pop(state.run.workflow_id, None)
        self._report(Returned(workflow_id=state.run.workflow_id, backend=self.config.name, reason=reason))
        self._post_staged()

    # -- cancel and timeout --------------------------------------------------------------------------------
    def _stop_run(self, workflow_id: str, reason: str) -> None:
        prompt_id = self.by_workflow.get(workflow_id)
        state = self.runs.get(prompt_id or "")
        if state is None or state.finishing:
            return
        if state.stop_reason is None:
            state.stop_reason = reason
            state.stop_asked_at = time.monotonic()
        if state.staged:  # never reached ComfyUI: it ends here
            self._done(inbox.Done(prompt_id=state.run.prompt_id, result=stopped_result(state, self.config.name)))
        elif state.posted:
            self._ask_comfyui_to_stop(state)

    def _ask_comfyui_to_stop(self, state: RunState) -> None:
        state.stop_asks += 1
        self.spawn(self._ask(probe.stop, state.run.prompt_id), name=f"{self.name}:stop")

    def _withdraw(self, workflow_id: str) -> None:
        """Outranked while waiting inside ComfyUI: take it back so a more urgent job can go first."""
        state = self.runs.get(self.by_workflow.get(workflow_id, ""))
        if state is not None and state.staged:
            self._return(state, "taken back before it reached ComfyUI")
            return
        if state is None or state.started or state.finishing or state.stop_reason or not state.posted:
            return
        self.spawn(self._ask(probe.take_back, state.run.prompt_id), name=f"{self.name}:withdraw")

    # -- reconciliation ------------------------------------------------------------------------------------
    def _check(self, state: RunState) -> None:
        if state.checking or state.finishing:
            return
        state.checking = True
        self.spawn(self._ask(probe.where_is, state.run.prompt_id), name=f"{self.name}:check")

    async def _ask(self, question: Any, prompt_id: str) -> None:
        """Run one of ``comfy.probe``'s questions in a child task; its answer comes back as ``Checked``."""
        answer = await question(self.client, prompt_id)
        where, entry = answer if isinstance(answer, tuple) else (answer, None)
        await self.send(inbox.Checked(prompt_id=prompt_id, where=where, entry=entry))

    def _checked(self, message: inbox.Checked) -> None:
        state = self.runs.get(message.prompt_id)
        if state is None:
            return
        state.checking = False
        state.last_heard = time.monotonic()
        match message.where:
            case "history":
                if not state.finishing:
                    state.finishing = True
                    self.spawn(self._conclude(state, message.entry), name=f"{self.name}:conclude")
            case "running" | "pending":
                if message.where == "running":
                    self._started(state, int(time.time() * 1000))
                if state.stop_reason is not None and state.stop_asks < 3:
                    self._ask_comfyui_to_stop(state)
            case "withdrawn":
                if not state.started and not state.finishing:
                    self._return(state, "outranked while waiting inside ComfyUI")
            case "gone" if state.stop_reason is not None:
                self._done(inbox.Done(prompt_id=message.prompt_id, result=stopped_result(state, self.config.name)))
            case "unknown" | "gone":
                self._lost(state)
            case "unreachable" | "interrupting" | "running-or-gone":
                pass  # the socket (or the reconnect that follows) brings the rest

    def _lost(self, state: RunState) -> None:
        if state.stop_reason is not None:
            self._done(inbox.Done(prompt_id=state.run.prompt_id, result=stopped_result(state, self.config.name)))
        elif state.run.reattach and not state.started and not state.tracker.finished:
            # Recovered job that ComfyUI never saw (or lost before it started): post it now, same attempt.
            state.run = msgspec.structs.replace(state.run, reattach=False)
            state.posted = False
            self.spawn(self._post(state.run), name=f"{self.name}:post")
        else:
            self._finish(state.run.prompt_id, "failed", retry=True, error=JobError(
                error_type="backend_lost",
                message=f"backend {self.config.name} lost the prompt (ComfyUI restarted or dropped it)"))

    def _tick(self) -> None:
        now = time.monotonic()
        if not self.up and self.runs and now - self.down_since > self.config.silence_seconds:
            for state in list(self.runs.values()):  # away too long: let the scheduler place them elsewhere
                if not state.posted:
                    continue
                self._finish(state.run.prompt_id, "failed", retry=True, error=JobError(
                    error_type="backend_lost", message=f"backend {self.config.name} has been unreachable for "
                                                       f"{now - self.down_since:.0f}s: {self.last_error}"))
            return
        for state in list(self.runs.values()):
            if not state.posted or state.finishing or not self.up:
                continue
            if state.stop_reason is not None and now - state.stop_asked_at > self.cancel_grace:
                log.warning("comfyui_stop_unconfirmed", backend=self.config.name, workflow_id=state.run.workflow_id)
                self._done(inbox.Done(prompt_id=state.run.prompt_id, result=stopped_result(state, self.config.name)))
            elif now - state.last_heard > self.config.silence_seconds:
                self._check(state)

    # -- backend health ------------------------------------------------------------------------------------
    def _connected(self) -> None:
        self.up = True
        self.last_error = None
        self.spawn(self._load_catalogue(), name=f"{self.name}:object_info")
        self._report(BackendState(backend=self.config.name, up=True))
        for state in list(self.runs.values()):
            state.heard_all = False  # frames sent while the socket was away are lost: /history has them
            if state.posted:
                self._check(state)  # whatever happened while we were away, ask ComfyUI

    async def _load_catalogue(self) -> None:
        try:
            await self.send(inbox.CatalogueLoaded(object_info=await self.client.object_info()))
        except (BackendUnreachable, BackendError) as exc:
            log.warning("comfyui_object_info_failed", backend=self.config.name, error=str(exc))

    def _mark_down(self, reason: str) -> None:
        self.last_error = reason
        if self.up:
            self.up = False
            self.down_since = time.monotonic()
            self._report(BackendState(backend=self.config.name, up=False, error=reason))
        for state in [s for s in self.runs.values() if s.staged]:
            self._return(state, "backend is down")

    def _report(self, message: Message) -> None:
        """Tell the scheduler; under overload progress may drop, but an outcome waits for room."""
        try:
            self.scheduler.tell(message)
        except MailboxFull:
            if not isinstance(message, JobProgress):
                self.spawn(self.scheduler.send(message), name=f"{self.name}:report")

    def snapshot(self) -> dict[str, Any]:
        state = "retired" if self.retired else "up" if self.up else "down"
        return {"name": self.config.name, "url": self.config.url, "pool": self.config.pool, "gpu": self.config.gpu,
                "state": state, "lastError": self.last_error, "jobs": [s.run.workflow_id for s in self.runs.values()],
                "nodeClasses": len(self.catalogue) if self.catalogue else None}
