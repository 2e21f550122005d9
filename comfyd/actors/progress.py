"""Progress of one run, reported at most once per interval.

ComfyUI sends a frame for every node that starts and every sampler step; a quick prompt produces eight
progress changes in two milliseconds. Each report is a commit, an event on every stream client's socket and
a line of work for the scheduler, so they are folded: nothing is reported in the first ``interval`` after the
run started, then at most one report per ``interval``, always with the newest value, and a change that
arrives inside an interval is sent at its end, never lost. A run that ends first reports only its outcome
(``workflow:completed`` carries progress 100). ``interval`` 0 reports every change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

Report = Callable[[float, "str | None"], None]


class ProgressReports:
    def __init__(self, interval: float, report: Report) -> None:
        self.interval = interval
        self.report = report
        self._last_sent = time.monotonic()  # the run's start: its first interval is quiet
        self._latest: tuple[float, str | None] | None = None
        self._sent: tuple[float, str | None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def update(self, progress: float, node: str | None) -> None:
        self._latest = (progress, node)
        if self._latest == self._sent or self._timer is not None:
            return  # nothing new, or already due at the end of this interval
        wait = self._last_sent + self.interval - time.monotonic()
        if wait <= 0:
            self._send()
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._latest != self._sent:
            self._send()

    def _send(self) -> None:
        assert self._latest is not None
        self._last_sent = time.monotonic()
        self._sent = self._latest
        self.report(*self._latest)

    def close(self) -> None:
        """The run ended: what is still pending is superseded by its outcome."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
