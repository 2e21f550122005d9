"""Internal messages between actors: frozen msgspec Structs, pure data, tagged by class name.

Wire schemas (REST bodies, ComfyUI frames, WebSocket events) live in ``comfyd.web.schemas``,
``comfyd.comfy.frames`` and ``comfyd.events``; these never leave the process.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ErrorType = Literal["validation", "oom", "node_error", "timeout", "backend_unavailable", "backend_lost",
                    "internal"]
Priority = Literal["low", "normal", "high"]
PRIORITY_CLASS: dict[str, int] = {"high": 0, "normal": 1, "low": 2}


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every internal message."""


class Output(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One file a run produced: ComfyUI's reference (``executed`` / ``/history``) plus, once the executor has
    the file on comfyd's disk, what the index records of it."""

    filename: str
    subfolder: str = ""
    folder_type: str = "output"  # ComfyUI's "type": output | temp | input
    node_id: str | None = None
    size: int | None = None
    sha256: str | None = None
    kind: str | None = None  # image | video | audio | other
    format: str | None = None  # the file extension, e.g. "png"
    width: int | None = None
    height: int | None = None

    @property
    def relpath(self) -> str:
        return f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename


class JobError(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    error_type: str
    message: str
    detail: dict[str, Any] | None = None


# --- scheduler inbox: from the web edge (asks) ----------------------------------------------------------
class Enqueue(Message, frozen=True):
    """A job already committed to the store; answer: its queue position."""

    workflow_id: str
    pool: str
    priority: str
    rank: int
    seq: int


class EnqueueMany(Message, frozen=True):
    """Jobs committed in one group commit, handed over in one message; answer: their queue positions."""

    jobs: tuple[Enqueue, ...]


class CancelJob(Message, frozen=True):
    """Answer: the job's status once cancelled (or why not)."""

    workflow_id: str


class QueuePosition(Message, frozen=True):
    workflow_id: str


class SchedulerSnapshot(Message, frozen=True):
    pass


class AddBackend(Message, frozen=True):
    """A backend joined at run time (service registry); the scheduler starts dispatching to it.
    ``executor`` is the new executor's handle."""

    name: str
    pool: str
    capacity: int
    executor: Any


class RetireBackend(Message, frozen=True):
    """A backend left (deregistered): dispatch nothing more to it; what it holds finishes there."""

    name: str


class StopIntake(Message, frozen=True):
    """Draining: dispatch nothing new."""


# --- scheduler inbox: from executors (tells) -------------------------------------------------------------
class BackendState(Message, frozen=True):
    backend: str
    up: bool
    error: str | None = None


class JobStarted(Message, frozen=True):
    workflow_id: str
    backend: str
    started_at: int


class JobProgress(Message, frozen=True):
    workflow_id: str
    progress: float
    current_node: str | None


class JobFinished(Message, frozen=True):
    """A job left its backend. ``retry`` means it never ran to an end there and may run again."""

    workflow_id: str
    backend: str
    status: Literal["completed", "failed", "cancelled"]
    outputs: tuple[Output, ...] = ()
    error: JobError | None = None
    retry: bool = False
    progress: float | None = None  # where the run got to (progress reports are folded; this is the last word)
    current_node: str | None = None


class Released(Message, frozen=True):
    """ComfyUI is done with the job's prompt (``executing {node: null}``): its slot is free for the next one
    while comfyd still reads the result, so the GPU is never kept waiting on comfyd's bookkeeping."""

    workflow_id: str
    backend: str


class Returned(Message, frozen=True):
    """The executor could not hand the job to ComfyUI at all (backend went away): queue it again as it was."""

    workflow_id: str
    backend: str
    reason: str


# --- executor inbox ----------------------------------------------------------------------------------------
class Run(Message, frozen=True):
    workflow_id: str
    prompt_id: str
    workflow: dict[str, Any]
    attempt: int
    timeout: float | None = None
    reattach: bool = False  # recovery: the prompt may already be inside ComfyUI
    was_running: bool = False  # recovery: it had started there before comfyd went down


class Interrupt(Message, frozen=True):
    """Stop a job this executor holds: delete it from ComfyUI's queue or interrupt it if running."""

    workflow_id: str
    reason: Literal["cancel", "timeout"] = "cancel"


class Withdraw(Message, frozen=True):
    """A job waiting inside ComfyUI's queue was outranked: take it back (it returns via ``Returned``)."""

    workflow_id: str
