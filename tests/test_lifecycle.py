"""comfyd as systemd runs it: the notify protocol in order, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.harness import workflow
from tests.process import comfyd_process  # noqa: F401 - fixture


class NotifySocket:
    """A real AF_UNIX datagram socket named by NOTIFY_SOCKET, read without blocking the loop."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = str(path)
        self.messages: list[dict[str, str]] = []

    async def next(self, timeout: float = 10.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    async def until(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        async with asyncio.timeout(timeout):
            while key not in (message := await self.next(timeout)):
                pass
        return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


async def test_notify_ready_after_recovery_watchdog_then_stopping(standin, comfyd_process, notify) -> None:
    first = await comfyd_process("http://127.0.0.1:9")  # nothing there: the job stays queued
    queued = await first.submit(workflow("quick"))
    assert await first.terminate() == 0
    proc = await comfyd_process("http://127.0.0.1:9", start=False, data_dir=first.data_dir, port=first.port,
                                env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    start = asyncio.create_task(proc.start())
    ready = await notify.until("READY")
    # READY=1 comes once the database is open and recovery is done: the queued job is back, in the queue
    assert "queue 1" in ready.get("STATUS", "")
    await start
    assert (await proc.get(queued))["status"] == "queued"
    assert (await proc.get(queued))["queuePosition"] == 0
    watchdogs = 0
    while watchdogs < 2:
        watchdogs += "WATCHDOG" in await notify.next()
    code = asyncio.create_task(proc.terminate())
    stopping = await notify.until("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert await code == 0
    keys = [next(iter(m)) for m in notify.messages if m]
    assert keys.index("READY") < keys.index("STOPPING")
    assert "WATCHDOG" in keys[keys.index("READY"):keys.index("STOPPING")]


async def test_sigterm_lets_the_running_job_finish_and_keeps_the_rest_queued(standin, comfyd_process) -> None:
    proc = await comfyd_process(standin, env={"COMFYD_DRAIN_SECONDS": "30"})
    standin.hold()
    running = await proc.submit(workflow("quick", **{"1.color": 1}))
    await standin.wait_for(lambda: standin.held is not None)
    waiting = await proc.submit(workflow("quick", **{"1.color": 2}))  # prefetched into ComfyUI's queue
    await standin.wait_for(lambda: len(standin.pending_prompt_ids) == 1)
    queued = await proc.submit(workflow("quick", **{"1.color": 3}))
    code = asyncio.create_task(proc.terminate(timeout=60))
    await proc.wait_event("shutting_down")
    # draining: no new work is taken, and the prompt waiting inside ComfyUI is taken back
    status, body = await proc.request("POST", "/v1/comfyui/workflow", json={"workflow": workflow("quick")})
    assert status == 503 and "shutting down" in body["message"]
    await standin.wait_for(lambda: standin.pending_prompt_ids == [])
    standin.release()
    assert await code == 0
    assert [p.rsplit("-", 1)[0] for p in standin.executed_prompt_ids] == [running]
    await proc.restart()
    assert (await proc.get(running))["status"] == "completed"
    assert {(await proc.get(w))["status"] for w in (waiting, queued)} <= {"queued", "running", "completed"}
    ends = await proc.wait_terminal([waiting, queued])
    assert ends == {waiting: "completed", queued: "completed"}
    assert [p.rsplit("-", 1)[0] for p in standin.executed_prompt_ids] == [running, waiting, queued]
