"""``X-API-Key`` on every ``/v1`` route and the stream, compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from comfyd.web.errors import Handler, error_response


def key_ok(presented: str | None, keys: list[bytes]) -> bool:
    if presented is None:
        return False
    candidate = presented.encode()
    ok = False
    for key in keys:  # compare with every key so timing does not tell which one matched
        ok |= hmac.compare_digest(candidate, key)
    return ok


def auth_middleware(api_keys: list[str], *, public_metrics: bool, public_health: bool):  # type: ignore[no-untyped-def]
    keys = [k.encode() for k in api_keys]
    open_paths = {"/"}
    if public_health:
        open_paths.add("/health")
    if public_metrics:
        open_paths.add("/metrics")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not keys or request.path in open_paths:
            return await handler(request)
        presented = request.headers.get("X-API-Key")
        if presented is None and request.path == "/v1/comfyui/stream":
            presented = request.query.get("apiKey")  # browsers cannot set headers on a WebSocket
        if not key_ok(presented, keys):
            reason = "missing X-API-Key header" if presented is None else "invalid API key"
            return error_response(401, "Unauthorized", reason, headers={"WWW-Authenticate": "ApiKey"})
        return await handler(request)

    return middleware
