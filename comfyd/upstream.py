"""Register comfyd itself with an upstream management API on start, as the seed's
``registerWithManagementAPI`` does: with retries and capped backoff, never failing start-up."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import structlog

from comfyd import __version__

log = structlog.get_logger("comfyd.upstream")


async def register_upstream(session: aiohttp.ClientSession, url: str, *, api_key: str, public_url: str,
                            backoff_max: float = 60.0) -> None:
    body = {"service": "comfyd", "version": __version__,
            "endpoints": {"health": f"{public_url}/health", "api": public_url},
            "capabilities": ["comfyui-queue", "priorities", "metrics", "websocket-stream"]}
    delay = min(1.0, backoff_max)
    attempt = 0
    while True:
        attempt += 1
        try:
            async with session.post(f"{url.rstrip('/')}/v1/services/register", json=body,
                                    headers={"X-API-Key": api_key}, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status < 300:
                    log.info("upstream_registered", url=url, attempt=attempt)
                    return
                reason = f"HTTP {r.status}: {(await r.text())[:200]}"
                if r.status in (400, 401, 403):
                    log.error("upstream_registration_refused", url=url, reason=reason)
                    return  # retrying will not change the answer
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("upstream_registration_failed", url=url, attempt=attempt, reason=reason, retry_in=round(delay, 1))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))  # retry pacing
        delay = min(delay * 2, backoff_max)
