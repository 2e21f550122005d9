"""Helpers to compare a live server with the recorded traces.

- :func:`load_trace` reads a copied trace (tests/comfyui_standin/traces/).
- :func:`expected_frames` / :func:`live_frames` turn trace events and live WS
  frames into the same comparable tuples (prompt ids become labels, file
  counters and random temp names become patterns, timestamps are dropped).
- :class:`WsClient` is a WebSocket client that records every frame, with a
  ping/pong :meth:`WsClient.barrier` (everything the server wrote before is
  then recorded; no sleeping).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

TRACES_DIR = Path(__file__).with_name("traces")


def load_trace(name: str) -> Any:
    """load_trace("s01") or load_trace("s01_quick_success") or load_trace("post_prompt_responses")."""
    matches = sorted(TRACES_DIR.glob(f"{name}*.json"))
    if not matches:
        raise FileNotFoundError(f"no trace {name!r} in {TRACES_DIR}")
    return json.loads(matches[0].read_text(encoding="utf-8"))


def trace_posts(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The POST /prompt exchanges of a trace, in order."""
    return [e for e in trace["events"] if e["kind"] == "http" and e["method"] == "POST" and e["path"] == "/prompt"]


def trace_http(trace: dict[str, Any], method: str, path_prefix: str) -> list[dict[str, Any]]:
    return [e for e in trace["events"] if e["kind"] == "http" and e["method"] == method and e["path"].startswith(path_prefix)]


