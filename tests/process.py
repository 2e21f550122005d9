"""Run comfyd as a real process (``comfyd serve``) for crash tests: start, SIGKILL, SIGTERM, restart.

The process logs JSON lines on stdout; a reader task collects every line (``lines``, across runs) and sets an
``asyncio.Event`` per awaited event name (``event(name)``, reset on each start), so a test waits for a log
line instead of sleeping. ``kill_when(predicate)`` SIGKILLs the process synchronously from the reader the
moment a matching line is read: a precise, repeatable kill point. Each run gets its own aiohttp session with
the API key (pooled connections to a killed process are dead). The ``comfyd_process`` fixture kills whatever
is still running when the test ends, and every child also dies with the test process (PR_SET_PDEATHSIG).

    proc = await comfyd_process(standin)        # started and ready
    workflow_id = await proc.submit(graph)
    proc.kill()                                 # SIGKILL, now
    await proc.restart()                        # same data dir, same port
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("comfyd")  # the console script of the venv running the tests
COMMAND = [str(_SCRIPT), "serve"] if _SCRIPT.is_file() else [sys.executable, "-m", "comfyd.cli", "serve"]
API_KEY = "k"
TERMINAL_EVENTS = {"workflow:completed": "completed", "workflow:error": "failed",
                   "workflow:cancelled": "cancelled"}
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port nobody listens on right now (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the fixture finalizer still kills it
        pass


class ComfydExited(RuntimeError):
    """The process ended while a test was waiting for it."""


class ComfydProcess:
    def __init__(self, data_dir: Path, comfyui_url: str, outputs_dir: Path, *, port: int | None = None,
                 api_key: str = API_KEY, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.api_key = api_key
        self.env = {**os.environ, "MANAGEMENT_API_KEY": api_key, "COMFYD_PORT": str(self.port),
                    "COMFYD_DATA_DIR": str(self.data_dir), "COMFYUI_API_URL": comfyui_url,
                    "COMFYUI_OUTPUTS": str(outputs_dir), "COMFYD_LOG_FORMAT": "json", **(env or {})}
        self.env.pop("COMFYD_CONFIG", None)
        self.process: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.lines: list[dict[str, Any]] = []  # every log line of every run; non-JSON lines as {"raw": ...}
        self.runs = 0
        self.returncodes: list[int] = []
        self._events: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._kill_when: list[Callable[[dict[str, Any]], bool]] = []
        self._line_added = asyncio.Event()
        self._signalled = False

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 30.0, *,
                    kill_when: Callable[[dict[str, Any]], bool] | None = None) -> ComfydProcess:
        """Start ``comfyd serve`` and return once it logged ``listening`` (recovery is done by then).

        ``kill_when`` is armed before the process starts, so it can kill during start-up (e.g. recovery); if it
        fires before ``listening``, ``start`` returns the dead process (``wait()`` gives -9) instead of failing.
        """
        if self.alive:
            raise RuntimeError("comfyd is already running")
        await self._reap()
        self._events = {}
        self._kill_when = [kill_when] if kill_when is not None else []
        self._line_added = asyncio.Event()
        self._signalled = False
        self.runs += 1
        self.process = await asyncio.create_subprocess_exec(
            *COMMAND, env=self.env, cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=4 * 1024 * 1024,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._reader = asyncio.create_task(self._read(self.process, self.runs), name=f"comfyd-reader-{self.runs}")
        try:
            await self.wait_event("listening", timeout)
        except ComfydExited:
            if self._signalled:  # our kill_when fired during start-up
                return self
            raise
        except BaseException:
            self.kill()
            await self._reap()
            raise
        self.http = aiohttp.ClientSession(headers={"X-API-Key": self.api_key})
        return self

    async def restart(self, timeout: float = 30.0, *,
                      kill_when: Callable[[dict[str, Any]], bool] | None = None) -> ComfydProcess:
        """Start again on the same data dir and port (the previous run must have ended)."""
        if self.alive:
            raise RuntimeError("stop or kill comfyd before restarting it")
        return await self.start(timeout, kill_when=kill_when)

    def kill(self) -> None:
        """SIGKILL, immediately (synchronous: nothing else runs in between). ``wait()`` reaps it.

        ``os.kill``, not ``Process.send_signal``: the latter polls first, and a poll that reaps the dead child
        steals it from asyncio's child watcher (which then reports 255 instead of -9).
        """
        if self.alive and not self._signalled:
            assert self.process is not None
            self._signalled = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        """Await the exit (and the end of its output); the return code."""
        assert self.process is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill_and_wait(self) -> int:
        self.kill()
        return await self._reap()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), await the exit, return the exit code."""
        if self.alive and not self._signalled:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
        return await self._reap(timeout)

    def kill_when(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """SIGKILL from the reader the moment a log line matches (checked on this run's lines only)."""
        self._kill_when.append(predicate)

    async def close(self) -> None:
        """Never leave a process behind."""
        self.kill()
        try:
            await self._reap(10)
        finally:
            if self.http is not None:
                await self.http.close()
                self.http = None

    async def _reap(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        try:
            code = await self.wait(timeout)
        except TimeoutError:
            self.kill()
            code = await self.wait(timeout)
        if self.http is not None:  # its pooled connections point at a dead process
            await self.http.close()
            self.http = None
        self.returncodes.append(code)
        self._reader = None
        self.process = None
        return code

    # -- log lines -----------------------------------------------------------------------------------------
    async def _read(self, process: asyncio.subprocess.Process, run: int) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            record = parsed if isinstance(parsed, dict) else {"raw": text}
            record["_run"] = run
            self.lines.append(record)
            name = record.get("event")
            if isinstance(name, str) and name in self._events:
                self._events[name].set()
            if run == self.runs and any(predicate(record) for predicate in self._kill_when):
                self.kill()
            self._wake()
        self._wake()

    def _wake(self) -> None:
        """Wake whoever awaits a line (or the end of the output); the next waiter gets a fresh event."""
        self._line_added.set()
        self._line_added = asyncio.Event()

    def event(self, name: str) -> asyncio.Event:
        """Set once this run logged a line with ``event == name`` (also if it did before this call)."""
        if name not in self._events:
            self._events[name] = asyncio.Event()
            if any(line.get("event") == name and line["_run"] == self.runs for line in self.lines):
                self._events[name].set()
        return self._events[name]

    async def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Await this run's first log line with ``event == name``; fail early if the process exits."""
        await self.wait_line(lambda line: line.get("event") == name, timeout, what=name)
        return self.run_lines(name)[0]

    async def wait_line(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, *,
                        what: str = "a matching log line") -> dict[str, Any]:
        """Await this run's first log line that matches; fail early (with the log) if the process exits."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.run_lines():
                        if predicate(line):
                            return line
                    if self._reader is None or self._reader.done():
                        raise ComfydExited(f"comfyd exited before logging {what}:\n{self.tail()}")
                    await self._line_added.wait()
        except TimeoutError:
            raise TimeoutError(f"comfyd did not log {what} within {timeout}s:\n{self.tail()}") from None

    def run_lines(self, name: str | None = None, run: int | None = None) -> list[dict[str, Any]]:
        run = self.runs if run is None else run
        return [line for line in self.lines if line["_run"] == run and (name is None or line.get("event") == name)]

    def events(self, *names: str) -> list[dict[str, Any]]:
        """Lines of every run whose event is one of ``names``."""
        return [line for line in self.lines if line.get("event") in names]

    def tail(self, count: int = 60, lines: Iterable[dict[str, Any]] | None = None) -> str:
        chosen = list(self.lines if lines is None else lines)[-count:]
        return "\n".join(json.dumps({k: v for k, v in line.items() if k != "timestamp"}) for line in chosen)

    def errors(self) -> list[dict[str, Any]]:
        """Lines at error level (or unparsable output, e.g. a traceback) of every run."""
        return [line for line in self.lines if line.get("level") in ("error", "critical") or "raw" in line]

    def stored_jobs(self) -> dict[str, str]:
        """``{id: status}`` of every job in comfyd's database, read through a read-only connection (WAL: a
        reader never blocks comfyd). The way to find jobs committed whose 202 never reached the client."""
        uri = f"file:{self.data_dir / 'comfyd.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return dict(db.execute("SELECT id, status FROM workflows ORDER BY seq").fetchall())

    # -- REST ----------------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None, "comfyd is not running"
        async with self.http.request(method, self.url + path, **kw) as response:
            body = await response.read()
            try:
                return response.status, json.loads(body) if body else None
            except ValueError:
                return response.status, body

    async def submit(self, graph: dict[str, Any], **fields: Any) -> str:
        status, body = await self.request("POST", "/v1/comfyui/workflow", json={"workflow": graph, **fields})
        assert status == 202, body
        return str(body["workflowId"])

    async def get(self, workflow_id: str) -> dict[str, Any]:
        status, body = await self.request("GET", f"/v1/comfyui/workflow/{workflow_id}")
        assert status == 200, (workflow_id, status, body)
        return body

    async def outputs(self, workflow_id: str) -> list[dict[str, Any]]:
        status, body = await self.request("GET", "/v1/comfyui/outputs",
                                          params={"workflowId": workflow_id, "limit": "1000"})
        assert status == 200, body
        return list(body["outputs"])

    def stream(self) -> Any:
        assert self.http is not None, "comfyd is not running"
        return self.http.ws_connect(self.url + "/v1/comfyui/stream")

    async def wait_terminal(self, workflow_ids: Iterable[str], timeout: float = 30.0) -> dict[str, str]:
        """Await the end of every workflow over one stream; ``{workflowId: completed|failed|cancelled}``.

        ``subscribe`` sends each workflow's current state first, so an end before the call is not missed.
        """
        waiting = set(workflow_ids)
        ended: dict[str, str] = {}
        if not waiting:
            return ended
        async with self.stream() as ws:
            await ws.send_json({"type": "subscribe", "workflowIds": sorted(waiting)})
            try:
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        event = json.loads(message.data)
                        if event.get("type") == "error":
                            raise AssertionError(f"stream error: {event}")
                        workflow_id = event.get("workflowId")
                        if workflow_id in waiting and event["type"] in TERMINAL_EVENTS:
                            ended[workflow_id] = TERMINAL_EVENTS[event["type"]]
                            waiting.discard(workflow_id)
                            if not waiting:
                                return ended
            except TimeoutError:
                pass
        raise AssertionError(f"{len(waiting)} workflows did not end within {timeout}s: {sorted(waiting)[:5]} "
                             f"(ended: {len(ended)})\n{self.tail()}")


@pytest.fixture
async def comfyd_process(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ComfydProcess]]]:
    """``await comfyd_process(standin_or_url, start=True, **kw)`` -> a ready ComfydProcess; killed at the end."""
    made: list[ComfydProcess] = []

    async def make(backend: Any, *, start: bool = True, data_dir: Path | None = None,
                   outputs: Path | None = None, **kw: Any) -> ComfydProcess:
        url = backend if isinstance(backend, str) else backend.url
        outputs = outputs or (tmp_path / "outputs" if isinstance(backend, str) else backend.output_dir)
        proc = ComfydProcess(data_dir or tmp_path / f"comfyd{len(made)}", url, outputs, **kw)
        made.append(proc)
        if start:
            await proc.start()
        return proc

    try:
        yield make
    finally:
        for proc in made:
            await proc.close()
