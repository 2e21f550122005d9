"""One executor per backend (one ComfyUI server, usually one GPU): it drives the jobs the scheduler hands it.

It posts each prompt with its own ``client_id`` and a prompt_id chosen by comfyd (``<workflow>-<attempt>``,
persisted before the POST, so after a crash the prompt can be found again and is never posted twice for one
attempt), follows the WebSocket, and reports upward with ``tell``/``send`` only. It never trusts the socket
alone: a run that hears nothing for ``silence_seconds`` is checked against ``/history`` and ``/queue``, and
after a reconnect every run is reconciled the same way. Network calls run in child tasks whose results come
back as messages, so the message loop never waits on ComfyUI.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from comfyd.actors.base import Actor, MailboxFull
from comfyd.comfy import errors as comfy_errors
from comfyd.comfy.catalogue import Catalogue
from comfyd.comfy.client import BackendError, BackendUnreachable, ComfyClient, PromptRejected
from comfyd.comfy.connection import Frame, follow
from comfyd.comfy.tracker import PromptTracker
from comfyd.config import BackendConfig
from comfyd.messages import (BackendState, Interrupt, JobError, JobFinished, JobProgress, JobStarted, Message,
                             Returned, Run, Withdraw)
from comfyd.outputs.collect import collect_outputs

log = structlog.get_logger("comfyd.executor")


# -- private messages (results of child tasks and of the socket) ---------------------------------------------
class Connected(Message, frozen=True):
    pass


class Disconnected(Message, frozen=True):
    reason: str


class FrameIn(Message, frozen=True):
    frame: Frame


class Posted(Message, frozen=True):
    prompt_id: str


class Rejected(Message, frozen=True):
    prompt_id: str
    error: JobError


class Unreachable(Message, frozen=True):
    prompt_id: str
    reason: str


class Checked(Message, frozen=True):
    """Result of asking ComfyUI about a prompt: where it is now."""

    prompt_id: str
    where: str  # "history" | "running" | "pending" | "unknown" | "unreachable"
    entry: dict[str, Any] | None = None


class Done(Message, frozen=True):
    prompt_id: str
    result: JobFinished


class Tick(Message, frozen=True):
    pass


class CatalogueLoaded(Message, frozen=True):
    object_info: dict[str, Any]


@dataclass(slots=True)
class RunState:
    run: Run
    tracker: PromptTracker
    posted: bool = False
    started: bool = False
    finishing: bool = False
    checking: bool = False
    stop_reason: str | None = None  # "cancel" | "timeout" once asked to stop
    stop_asked_at: float = 0.0
    last_heard: float = field(default_factory=time.monotonic)
    reported_progress: float = -1.0
    reported_node: str | None = None
    timer: asyncio.TimerHandle | None = None


class Executor(Actor[Message]):
    mailbox_size = 4096

    def __init__(self, config: BackendConfig, scheduler: Actor[Message], session: aiohttp.ClientSession, *,
                 outputs_dir: Path, instance_id: str, cancel_grace: float = 30.0,
                 reconnect_min: float = 0.2) -> None:
        super().__init__(f"executor:{config.name}")
        self.config = config
        self.scheduler = scheduler
        self.session = session
        self.client = ComfyClient(config.url, session)
        self.outputs_dir = outputs_dir
        self.client_id = f"comfyd-{config.name}-{instance_id}"
        self.cancel_grace = cancel_grace
        self.reconnect_min = reconnect_min
        self.up = False
        self.down_since = time.monotonic()
        self.last_error: str | None = None
        self.catalogue: Catalogue | None = None
        self.runs: dict[str, RunState] = {}  # prompt_id -> state, in hand-over order
        self.by_workflow: dict[str, str] = {}
        self.needs_free = False

    @property
    def capacity(self) -> int:
        return 1 + max(0, self.config.prefetch)

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.spawn(follow(self.session, self.client.ws_url(self.client_id), on_open=self._on_open,
                          on_frame=self._on_frame, on_close=self._on_close, backoff_min=self.reconnect_min),
                   name=f"{self.name}:socket")
        self.spawn(self._ticker(), name=f"{self.name}:ticker")

    async def on_stop(self) -> None:
        for state in self.runs.values():
            if state.timer is not None:
                state.timer.cancel()

    async def _on_open(self) -> None:
        await self.send(Connected())

    async def _on_frame(self, frame: Frame) -> None:
        await self.send(FrameIn(frame=frame))

    async def _on_close(self, reason: str) -> None:
        await self.send(Disconnected(reason=reason))

    async def _ticker(self) -> None:
        interval = max(0.05, min(self.config.silence_seconds / 4, 5.0))
        while True:
            await asyncio.sleep(interval)  # periodic health of the runs; stop cancels it
            await self.send(Tick())

    # -- messages ------------------------------------------------------------------------------------------
    async def handle(self, message: Message) -> Any:
        match message:
            case Run():
                self._accept(message)
            case Interrupt():
                self._stop_run(message.workflow_id, message.reason)
            case Withdraw():
                self._withdraw(message.workflow_id)
            case CatalogueLoaded():
                self.catalogue = Catalogue(message.object_info)
            case FrameIn():
                self._frame(message.frame)
            case Posted():
                self._posted(message.prompt_id)
            case Rejected():
                self._finish(message.prompt_id, "failed", error=message.error)
            case Unreachable():
                self._unreachable(message.prompt_id, message.reason)
            case Checked():
                self._checked(message)
            case Done():
                self._done(message)
            case Connected():
                self._connected()
            case Disconnected():
                self._disconnected(message.reason)
            case Tick():
                self._tick()
            case _:
                raise TypeError(f"executor cannot handle {type(message).__name__}")

    def _accept(self, run: Run) -> None:
        state = RunState(run, PromptTracker(run.workflow))
        self.runs[run.prompt_id] = state
        self.by_workflow[run.workflow_id] = run.prompt_id
        if run.reattach:
            state.posted = True  # maybe: find out before posting again
            self._check(state)
        elif not self.up:
            self._return(state, "backend is down")
        else:
            self.spawn(self._post(state.run), name=f"{self.name}:post")

    async def _post(self, run: Run) -> None:
        if self.needs_free:  # after an out-of-memory failure, let ComfyUI release what it holds first
            self.needs_free = False
            try:
                await self.client.free()
            except (BackendUnreachable, BackendError) as exc:
                log.warning("comfyui_free_failed", backend=self.config.name, error=str(exc))
        try:
            await self.client.post_prompt(run.workflow, client_id=self.client_id, prompt_id=run.prompt_id,
                                          extra_data={"comfyd": {"workflow_id": run.workflow_id,
                                                                 "attempt": run.attempt}})
        except PromptRejected as exc:
            await self.send(Rejected(prompt_id=run.prompt_id,
                                     error=comfy_errors.from_rejected_prompt(exc.body, run.workflow)))
        except BackendUnreachable as exc:
            await self.send(Unreachable(prompt_id=run.prompt_id, reason=str(exc)))
        except BackendError as exc:
            await self.send(Rejected(prompt_id=run.prompt_id,
                                     error=JobError(error_type="internal", message=str(exc))))
        else:
            await self.send(Posted(prompt_id=run.prompt_id))

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
        tracker = state.tracker
        match frame.type:
            case "execution_start":
                self._started(state, int(data.get("timestamp") or time.time() * 1000))
            case "execution_cached":
                tracker.on_cached(data.get("nodes") or [])
            case "executing":
                if data.get("node") is None:
                    self._ended(state)  # the history entry is there now (PROTOCOL: it lags the socket)
                    return
                self._started(state, int(time.time() * 1000))
                tracker.on_executing(data["node"])
            case "progress_state":
                tracker.on_progress_state(data.get("nodes") or {})
            case "progress":
                tracker.on_progress(data.get("node"), data.get("value", 0), data.get("max", 1))
            case "executed":
                tracker.on_executed(data.get("node"), data.get("output"))
            case "execution_success":
                tracker.succeeded = True
            case "execution_error":
                tracker.error = data
            case "execution_interrupted":
                tracker.interrupted = data
        self._report_progress(state)

    def _started(self, state: RunState, timestamp: int) -> None:
        if state.started:
            return
        state.started = True
        self._report(JobStarted(workflow_id=state.run.workflow_id, backend=self.config.name,
                                       started_at=timestamp))
        if state.run.timeout:
            state.timer = asyncio.get_running_loop().call_later(
                state.run.timeout, self._timeout_due, state.run.workflow_id)

    def _timeout_due(self, workflow_id: str) -> None:
        try:
            self.tell(Interrupt(workflow_id=workflow_id, reason="timeout"))
        except Exception:  # stopping: the run ends with the executor
            pass

    def _report_progress(self, state: RunState) -> None:
        if not state.started:
            return
        progress, node = state.tracker.progress, state.tracker.current_class
        if progress == state.reported_progress and node == state.reported_node:
            return
        state.reported_progress, state.reported_node = progress, node
        self._report(JobProgress(workflow_id=state.run.workflow_id, progress=progress, current_node=node))

    def _ended(self, state: RunState) -> None:
        if state.finishing:
            return
        state.finishing = True
        self.spawn(self._conclude(state), name=f"{self.name}:conclude")

    # -- ending a run --------------------------------------------------------------------------------------
    async def _conclude(self, state: RunState, entry: dict[str, Any] | None = None) -> None:
        """Read the history entry (it lags the socket), collect outputs, and decide the job's end."""
        run, tracker = state.run, state.tracker
        if entry is None:
            entry = await self._history_with_retry(run.prompt_id)
        if entry is not None:
            tracker.on_history(entry)
        if tracker.error is not None:
            error = comfy_errors.from_execution_error(tracker.error)
            if error.error_type == "oom":
                self.needs_free = True
            result = self._result(state, "failed", error=error)
        elif tracker.interrupted is not None or (state.stop_reason and not tracker.succeeded):
            result = self._stopped_result(state)
        elif tracker.succeeded or entry is not None:
            try:
                outputs = await collect_outputs(self.client, tracker.output_list(), self.outputs_dir,
                                                local=self.config.shared_outputs)
            except (BackendUnreachable, BackendError, OSError) as exc:
                result = self._result(state, "failed", error=JobError(
                    error_type="internal", message=f"the outputs could not be collected: {exc}"))
            else:
                result = self._result(state, "completed", outputs=tuple(outputs))
        else:
            result = self._result(state, "failed", error=JobError(
                error_type="backend_lost", message="ComfyUI ended the prompt without a result"), retry=True)
        await self.send(Done(prompt_id=run.prompt_id, result=result))

    async def _history_with_retry(self, prompt_id: str, attempts: int = 20) -> dict[str, Any] | None:
        delay = 0.01
        for _ in range(attempts):
            try:
                entry = await self.client.history(prompt_id)
            except (BackendUnreachable, BackendError):
                entry = None
            if entry is not None:
                return entry
            await asyncio.sleep(delay)  # ComfyUI writes history just after the socket says so
            delay = min(delay * 2, 0.5)
        return None

    def _stopped_result(self, state: RunState) -> JobFinished:
        if state.stop_reason == "timeout":
            return self._result(state, "failed", error=JobError(
                error_type="timeout", message=f"the job ran longer than its timeout of {state.run.timeout:g}s "
                                              "and was interrupted"))
        if state.stop_reason == "cancel":
            return self._result(state, "cancelled")
        node = (state.tracker.interrupted or {}).get("node_type")
        return self._result(state, "failed", error=JobError(
            error_type="internal", message=f"the prompt was interrupted on the backend by someone else"
                                           f"{f' at {node}' if node else ''}"))

    def _result(self, state: RunState, status: str, *, outputs: tuple = (), error: JobError | None = None,
                retry: bool = False) -> JobFinished:
        return JobFinished(workflow_id=state.run.workflow_id, backend=self.config.name, status=status,  # type: ignore[arg-type]
                           outputs=outputs, error=error, retry=retry)

    def _finish(self, prompt_id: str, status: str, *, error: JobError | None = None, retry: bool = False) -> None:
        state = self.runs.get(prompt_id)
        if state is not None:
            self._done(Done(prompt_id=prompt_id, result=self._result(state, status, error=error, retry=retry)))

    def _done(self, message: Done) -> None:
        state = self.runs.pop(message.prompt_id, None)
        if state is None:
            return
        self.by_workflow.pop(state.run.workflow_id, None)
        if state.timer is not None:
            state.timer.cancel()
        self._report(message.result)

    def _return(self, state: RunState, reason: str) -> None:
        self.runs.pop(state.run.prompt_id, None)
        self.by_workflow.pop(state.run.workflow_id, None)
        self._report(Returned(workflow_id=state.run.workflow_id, backend=self.config.name, reason=reason))

    # -- cancel and timeout --------------------------------------------------------------------------------
    def _stop_run(self, workflow_id: str, reason: str) -> None:
        prompt_id = self.by_workflow.get(workflow_id)
        state = self.runs.get(prompt_id or "")
        if state is None or state.finishing:
            return
        if state.stop_reason is None:
            state.stop_reason = reason
            state.stop_asked_at = time.monotonic()
        if state.posted:
            self._ask_comfyui_to_stop(state)

    def _ask_comfyui_to_stop(self, state: RunState) -> None:
        self.spawn(self._stop_in_comfyui(state.run.prompt_id), name=f"{self.name}:stop")

    async def _stop_in_comfyui(self, prompt_id: str) -> None:
        """Waiting inside ComfyUI: delete it there. Running: interrupt that prompt only."""
        try:
            running, pending = await self.client.queue()
            if prompt_id in pending:
                await self.client.delete_pending([prompt_id])
                running, pending = await self.client.queue()
            if prompt_id in running:
                await self.client.interrupt(prompt_id)
                return  # execution_interrupted, then executing null, ends it
            await self.send(Checked(prompt_id=prompt_id, where="pending" if prompt_id in pending else "gone"))
        except (BackendUnreachable, BackendError) as exc:
            log.warning("comfyui_stop_failed", backend=self.config.name, prompt_id=prompt_id, error=str(exc))

    def _withdraw(self, workflow_id: str) -> None:
        """Outranked while waiting inside ComfyUI: take it back so a more urgent job can go first."""
        state = self.runs.get(self.by_workflow.get(workflow_id, ""))
        if state is None or state.started or state.finishing or state.stop_reason or not state.posted:
            return
        self.spawn(self._take_back(state.run.prompt_id), name=f"{self.name}:withdraw")

    async def _take_back(self, prompt_id: str) -> None:
        try:
            _, pending = await self.client.queue()
            if prompt_id not in pending:
                return
            await self.client.delete_pending([prompt_id])
            running, pending = await self.client.queue()
        except (BackendUnreachable, BackendError):
            return
        if prompt_id not in running and prompt_id not in pending:
            await self.send(Checked(prompt_id=prompt_id, where="withdrawn"))

    # -- reconciliation ------------------------------------------------------------------------------------
    def _check(self, state: RunState) -> None:
        if state.checking or state.finishing:
            return
        state.checking = True
        self.spawn(self._where_is(state.run.prompt_id), name=f"{self.name}:check")

    async def _where_is(self, prompt_id: str) -> None:
        try:
            entry = await self.client.history(prompt_id)
            if entry is not None:
                where = "history"
            else:
                running, pending = await self.client.queue()
                where = "running" if prompt_id in running else "pending" if prompt_id in pending else "unknown"
                if where == "unknown":  # it may have finished between the two calls
                    entry = await self.client.history(prompt_id)
                    where = "history" if entry is not None else "unknown"
        except (BackendUnreachable, BackendError):
            where, entry = "unreachable", None
        await self.send(Checked(prompt_id=prompt_id, where=where, entry=entry))

    def _checked(self, message: Checked) -> None:
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
                if state.stop_reason is not None:
                    self._ask_comfyui_to_stop(state)
            case "withdrawn":
                if not state.started and not state.finishing:
                    self._return(state, "outranked while waiting inside ComfyUI")
            case "gone" if state.stop_reason is not None:
                self._done(Done(prompt_id=message.prompt_id, result=self._stopped_result(state)))
            case "unknown" | "gone":
                self._lost(state)
            case "unreachable":
                pass  # the socket's reconnect loop will bring us back here

    def _lost(self, state: RunState) -> None:
        if state.stop_reason is not None:
            self._done(Done(prompt_id=state.run.prompt_id, result=self._stopped_result(state)))
        elif state.run.reattach and not state.started and not state.tracker.finished:
            # Recovered job that ComfyUI never saw (or lost before it started): post it now, same attempt.
            state.run = Run(**{**{f: getattr(state.run, f) for f in state.run.__struct_fields__}, "reattach": False})
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
                self._done(Done(prompt_id=state.run.prompt_id, result=self._stopped_result(state)))
            elif now - state.last_heard > self.config.silence_seconds:
                self._check(state)

    # -- backend health ------------------------------------------------------------------------------------
    def _connected(self) -> None:
        self.up = True
        self.last_error = None
        self.spawn(self._load_catalogue(), name=f"{self.name}:object_info")
        self._report(BackendState(backend=self.config.name, up=True))
        for state in list(self.runs.values()):
            if state.posted:
                self._check(state)  # whatever happened while we were away, ask ComfyUI

    async def _load_catalogue(self) -> None:
        try:
            await self.send(CatalogueLoaded(object_info=await self.client.object_info()))
        except (BackendUnreachable, BackendError) as exc:
            log.warning("comfyui_object_info_failed", backend=self.config.name, error=str(exc))

    def _disconnected(self, reason: str) -> None:
        self._mark_down(reason)

    def _mark_down(self, reason: str) -> None:
        self.last_error = reason
        if self.up:
            self.up = False
            self._report(BackendState(backend=self.config.name, up=False, error=reason))

    def _report(self, message: Message) -> None:
        """Tell the scheduler; under overload progress may drop, but an outcome waits for room."""
        try:
            self.scheduler.tell(message)
        except MailboxFull:
            if not isinstance(message, JobProgress):
                self.spawn(self.scheduler.send(message), name=f"{self.name}:report")

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.config.name, "url": self.config.url, "pool": self.config.pool, "gpu": self.config.gpu,
                "state": "up" if self.up else "down", "lastError": self.last_error,
                "nodeClasses": len(self.catalogue) if self.catalogue else None,
                "jobs": [s.run.workflow_id for s in self.runs.values()]}
