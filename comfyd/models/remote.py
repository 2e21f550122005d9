"""Models of remote ComfyUI backends (no shared disk): ``GET {backend}/models/{folder}`` -> list of names."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from urllib.parse import quote

import aiohttp
import structlog

from comfyd.models.scan import MODEL_TYPES

log = structlog.get_logger(__name__)

DEFAULT_REMOTE_TIMEOUT = 5.0


async def fetch_remote_models(
    session: aiohttp.ClientSession,
    backend_url: str,
    folder: str,
    *,
    timeout: float = DEFAULT_REMOTE_TIMEOUT,
) -> list[str]:
    """File names ComfyUI at ``backend_url`` has in ``folder``.

    Never raises for a backend's fault: an unreachable, slow, erroring or nonsensical backend is logged and
    answers ``[]``. (A 404 means that ComfyUI has no such folder, which is not an error.)
    """
    url = f"{backend_url.rstrip('/')}/models/{quote(folder, safe='')}"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status == 404:
                log.debug("remote_models_no_folder", url=url)
                return []
            if resp.status != 200:
                log.warning("remote_models_failed", url=url, status=resp.status)
                return []
            body = await resp.json(content_type=None)
    except asyncio.CancelledError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        log.warning("remote_models_failed", url=url, error=repr(exc))
        return []
    if not isinstance(body, list) or not all(isinstance(n, str) for n in body):
        log.warning("remote_models_bad_answer", url=url, body=repr(body)[:200])
        return []
    return body


async def remote_model_entries(
    session: aiohttp.ClientSession,
    backends: Iterable[tuple[str, str]],
    types: Sequence[str],
    *,
    timeout: float = DEFAULT_REMOTE_TIMEOUT,
) -> list[dict]:
    """Listing entries for every (backend name, url) and API type, all asked concurrently."""
    jobs: list[tuple[str, str]] = []  # (backend name, type) per request
    coros = []
    for name, url in backends:
        for type_ in types:
            jobs.append((name, type_))
            # ComfyUI knows the type by its first folder name and merges the rest (t2i_adapter) itself.
            coros.append(fetch_remote_models(session, url, MODEL_TYPES[type_][0], timeout=timeout))
    results = await asyncio.gather(*coros)
    entries: list[dict] = []
    for (backend, type_), names in zip(jobs, results):
        for name in names:
            entries.append(
                {
                    "name": name,
                    "type": type_,
                    "size": None,
                    "hash": None,
                    "autov2": None,
                    "hashing": False,
                    "modifiedAt": None,
                    "backend": backend,
                }
            )
    return entries
