"""Progress reports of one run: folded to one per interval, newest value wins, nothing after the end."""

from __future__ import annotations

import asyncio

from comfyd.actors.progress import ProgressReports

WAIT = 5.0


class Sink:
    def __init__(self) -> None:
        self.reports: list[tuple[float, str | None]] = []
        self.arrived = asyncio.Event()

    def __call__(self, progress: float, node: str | None) -> None:
        self.reports.append((progress, node))
        self.arrived.set()


async def test_every_change_is_reported_with_interval_zero() -> None:
    sink = Sink()
    reports = ProgressReports(0.0, sink)
    for update in [(0.0, None), (0.0, "EmptyImage"), (0.0, "EmptyImage"), (50.0, "EmptyImage"), (50.0, "Save")]:
        reports.update(*update)
    assert sink.reports == [(0.0, None), (0.0, "EmptyImage"), (50.0, "EmptyImage"), (50.0, "Save")]


async def test_changes_inside_an_interval_fold_into_one_report_of_the_newest() -> None:
    sink = Sink()
    reports = ProgressReports(0.05, sink)
    reports.update(10.0, "A")
    reports.update(20.0, "B")
    reports.update(30.0, "C")
    assert sink.reports == []  # the first interval after the start is quiet
    await asyncio.wait_for(sink.arrived.wait(), WAIT)
    assert sink.reports == [(30.0, "C")]
    sink.arrived.clear()
    reports.update(40.0, "C")  # within the next interval: sent at its end, not lost
    await asyncio.wait_for(sink.arrived.wait(), WAIT)
    assert sink.reports == [(30.0, "C"), (40.0, "C")]


async def test_a_run_that_ends_inside_the_first_interval_reports_nothing() -> None:
    sink = Sink()
    reports = ProgressReports(0.05, sink)
    reports.update(33.3, "EmptyImage")
    reports.close()
    late = ProgressReports(0.05, Sink())  # a second run's report proves the first timer's time has passed
    late.update(1.0, None)
    await asyncio.wait_for(late.report.arrived.wait(), WAIT)  # type: ignore[attr-defined]
    assert sink.reports == []


async def test_an_unchanged_value_is_not_reported_again() -> None:
    sink = Sink()
    reports = ProgressReports(0.0, sink)
    reports.update(50.0, "KSampler")
    reports.update(50.0, "KSampler")
    assert sink.reports == [(50.0, "KSampler")]
