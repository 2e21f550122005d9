"""Following a workflow's stream events on the terminal: a redrawn bar on a TTY, plain lines elsewhere.

``[#########-----------]  45% KSampler  ETA 12s``: the ETA is the remaining percentage at the rate observed
since the job started (or was queued again).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

from comfyd.client.output import human_duration

BAR_WIDTH = 20
PLAIN_STEP = 10.0  # percentage points between plain progress lines within one node


def bar(progress: float, width: int = BAR_WIDTH) -> str:
    filled = min(width, max(0, round(progress / 100 * width)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class Eta:
    """Remaining time from the progress rate since ``reset``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._anchor: tuple[float, float] | None = None

    def reset(self, progress: float = 0.0) -> None:
        self._anchor = (self.clock(), progress)

    def seconds(self, progress: float) -> float | None:
        if self._anchor is None:
            self.reset(progress)
            return None
        start, start_progress = self._anchor
        elapsed, done = self.clock() - start, progress - start_progress
        if done <= 0 or elapsed <= 0 or progress >= 100:
            return None
        return (100 - progress) * elapsed / done


class ProgressView:
    """Shows each event of one workflow on ``stream`` (stderr); call :meth:`close` before writing anything else."""

    def __init__(self, stream: TextIO, *, tty: bool, clock: Callable[[], float] = time.monotonic,
                 columns: int | None = None) -> None:
        self.stream = stream
        self.tty = tty
        self.clock = clock
        self.columns = columns
        self.eta = Eta(clock)
        self.started: float | None = None
        self._drawn = 0  # length of the bar line on screen (TTY)
        self._last: str | None = None
        self._node: str | None = None
        self._printed: tuple[float, str | None] | None = None  # (progress, node) of the last plain progress line

    def update(self, event: dict[str, Any]) -> None:
        match event.get("type"):
            case "workflow:queued":
                self._show(f"queued, position {event.get('queuePosition', '?')}")
            case "workflow:started":
                self.started = self.clock()
                self.eta.reset(0.0)
                self._show(f"started on {event.get('backend') or '?'}")
            case "workflow:progress":
                if self.started is None:  # joined a job already running
                    self.started = self.clock()
                self._progress(float(event.get("progress") or 0.0), event.get("currentNode"))
            case "workflow:requeued":
                self.started = None
                self._show(f"requeued (attempt {event.get('attempt', '?')}): {event.get('reason', '')}", keep=True)
            case "workflow:completed":
                self._progress(100.0, self._node)
            case _:
                pass

    def elapsed(self) -> float | None:
        return None if self.started is None else self.clock() - self.started

    def close(self) -> None:
        """Leave the bar line as it is and move below it."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

    def _progress(self, progress: float, node: str | None) -> None:
        self._node = node or self._node
        eta = self.eta.seconds(progress)
        text = f"{bar(progress)} {progress:3.0f}%"
        if node:
            text += f" {node}"
        if self.tty:
            if eta is not None and eta >= 1:
                text += f"  ETA {human_duration(eta)}"
            self._draw(text)
        elif self._worth_a_line(progress, node):  # a log, not an animation: new node, 10 points more, or the end
            self._printed = (progress, node)
            self._plain(text)

    def _worth_a_line(self, progress: float, node: str | None) -> bool:
        if self._printed is None or progress >= 100:
            return True
        last_progress, last_node = self._printed
        return node != last_node or progress - last_progress >= PLAIN_STEP

    def _show(self, text: str, *, keep: bool = False) -> None:
        if not self.tty:
            self._plain(text)
            return
        self._draw(text)
        if keep:
            self.close()

    def _plain(self, text: str) -> None:
        if text != self._last:
            self._last = text
            self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self, text: str) -> None:
        columns = self.columns or shutil.get_terminal_size((80, 24)).columns
        text = text[: max(10, columns - 1)]
        pad = " " * max(0, self._drawn - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._drawn = len(text)
