"""The prompt queue (a heap ordered by (number, prompt_id)) and the in-memory history."""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


@dataclass
class QueueItem:
    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class Outcome:
    status_str: str  # "success" | "error"
    completed: bool
    messages: list[tuple[str, dict[str, Any]]]
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class PromptQueue:
    def __init__(self, on_update: Callable[[], None], changed: Callable[[], None]) -> None:
        self._heap: list[tuple[Any, str, int, QueueItem]] = []
        self._seq = itertools.count()
        self.running: dict[int, QueueItem] = {}
        self._task_ids = itertools.count()
        self.history: dict[str, dict[str, Any]] = {}
        self.number = 0  # POST /prompt counter, 0 at process start
        self._on_update = on_update  # broadcasts a `status`
        self._changed = changed
        self._wakeup = asyncio.Event()

    # -- numbers ------------------------------------------------------------------
    def next_number(self, body: dict[str, Any]) -> int | float:
        if "number" in body:
            return float(body["number"])
        number = self.number
        if body.get("front"):
            number = -number
        self.number += 1
        return number

    # -- queue --------------------------------------------------------------------
    def remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item.number, item.prompt_id, next(self._seq), item))
        self._wakeup.set()
        self._on_update()
        self._changed()

    async def get(self) -> tuple[int, QueueItem]:
        while not self._heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = heapq.heappop(self._heap)[3]
        task_id = next(self._task_ids)
        self.running[task_id] = item
        self._on_update()
        self._changed()
        return task_id, item

    def pending(self) -> list[QueueItem]:
        return [entry[3] for entry in self._heap]  # raw heap order, as the server shows it

    def snapshot(self) -> dict[str, Any]:
        return {
            "queue_running": [copy.deepcopy(i.as_list()) for i in self.running.values()],
            "queue_pending": [copy.deepcopy(i.as_list()) for i in self.pending()],
        }

    def delete(self, prompt_id: str) -> bool:
        for index, entry in enumerate(self._heap):
            if entry[3].prompt_id == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                self._on_update()
                self._changed()
                return True
        return False

    def wipe(self) -> None:
        self._heap = []
        self._on_update()
        self._changed()

    def running_item(self) -> QueueItem | None:
        return next(iter(self.running.values()), None)

    def task_done(self, task_id: int, outcome: Outcome) -> None:
        item = self.running.pop(task_id)
        extra = {k: v for k, v in item.extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        self.history[item.prompt_id] = {
            "prompt": [item.number, item.prompt_id, item.prompt, extra, item.outputs],
            "outputs": outcome.outputs,
            "status": {
                "status_str": outcome.status_str,
                "completed": outcome.completed,
                "messages": [[event, data] for event, data in outcome.messages],
            },
            "meta": outcome.meta,
        }
        self._on_update()
        self._changed()

    # -- history ------------------------------------------------------------------
    def get_history(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for index, (key, entry) in enumerate(self.history.items()):
            if index >= offset:
                out[key] = copy.deepcopy(entry)
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def delete_history(self, prompt_id: str) -> None:
        self.history.pop(prompt_id, None)
        self._changed()

    def wipe_history(self) -> None:
        self.history.clear()
        self._changed()
