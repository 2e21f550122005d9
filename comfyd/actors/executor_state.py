"""The executor's private messages (results of its child tasks and of its socket) and its per-run state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from comfyd.actors.progress import ProgressReports
from comfyd.comfy.connection import Frame
from comfyd.comfy.tracker import PromptTracker
from comfyd.messages import JobError, JobFinished, Message, Run


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
    stop_asks: int = 0
    staged: bool = False  # held by comfyd (dispatch committed), posted the moment a prompt leaves ComfyUI
    last_heard: float = field(default_factory=time.monotonic)
    progress: ProgressReports | None = None  # from the start on
    heard_all: bool = False  # every frame since execution_start arrived on one socket: its outputs are complete
    timer: asyncio.TimerHandle | None = None  # the job's timeout

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def cancel_timers(self) -> None:
        """The run is over here: no timeout fires for it, no progress report follows."""
        if self.timer is not None:
            self.timer.cancel()
        self.close_progress()
