"""comfyd.sdnotify against a real AF_UNIX datagram socket, as systemd would listen on it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfyd.sdnotify import SystemdNotifier, watchdog_loop

RECV_TIMEOUT = 5.0


class Listener:
    """The service manager's end: a bound datagram socket we read with a timeout (never a sleep)."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what goes into NOTIFY_SOCKET

    def recv(self, timeout: float = RECV_TIMEOUT) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    async def recv_async(self, timeout: float = RECV_TIMEOUT) -> str:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        return (await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)).decode()

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield Listener(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def notifier(listener: Listener) -> Iterator[SystemdNotifier]:
    with SystemdNotifier.from_env() as n:
        yield n


def test_messages_arrive_in_order_with_exact_format(listener: Listener, notifier: SystemdNotifier) -> None:
    assert notifier.enabled
    assert notifier.ready() is True
    assert notifier.status("serving on 127.0.0.1:9090")
    assert notifier.watchdog()
    assert notifier.extend_timeout(5_000_000)
    assert notifier.stopping()
    assert notifier.notify(STATUS="draining 2 jobs", ERRNO=0)
    assert notifier.send("FDSTORE=0\n")

    assert listener.recv() == "READY=1\n"
    assert listener.recv() == "STATUS=serving on 127.0.0.1:9090\n"
    assert listener.recv() == "WATCHDOG=1\n"
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=5000000\n"
    assert listener.recv() == "STOPPING=1\n"
    assert listener.recv() == "STATUS=draining 2 jobs\nERRNO=0\n"
    assert listener.recv() == "FDSTORE=0\n"
    listener.assert_empty()


def test_status_rides_along_and_newlines_cannot_inject_fields(
    listener: Listener, notifier: SystemdNotifier
) -> None:
    notifier.ready(status="up")
    notifier.status("line one\nREADY=1")
    assert listener.recv() == "READY=1\nSTATUS=up\n"
    assert listener.recv() == "STATUS=line one READY=1\n"


def test_reloading_carries_monotonic_usec(listener: Listener, notifier: SystemdNotifier) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = listener.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2:] == [""]  # the message ends with a newline and holds nothing else


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"comfyd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with SystemdNotifier.from_env() as notifier:
            assert notifier.enabled
            assert notifier.ready(status="abstract")
        sock.settimeout(RECV_TIMEOUT)
        assert sock.recv(4096) == b"READY=1\nSTATUS=abstract\n"


def test_unset_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.DEBUG, logger="comfyd.sdnotify")
    with SystemdNotifier.from_env() as notifier:
        assert not notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
        assert notifier._sock is None  # not even a socket was opened
    assert caplog.records == []


def test_empty_socket_variable_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    with SystemdNotifier.from_env() as notifier:
        assert not notifier.enabled
        assert notifier.ready() is False


def test_missing_socket_does_not_raise_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    caplog.set_level(logging.DEBUG, logger="comfyd.sdnotify")
    with SystemdNotifier.from_env() as notifier:
        assert notifier.enabled
        for _ in range(5):
            assert notifier.ready() is False
            assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify_failed" in warnings[0].getMessage()


def test_unsupported_address_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with SystemdNotifier.from_env() as notifier:
        assert not notifier.enabled
        assert notifier.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("", None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1000", "self", 0.0005),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1), None: None}
    notifier = SystemdNotifier("/run/systemd/notify", watchdog_usec=usec, watchdog_pid=pids.get(pid, pid))
    assert notifier.watchdog_interval() == expected


def test_watchdog_interval_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SystemdNotifier.from_env().watchdog_interval() == 10.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert SystemdNotifier.from_env().watchdog_interval() is None


async def test_watchdog_loop_pings_and_stops_promptly(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # 20 ms period: a ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    stop = asyncio.Event()
    with SystemdNotifier.from_env() as notifier:
        assert notifier.watchdog_interval() == 0.01
        task = asyncio.create_task(watchdog_loop(notifier, stop))
        assert await listener.recv_async() == "WATCHDOG=1\n"
        assert await listener.recv_async() == "WATCHDOG=1\n"
        assert await listener.recv_async() == "WATCHDOG=1\n"
        stop.set()
        await asyncio.wait_for(task, 1.0)
    assert task.result() is None


async def test_watchdog_loop_returns_at_once_on_stop_even_with_a_long_period(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(3600 * 1_000_000))  # one ping per half hour
    stop = asyncio.Event()
    with SystemdNotifier.from_env() as notifier:
        task = asyncio.create_task(watchdog_loop(notifier, stop))
        assert await listener.recv_async() == "WATCHDOG=1\n"  # the first ping goes out immediately
        stop.set()
        await asyncio.wait_for(task, 1.0)


async def test_watchdog_loop_without_watchdog_returns_immediately(listener: Listener) -> None:
    stop = asyncio.Event()
    with SystemdNotifier.from_env() as notifier:  # NOTIFY_SOCKET set, WATCHDOG_USEC not
        await asyncio.wait_for(watchdog_loop(notifier, stop), 1.0)
    listener.assert_empty()


async def test_watchdog_loop_without_socket_returns_immediately(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    await asyncio.wait_for(watchdog_loop(SystemdNotifier.from_env(), asyncio.Event()), 1.0)


async def test_watchdog_loop_is_cancellable(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(3600 * 1_000_000))
    with SystemdNotifier.from_env() as notifier:
        task = asyncio.create_task(watchdog_loop(notifier, asyncio.Event()))
        assert await listener.recv_async() == "WATCHDOG=1\n"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
