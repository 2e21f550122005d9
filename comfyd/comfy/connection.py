"""The executor's one WebSocket to its ComfyUI: connect, read, reconnect with capped backoff and jitter.

One clientId per executor, stable across comfyd restarts so a re-attached prompt's events still reach us.
The old socket is always closed before a new one opens: ComfyUI keeps one socket per clientId and drops
the id when *either* of two overlapping sockets closes (the duplicate-clientId trap, trace s13).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import structlog

log = structlog.get_logger("comfyd.connection")

_decode = msgspec.json.Decoder()


class Frame(msgspec.Struct, frozen=True):
    type: str
    data: dict[str, Any] = {}


_frame = msgspec.json.Decoder(Frame)


async def follow(
    session: aiohttp.ClientSession,
    url: str,
    *,
    on_open: Callable[[], Awaitable[None]],
    on_frame: Callable[[Frame], Awaitable[None]],
    on_close: Callable[[str], Awaitable[None]],
    backoff_min: float = 0.2,
    backoff_max: float = 10.0,
) -> None:
    """Run until cancelled: hold the socket open, hand every text frame to ``on_frame`` in order."""
    delay = backoff_min
    while True:
        reason = "closed"
        try:
            async with session.ws_connect(url, autoping=True, heartbeat=None, max_msg_size=0) as ws:
                delay = backoff_min
                await on_open()
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        try:
                            frame = _frame.decode(message.data)
                        except msgspec.DecodeError:
                            log.warning("comfyui_bad_frame", url=url, head=str(message.data)[:120])
                            continue
                        await on_frame(frame)
                    elif message.type == aiohttp.WSMsgType.BINARY:
                        continue  # previews and progress text: not needed to drive a job
                    elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break
                reason = f"socket closed (code {ws.close_code})"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        await on_close(reason)
        await asyncio.sleep(delay * (0.5 + random.random() / 2))  # retry pacing, not a test wait
        delay = min(delay * 2, backoff_max)
