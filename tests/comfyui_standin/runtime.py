"""One "process" of the stand-in: everything that a real restart would lose.

Also the small synchronisation helpers shared with the public object: a
:class:`Signal` notified on every state change and the test :class:`Gate`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .executor import CacheEntry, Interrupted, PromptRun
from .hub import Hub
from .prompt_queue import Outcome, PromptQueue

log = logging.getLogger(__name__)

TEMP_LETTERS = "abcdefghijklmnopqrstupvxyz"  # (sic) the alphabet PreviewImage draws from


class Signal:
    """Wake every waiter whenever anything changed; waiters re-check their predicate."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


class Gate:
    """hold()/release(): a node blocks after it started (like a long op) while the gate applies."""

    def __init__(self, signal: Signal) -> None:
        self._signal = signal
        self.closed = False
        self.node: str | None = None
        self.held: tuple[str, str] | None = None  # (prompt_id, node_id) blocked right now

    def close(self, node: str | None) -> None:
        self.closed, self.node = True, node
        self._signal.notify()

    def open(self) -> None:
        self.closed, self.node = False, None
        self._signal.notify()

    def blocks(self, node_id: str) -> bool:
        return self.closed and (self.node is None or self.node == node_id)

    async def pass_through(self, prompt_id: str, node_id: str) -> None:
        if not self.blocks(node_id):
            return
        self.held = (prompt_id, node_id)
        self._signal.notify()
        try:
            await self._signal.wait_for(lambda: not self.blocks(node_id))
        finally:
            self.held = None
            self._signal.notify()


class Runtime:
    def __init__(
        self,
        root: Path,
        node_time: float,
        history_lag: float,
        signal: Signal,
        gate: Gate,
        record: Any,
    ) -> None:
        self.output_dir = root / "output"
        self.temp_dir = root / "temp"
        self.input_dir = root / "input"
        self.models_dir = root / "models"
        self.node_time = node_time
        self.history_lag = history_lag
        self.signal = signal
        self.gate = gate
        self.record = record  # the StandInComfyUI: posted, executed_prompt_ids, ...
        self.catalog = Catalog(self.input_dir)
        self.hub = Hub(signal.notify, self.queue_info)
        self.queue = PromptQueue(self.broadcast_status, signal.notify)
        self.hub.owner = self.owner
        self.cache: dict[str, CacheEntry] = {}
        self._objects: dict[tuple[str, Any], str] = {}
        self.interrupt_requested = False
        self.current_node: str | None = None
        self.finishing = False
        self._worker: asyncio.Task[None] | None = None

    # -- status -------------------------------------------------------------------
    def queue_info(self) -> dict[str, Any]:
        return self.queue.info()

    def broadcast_status(self) -> None:
        self.hub.emit("status", {"status": self.queue.info()})

    def owner(self) -> tuple[str | None, str | None]:
        item = self.queue.running_item()
        return (item.client_id if item else None, self.current_node if item else None)

    def idle(self) -> bool:
        return self.queue.remaining() == 0 and self.hub.pending == 0 and not self.finishing

    # -- execution services ---------------------------------------------------------
    def check_interrupt(self, node_id: str) -> None:
        if self.interrupt_requested:
            self.interrupt_requested = False
            raise Interrupted(node_id)

    def interrupt(self) -> None:
        self.interrupt_requested = True
        self.signal.notify()

    async def yield_now(self) -> None:
        await asyncio.sleep(0)

    async def work(self, cost: float, prompt_id: str, node_id: str) -> None:
        """The node's own work: wait at the test gate, then take cost x node_time."""
        await self.gate.pass_through(prompt_id, node_id)
        await asyncio.sleep(self.node_time * cost if cost > 0 else 0)

    def cache_retain(self, keys: set[str], objects: set[tuple[str, Any]]) -> None:
        """Classic cache: only entries the current prompt can use survive."""
        for key in [k for k in self.cache if k not in keys]:
            del self.cache[key]
        for key in [k for k in self._objects if k not in objects]:
            del self._objects[key]

    def object_state(self, node_id: str, class_type: str) -> str:
        """Per node-object state; here PreviewImage's random `_temp_xxxxx` suffix."""
        key = (node_id, class_type)
        if key not in self._objects:
            self._objects[key] = "_temp_" + "".join(random.choice(TEMP_LETTERS) for _ in range(5))
        return self._objects[key]

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.hub.start()
        self._worker = asyncio.create_task(self._work_loop(), name="standin-prompt-worker")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        await self.hub.close()
        self.hub.abort_connections()

    async def _work_loop(self) -> None:
        while True:
            task_id, item = await self.queue.get()
            self.record.executed_prompt_ids.append(item.prompt_id)
            self.signal.notify()
            try:
                outcome = await PromptRun(self, item).execute()
            except Exception as ex:  # a stand-in bug: keep serving, let tests see it
                log.exception("stand-in worker failed on %s", item.prompt_id)
                self.record.internal_errors.append(ex)
                outcome = Outcome("error", False, [])
            self.finishing = True
            try:
                # History lags the socket: the entry appears only after the final
                # execution_* message was written, and before `executing null`.
                await self.hub.flush()
                await asyncio.sleep(self.history_lag)
                self.current_node = None
                self.queue.task_done(task_id, outcome)
                if item.client_id is not None:
                    self.hub.emit("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)
            finally:
                self.finishing = False
                self.signal.notify()
