"""PendingQueue: priority classes, FIFO inside a class, aging across classes, positions, pools."""

from __future__ import annotations

import itertools

import pytest

from comfyd.actors.pending import PendingQueue, rank_for

AGING = 600.0  # seconds, the scheduler's default
AGING_MS = int(AGING * 1000)


class Queue:
    """A PendingQueue fed the way the scheduler feeds it: rank from priority and submit time, seq in order."""

    def __init__(self) -> None:
        self.q = PendingQueue()
        self._seq = itertools.count(1)

    def submit(self, workflow_id: str, priority: str, at_ms: int, pool: str = "local") -> None:
        self.q.push(workflow_id, pool, rank_for(priority, at_ms, AGING), next(self._seq))

    def drain(self, pool: str = "local") -> list[str]:
        order = []
        while (workflow_id := self.q.pop(pool)) is not None:
            order.append(workflow_id)
        return order


def test_high_before_normal_before_low_fifo_inside_a_class() -> None:
    queue = Queue()
    submitted = [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high"), ("normal-2", "normal"),
                 ("high-2", "high"), ("low-2", "low"), ("high-3", "high")]
    for i, (workflow_id, priority) in enumerate(submitted):
        queue.submit(workflow_id, priority, at_ms=1_000_000 + i)  # all within a few ms: no aging
    assert len(queue.q) == 7
    assert queue.q.peek("local") == "high-1"
    assert queue.drain() == ["high-1", "high-2", "high-3", "normal-1", "normal-2", "low-1", "low-2"]
    assert len(queue.q) == 0


def test_fifo_inside_a_class_even_in_the_same_millisecond() -> None:
    queue = Queue()
    for i in range(50):
        queue.submit(f"job-{i}", "normal", at_ms=5_000)
    assert queue.drain() == [f"job-{i}" for i in range(50)]


def test_rank_gives_each_class_one_aging_period() -> None:
    assert rank_for("high", 1000, AGING) == 1000
    assert rank_for("normal", 1000, AGING) == 1000 + AGING_MS
    assert rank_for("low", 1000, AGING) == 1000 + 2 * AGING_MS
    with pytest.raises(KeyError):
        rank_for("urgent", 1000, AGING)


def test_a_low_job_older_than_twice_the_aging_runs_before_a_new_high_job() -> None:
    queue = Queue()
    queue.submit("old-low", "low", at_ms=0)
    queue.submit("new-high", "high", at_ms=2 * AGING_MS + 1)
    assert queue.drain() == ["old-low", "new-high"]


def test_a_low_job_younger_than_twice_the_aging_yields_to_a_new_high_job() -> None:
    queue = Queue()
    queue.submit("low", "low", at_ms=0)
    queue.submit("high", "high", at_ms=2 * AGING_MS - 1)
    assert queue.drain() == ["high", "low"]


def test_a_job_older_than_the_aging_overtakes_new_jobs_one_class_above() -> None:
    queue = Queue()
    queue.submit("old-low", "low", at_ms=0)
    queue.submit("old-normal", "normal", at_ms=0)
    queue.submit("new-normal", "normal", at_ms=AGING_MS + 1)  # the low job has waited > aging
    queue.submit("new-high", "high", at_ms=AGING_MS + 1)  # the normal job has waited > aging
    assert queue.drain() == ["old-normal", "new-high", "old-low", "new-normal"]


def test_position_is_the_number_of_jobs_before_it() -> None:
    queue = Queue()
    for i, priority in enumerate(["low", "normal", "high", "normal", "high"]):
        queue.submit(f"{priority}-{i}", priority, at_ms=10 + i)
    positions = {workflow_id: queue.q.position(workflow_id) for workflow_id in
                 ["high-2", "high-4", "normal-1", "normal-3", "low-0"]}
    assert positions == {"high-2": 0, "high-4": 1, "normal-1": 2, "normal-3": 3, "low-0": 4}
    assert queue.q.position("unknown") is None
    assert "high-2" in queue.q and "unknown" not in queue.q


def test_remove_from_the_middle_moves_the_jobs_behind_it_up() -> None:
    queue = Queue()
    for i in range(10):
        queue.submit(f"job-{i}", "normal", at_ms=100 + i)
    assert queue.q.remove("job-4") is True
    assert queue.q.remove("job-4") is False  # gone already
    assert queue.q.remove("never-there") is False
    assert "job-4" not in queue.q
    assert queue.q.position("job-4") is None
    assert [queue.q.position(f"job-{i}") for i in (0, 3, 5, 9)] == [0, 3, 4, 8]
    assert len(queue.q) == 9
    assert queue.q.pool_length("local") == 9
    assert queue.drain() == [f"job-{i}" for i in range(10) if i != 4]


def test_remove_the_head_and_the_tail() -> None:
    queue = Queue()
    for i in range(3):
        queue.submit(f"job-{i}", "high", at_ms=i)
    assert queue.q.remove("job-0") and queue.q.remove("job-2")
    assert queue.q.peek("local") == "job-1"
    assert queue.q.position("job-1") == 0


def test_pools_are_independent() -> None:
    queue = Queue()
    queue.submit("local-low", "low", at_ms=0, pool="local")
    queue.submit("salad-high", "high", at_ms=1, pool="salad")
    queue.submit("local-high", "high", at_ms=2, pool="local")
    queue.submit("salad-normal", "normal", at_ms=3, pool="salad")
    assert queue.q.position("local-low") == 1  # only the local high job is before it
    assert queue.q.position("salad-normal") == 1
    assert queue.q.pool_length("local") == 2
    assert queue.q.pool_length("salad") == 2
    assert queue.q.pool_length("nowhere") == 0
    assert queue.q.peek("nowhere") is None
    assert queue.q.pop("nowhere") is None
    queue.q.remove("salad-high")
    assert queue.q.position("local-low") == 1  # removing from another pool changes nothing here
    assert queue.drain("salad") == ["salad-normal"]
    assert queue.drain("local") == ["local-high", "local-low"]
    assert len(queue.q) == 0


def test_a_requeued_job_keeps_its_place() -> None:
    queue = Queue()
    queue.submit("first", "normal", at_ms=0)
    queue.submit("second", "normal", at_ms=1)
    rank, seq = rank_for("normal", 0, AGING), 1
    assert queue.q.pop("local") == "first"
    queue.q.push("first", "local", rank, seq)  # back from a lost backend with the same rank and seq
    assert queue.q.position("first") == 0


def test_a_hundred_thousand_jobs() -> None:
    queue = Queue()
    priorities = ("high", "normal", "low")
    n = 100_000
    for i in range(n):
        queue.submit(f"job-{i}", priorities[i % 3], at_ms=i // 10)
    assert len(queue.q) == n
    # Positions anywhere in the queue, removals from its middle, and the head are answered at this depth.
    last_low = f"job-{n - 2}"  # n - 2 is 99998, 99998 % 3 == 2: low, submitted last among the lows
    assert queue.q.position(last_low) == n - 1
    assert queue.q.position("job-0") == 0
    for i in range(1, 1000, 3):  # normals from the front of the queue
        assert queue.q.remove(f"job-{i}")
    assert queue.q.position(last_low) == n - 1 - 333
    for i in range(0, 3000, 3):
        assert queue.q.position(f"job-{i}") == i // 3
    assert queue.q.pop("local") == "job-0"
    assert len(queue.q) == n - 334