class Labels:
    """Prompt ids -> P0, P1, ... in the order they were registered (posting order)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def add(self, prompt_id: str) -> str:
        return self.names.setdefault(prompt_id, f"P{len(self.names)}")

    def __call__(self, prompt_id: Any) -> str:
        return self.names.get(prompt_id, f"?{prompt_id}")


def norm_filename(name: str) -> str:
    name = re.sub(r"_temp_[a-z]{5}_", "_temp_xxxxx_", name)
    return re.sub(r"_\d{5}_\.png$", "_#####_.png", name)


def norm_subfolder(subfolder: str) -> str:
    return re.sub(r"\d{4}-\d{2}-\d{2}", "YYYY-MM-DD", subfolder)


def norm_images(output: Any) -> Any:
    if not isinstance(output, dict):
        return output
    return tuple(
        (norm_filename(i["filename"]), norm_subfolder(i["subfolder"]), i["type"]) for i in output.get("images", [])
    )


def norm_message(msg: dict[str, Any], label: Labels) -> tuple[Any, ...]:
    kind, data = msg["type"], msg["data"]
    if kind == "status":
        return ("status", data["status"]["exec_info"]["queue_remaining"], "sid" in data)
    if kind in ("execution_start", "execution_success"):
        return (kind, label(data["prompt_id"]))
    if kind == "execution_cached":
        return (kind, label(data["prompt_id"]), tuple(data["nodes"]))
    if kind == "progress_state":
        nodes = tuple(
            (nid, e["state"], json.dumps(e["value"]), json.dumps(e["max"]), label(e["prompt_id"]), e["node_id"],
             e["display_node_id"], e["parent_node_id"], e["real_node_id"])
            for nid, e in data["nodes"].items()
        )  # fmt: skip
        return (kind, label(data["prompt_id"]), nodes)
    if kind == "executing":
        return (kind, data["node"], label(data["prompt_id"]) if "prompt_id" in data else "-", data.get("display_node", "-"))
    if kind == "executed":
        return (kind, data["node"], data["display_node"], label(data["prompt_id"]), norm_images(data["output"]))
    if kind == "progress":
        return (kind, data["value"], data["max"], data["node"], label(data["prompt_id"]))
    if kind == "execution_error":
        return (kind, label(data["prompt_id"]), data["node_id"], data["node_type"], tuple(sorted(data["executed"])),
                data["exception_type"], data["exception_message"], tuple(sorted(data["current_outputs"])),
                tuple(sorted(data["current_inputs"])))  # fmt: skip
    if kind == "execution_interrupted":
        return (kind, label(data["prompt_id"]), data["node_id"], data["node_type"], tuple(sorted(data["executed"])))
    return (kind, json.dumps(data, sort_keys=True))


def _image_info(data: bytes) -> tuple[str, tuple[int, int], str]:
    with Image.open(io.BytesIO(data)) as img:
        return (img.format or "?", img.size, img.mode)


def norm_binary(payload: bytes, label: Labels) -> tuple[Any, ...]:
    event = struct.unpack(">I", payload[:4])[0]
    if event == 1:
        fmt = {1: "JPEG", 2: "PNG"}[struct.unpack(">I", payload[4:8])[0]]
        return ("preview", fmt, _image_info(payload[8:]))
    if event == 4:
        size = struct.unpack(">I", payload[4:8])[0]
        meta = json.loads(payload[8 : 8 + size])
        meta["prompt_id"] = label(meta["prompt_id"])
        return ("preview_meta", json.dumps(meta, sort_keys=True), _image_info(payload[8 + size :]))
    if event == 3:
        size = struct.unpack(">I", payload[4:8])[0]
        return ("text", payload[8 : 8 + size].decode(), payload[8 + size :].decode())
    return ("binary", event)


def _trace_binary(event: dict[str, Any], label: Labels) -> tuple[Any, ...]:
    decoded = event["decoded"]
    if event["event_type"] == 1:
        image = decoded["image"]
        return ("preview", decoded["image_type"], (image["format"], tuple(image["size"]), image["mode"]))
    if event["event_type"] == 4:
        meta = dict(decoded["metadata"])
        meta["prompt_id"] = label(meta["prompt_id"])
        image = decoded["image"]
        return ("preview_meta", json.dumps(meta, sort_keys=True), (image["format"], tuple(image["size"]), image["mode"]))
    if event["event_type"] == 3:
        return ("text", decoded["node_id"], decoded["text"])
    return ("binary", event["event_type"])


def expected_frames(trace: dict[str, Any], ws: str, label: Labels, *, skip: Callable[[Any], bool] | None = None) -> list[tuple[Any, ...]]:
    """Comparable frames one trace socket received, in order."""
    out = []
    for e in trace["events"]:
        if e.get("ws") != ws:
            continue
        if e["kind"] == "ws_text":
            out.append(norm_message(e["msg"], label))
        elif e["kind"] == "ws_binary":
            out.append(_trace_binary(e, label))
    return [f for f in out if not (skip and skip(f))]


def live_frames(client: WsClient, label: Labels, *, skip: Callable[[Any], bool] | None = None) -> list[tuple[Any, ...]]:
    out = []
    for kind, data in client.frames:
        out.append(norm_message(json.loads(data), label) if kind == "text" else norm_binary(data, label))
    return [f for f in out if not (skip and skip(f))]


class WsClient:
    """Records every frame of one socket; barrier() = ping -> wait for the pong."""

    def __init__(self, session: aiohttp.ClientSession, ws_url: str, client_id: str | None = None,
                 feature_flags: dict[str, Any] | None = None) -> None:  # fmt: skip
        self._session = session
        self.url = ws_url if client_id is None else f"{ws_url}?clientId={client_id}"
        self.client_id = client_id
        self.feature_flags = feature_flags
        self.frames: list[tuple[str, Any]] = []  # ("text", raw str) | ("binary", bytes)
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._pongs = 0

    async def connect(self) -> WsClient:
        self._ws = await self._session.ws_connect(self.url, autoping=False)
        if self.feature_flags is not None:
            await self._ws.send_str(json.dumps({"type": "feature_flags", "data": self.feature_flags}))
        self._reader = asyncio.create_task(self._read())
        return self

    def texts(self) -> list[dict[str, Any]]:
        return [json.loads(d) for k, d in self.frames if k == "text"]

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.frames.append(("text", msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.frames.append(("binary", msg.data))
                elif msg.type == aiohttp.WSMsgType.PONG:
                    self._pongs += 1
                elif msg.type == aiohttp.WSMsgType.PING:
                    await self._ws.pong(msg.data)
                else:
                    break
                self._notify()
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.close_code = self._ws.close_code
            self.closed.set()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[WsClient], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self.closed.is_set():
                    raise AssertionError(f"socket closed ({self.close_code}) before the condition held")
                waiter = self._changed
                await waiter.wait()

    async def wait_message(self, type_: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """The first text message of this type (and data fields) received so far or next."""

        def find() -> dict[str, Any] | None:
            for msg in self.texts():
                if msg["type"] == type_ and all(msg["data"].get(k) == v for k, v in fields.items()):
                    return msg
            return None

        await self.wait_for(lambda _: find() is not None, timeout)
        found = find()
        assert found is not None
        return found

    async def barrier(self, timeout: float = 5.0) -> None:
        """After this, every frame the server wrote before the call has been recorded."""
        assert self._ws is not None
        target = self._pongs + 1
        await self._ws.ping()
        await self.wait_for(lambda c: c._pongs >= target, timeout)

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            await self._reader
