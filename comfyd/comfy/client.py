"""ComfyUI's HTTP API, as the recorded traces show it (see shared/comfyui/PROTOCOL.md).

Every call raises ``BackendUnreachable`` when the server cannot be reached (refused, reset, timed out), so
the executor can tell "ComfyUI is away" from "ComfyUI said no".
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import msgspec


class BackendUnreachable(ConnectionError):
    """The ComfyUI server could not be reached."""


class PromptRejected(Exception):
    """``POST /prompt`` answered 400: the body holds ``error`` and ``node_errors``."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error", body))[:500])
        self.body = body


class BackendError(Exception):
    """ComfyUI answered something unexpected (5xx, not JSON)."""


_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()


class ComfyClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    def ws_url(self, client_id: str) -> str:
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        return f"{scheme}{self.base_url[self.base_url.index(':'):]}/ws?clientId={quote(client_id)}"

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else _encode.encode(body)
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self.session.request(method, self.base_url + path, data=data, headers=headers,
                                            timeout=self.timeout) as response:
                return response.status, await response.read()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise BackendUnreachable(f"{method} {self.base_url}{path}: {exc!r}") from exc

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        status, raw = await self._request(method, path, body)
        if status != 200:
            raise BackendError(f"{method} {path} answered {status}: {raw[:200]!r}")
        try:
            return _decode.decode(raw)
        except msgspec.DecodeError:
            raise BackendError(f"{method} {path} answered non-JSON: {raw[:200]!r}") from None

    async def post_prompt(self, prompt: dict[str, Any], *, client_id: str, prompt_id: str,
                          extra_data: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, raw = await self._request("POST", "/prompt", body)
        if status == 400:
            try:
                raise PromptRejected(_decode.decode(raw))
            except msgspec.DecodeError:
                raise BackendError(f"POST /prompt answered 400: {raw[:200]!r}") from None
        if status != 200:
            raise BackendError(f"POST /prompt answered {status}: {raw[:200]!r}")
        return _decode.decode(raw)

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry, or None while ComfyUI does not know it as finished."""
        body = await self._json("GET", f"/history/{quote(prompt_id)}")
        return body.get(prompt_id) if isinstance(body, dict) else None

    async def queue(self) -> tuple[list[str], list[str]]:
        """(running prompt ids, pending prompt ids)."""
        body = await self._json("GET", "/queue")
        return ([item[1] for item in body.get("queue_running", [])],
                [item[1] for item in body.get("queue_pending", [])])

    async def delete_pending(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", {"delete": prompt_ids})

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        await self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    async def system_stats(self) -> dict[str, Any]:
        return await self._json("GET", "/system_stats")

    async def object_info(self) -> dict[str, Any]:
        return await self._json("GET", "/object_info")

    async def download(self, *, filename: str, subfolder: str, folder_type: str, dest: Path) -> None:
        """Fetch an output through ``/view`` into ``dest`` (written to a temporary name, then renamed)."""
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        tmp = dest.with_name(dest.name + ".part")
        try:
            async with self.session.get(f"{self.base_url}/view?{query}",
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as response:
                if response.status != 200:
                    raise BackendError(f"GET /view {subfolder}/{filename} answered {response.status}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        await asyncio.to_thread(out.write, chunk)
            tmp.replace(dest)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise BackendUnreachable(f"GET /view {subfolder}/{filename}: {exc!r}") from exc
