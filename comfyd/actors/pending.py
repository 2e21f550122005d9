"""The order of waiting jobs, per pool: priority classes, FIFO inside a class, aging across classes.

A job's rank is a virtual deadline: ``submitted_at + class × aging`` (high = 0, normal = 1, low = 2).
The smallest rank runs first. Within ``aging`` of each other, a high job runs before a normal one and a
normal before a low one, FIFO inside each class; a job that has waited longer than ``aging`` overtakes new
jobs one class above it, so a low job cannot starve. Ranks never change once given, so a sorted list
answers "next", "remove" and "position" in O(log n) at any queue depth.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from comfyd.messages import PRIORITY_CLASS


def rank_for(priority: str, submitted_at_ms: int, aging_seconds: float) -> int:
    return submitted_at_ms + PRIORITY_CLASS[priority] * int(aging_seconds * 1000)


class PendingQueue:
    def __init__(self) -> None:
        self._pools: dict[str, SortedList] = {}
        self._keys: dict[str, tuple[str, tuple[int, int, str]]] = {}  # workflow_id -> (pool, key)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, workflow_id: str) -> bool:
        return workflow_id in self._keys

    def push(self, workflow_id: str, pool: str, rank: int, seq: int) -> None:
        key = (rank, seq, workflow_id)
        if (jobs := self._pools.get(pool)) is None:
            jobs = self._pools[pool] = SortedList()
        jobs.add(key)
        self._keys[workflow_id] = (pool, key)

    def remove(self, workflow_id: str) -> bool:
        entry = self._keys.pop(workflow_id, None)
        if entry is None:
            return False
        pool, key = entry
        self._pools[pool].remove(key)
        return True

    def position(self, workflow_id: str) -> int | None:
        """How many jobs of the same pool will be dispatched before this one."""
        entry = self._keys.get(workflow_id)
        if entry is None:
            return None
        pool, key = entry
        return self._pools[pool].index(key)

    def peek(self, pool: str) -> str | None:
        jobs = self._pools.get(pool)
        return jobs[0][2] if jobs else None

    def pop(self, pool: str) -> str | None:
        jobs = self._pools.get(pool)
        if not jobs:
            return None
        _, _, workflow_id = jobs.pop(0)
        del self._keys[workflow_id]
        return workflow_id

    def pool_length(self, pool: str) -> int:
        return len(self._pools.get(pool, ()))
