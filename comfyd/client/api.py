"""comfyd's REST API and stream as the command line uses them; every failure becomes a :class:`CliError`
with the exit code it stands for."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Self

import aiohttp

from comfyd.client.options import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    Settings,
)

_STATUS_CODES = {400: EXIT_USAGE, 401: EXIT_UNAUTHORIZED, 403: EXIT_UNAUTHORIZED, 404: EXIT_NOT_FOUND,
                 409: EXIT_CONFLICT, 413: EXIT_USAGE}
CHUNK = 1 << 16


class ApiError(CliError):
    """comfyd answered with an error status; ``body`` is its JSON (``{error, message, field?, ...}``)."""

    def __init__(self, status: int, body: Any, reason: str | None = None) -> None:
        self.status = status
        self.body = body if isinstance(body, dict) else {}
        message = self.body.get("message") or (body if isinstance(body, str) and body else None) \
            or f"HTTP {status} {reason or ''}".strip()
        if status in (401, 403):
            message = f"{message} (pass --api-key or set MANAGEMENT_API_KEY)"
        elif field := self.body.get("field"):
            message = f"{message} [{field}]" if str(field) not in message else message
        super().__init__(message, _STATUS_CODES.get(status, EXIT_FAILED))


class Api:
    """An HTTP session on one comfyd. Use as ``async with Api(settings) as api``."""

    def __init__(self, settings: Settings) -> None:
        self.base = settings.url.rstrip("/")
        self.timeout = settings.timeout
        self.headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Api as an async context manager"
        return self._session

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def _unreachable(self, exc: BaseException) -> CliError:
        if isinstance(exc, TimeoutError):
            return CliError(f"comfyd at {self.base} did not answer within {self.timeout:g}s", EXIT_UNREACHABLE)
        if isinstance(exc, aiohttp.InvalidURL):
            return CliError(f"invalid URL {self.base!r}", EXIT_USAGE)
        detail = str(exc) or type(exc).__name__
        return CliError(f"cannot reach comfyd at {self.base}: {detail} (is it running? see --url)",
                        EXIT_UNREACHABLE)

    async def call(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request: ``(status, decoded body)`` for a 2xx answer, :class:`ApiError` for any other."""
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with self.session.request(method, self.url(path), params=query, json=body, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                raw = await response.read()
                status, reason = response.status, response.reason
                is_json = response.content_type == "application/json"
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
        decoded: Any = raw.decode(errors="replace")
        if is_json and raw:
            try:
                decoded = json.loads(raw)
            except ValueError:
                pass
        if status >= 400:
            raise ApiError(status, decoded, reason)
        return status, decoded

    async def get(self, path: str, **params: Any) -> Any:
        return (await self.call("GET", path, params=params))[1]

    async def stream(self) -> aiohttp.ClientWebSocketResponse:
        """Open ``/v1/comfyui/stream``. Not subscribed yet, it receives every workflow's events."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.session.ws_connect(self.url("/v1/comfyui/stream"), heartbeat=20.0)
        except aiohttp.WSServerHandshakeError as exc:
            raise ApiError(exc.status, {}, exc.message) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None

    async def download(self, url: str, dest: Path) -> tuple[int, str]:
        """Fetch ``url`` into ``dest`` (through a ``.part`` file, renamed once complete): ``(size, sha256)``."""
        part = dest.with_name(f".{dest.name}.part")
        digest, size = hashlib.sha256(), 0
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        try:
            async with self.session.get(self.url(url), timeout=timeout) as response:
                if response.status >= 400:
                    body = await response.read()
                    try:
                        decoded: Any = json.loads(body)
                    except ValueError:
                        decoded = None
                    raise ApiError(response.status, decoded, response.reason)
                with part.open("wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            os.replace(part, dest)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
        finally:
            part.unlink(missing_ok=True)
        return size, digest.hexdigest()
