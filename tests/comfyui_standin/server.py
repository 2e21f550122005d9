"""StandInComfyUI: the public object tests drive (lifecycle, knobs, recordings)."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from aiohttp import web

from .routes import build_app
from .runtime import Gate, Runtime, Signal


class StandInComfyUI:
    """A ComfyUI 0.3.64 look-alike on 127.0.0.1 (HTTP + WebSocket), for tests.

    ``root`` holds output/, temp/, input/ and models/. ``node_time`` is the
    time one executed node takes (ImageBlur: x max(1, blur_radius/10)).
    ``history_lag`` is the pause between the final execution_* message and the
    history write (the real server's /history lags the socket).
    """

    def __init__(
        self,
        root: Path | str,
        node_time: float = 0.002,
        *,
        port: int = 0,
        history_lag: float = 0.005,
    ) -> None:
        self.root = Path(root)
        self.node_time = node_time
        self.history_lag = history_lag
        self._port = port
        self._signal = Signal()
        self._gate = Gate(self._signal)
        self._rt: Runtime | None = None
        self._runner: web.AppRunner | None = None
        self._silent = False
        # Recordings; they survive restarts.
        self.posted: list[dict[str, Any]] = []
        self.executed_prompt_ids: list[str] = []
        self.free_calls: list[Any] = []
        self.interrupt_calls: list[Any] = []
        self.history_reads: list[str] = []  # prompt ids asked for with GET /history/{prompt_id}
        self.internal_errors: list[BaseException] = []
        self.starts = 0

    # -- paths --------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def temp_dir(self) -> Path:
        return self.root / "temp"

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def port(self) -> int:
        """The port; picked (a free one) on first use, so the URL is known before start()."""
        if not self._port:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                self._port = probe.getsockname()[1]
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    # -- lifecycle ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Start a fresh "process": empty queue/history/cache, number 0, temp/ wiped."""
        if self._runner is not None:
            raise RuntimeError("already started")
        for folder in (self.output_dir, self.input_dir, self.models_dir):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._silent = False
        rt = Runtime(self.root, self.node_time, self.history_lag, self._signal, self._gate, self)
        runner = web.AppRunner(build_app(rt), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self._port))
            sock.listen(128)
            sock.setblocking(False)
            self._port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        rt.start()
        self._rt, self._runner = rt, runner
        self.starts += 1
        self._signal.notify()

    async def stop(self) -> None:
        """Like killing the process: sockets drop without a close frame, port refuses."""
        runner, rt = self._runner, self._rt
        if runner is None or rt is None:
            return
        self._runner = None
        for site in list(runner.sites):
            await site.stop()  # refuse new connections first
        await rt.close()  # worker and sender gone; sockets aborted
        server = runner.server
        for connection in server.connections if server is not None else []:
            if connection.transport is not None:
                connection.transport.abort()  # HTTP keep-alive too: no goodbye
        await runner.cleanup()
        self._rt = None
        self._signal.notify()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- knobs --------------------------------------------------------------------
    def drop_sockets(self) -> None:
        """A network blip: every WebSocket is cut (the client sees 1006); prompts keep running."""
        self._runtime().hub.abort_connections()

    def set_silent(self, silent: bool = True) -> None:
        """Keep sockets open but send no frames at all (execution and history go on)."""
        self._silent = silent
        if self._rt is not None:
            self._rt.hub.silent = silent

    def hold(self, node_id: str | None = None) -> None:
        """Close the gate: the next executed node (any, or only `node_id`) blocks after it started.

        While blocked the prompt is running and its node is "executing"; an
        interrupt posted meanwhile lands at the next node, as on the real server.
        Calling hold() again re-targets the gate. It stays closed across restarts.
        """
        self._gate.close(node_id)

    def release(self) -> None:
        self._gate.open()

    @property
    def held(self) -> tuple[str, str] | None:
        """(prompt_id, node_id) blocked at the gate right now, else None."""
        return self._gate.held

    # -- state --------------------------------------------------------------------
    def _runtime(self) -> Runtime:
        if self._rt is None:
            raise RuntimeError("the stand-in is not running")
        return self._rt

    @property
    def running_prompt_id(self) -> str | None:
        item = self._rt.queue.running_item() if self._rt else None
        return item.prompt_id if item else None

    @property
    def running_node_id(self) -> str | None:
        return self._rt.current_node if self._rt else None

    @property
    def pending_prompt_ids(self) -> list[str]:
        return [i.prompt_id for i in self._rt.queue.pending()] if self._rt else []

    @property
    def queue_remaining(self) -> int:
        return self._rt.queue.remaining() if self._rt else 0

    @property
    def history(self) -> dict[str, Any]:
        return self._rt.queue.get_history() if self._rt else {}

    @property
    def client_ids(self) -> list[str]:
        """Client ids in the socket table (one socket per id)."""
        return list(self._rt.hub.sockets) if self._rt else []

    @property
    def is_idle(self) -> bool:
        return self._rt is None or self._rt.idle()

    async def wait_for(
        self, predicate: Callable[[], Any] | Callable[[StandInComfyUI], Any], timeout: float = 5.0
    ) -> None:
        """Wait (no polling) until predicate() - or predicate(standin) - is true."""
        takes_arg = len(inspect.signature(predicate).parameters) == 1
        check: Callable[[], Any] = (lambda: predicate(self)) if takes_arg else predicate  # type: ignore[call-arg,misc]
        try:
            async with asyncio.timeout(timeout):
                await self._signal.wait_for(lambda: bool(check()))
        except TimeoutError:
            raise TimeoutError(f"stand-in condition not met within {timeout}s") from None

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait until nothing is queued or running and every WS frame has been written."""
        await self.wait_for(lambda: self.is_idle, timeout)

    def interrupt(self) -> None:
        """Server-side global interrupt (same effect as POST /interrupt without body)."""
        self._runtime().interrupt()
