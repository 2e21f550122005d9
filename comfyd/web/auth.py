"""``X-API-Key`` on every ``/v1`` route and the stream, compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from comfyd.web.errors import error_response


def key_ok(presented: str | None, keys: list[bytes]) -> bool:
    if presented is None:
        return False
    candidate = presented.encode()
    ok = False
    for key in keys:  # compare with every key so timing does not tell which one matched
        ok |= hmac.compare_digest(candidate, key)
    return ok


class ApiKeyGate:
    """Decides whether a request may pass: every ``/v1`` route and the stream need a key, a few paths are open."""

    def __init__(self, api_keys: list[str], *, public_metrics: bool, public_health: bool) -> None:
        self.keys = [k.encode() for k in api_keys]
        self.open_paths = {"/"}
        if public_health:
            self.open_paths.add("/health")
        if public_metrics:
            self.open_paths.add("/metrics")

    def refuse(self, request: web.Request) -> web.Response | None:
        """The 401 for a request without a valid key, or None to let it through."""
        if not self.keys or request.path in self.open_paths:
            return None
        presented = request.headers.get("X-API-Key")
        if presented is None and request.path == "/v1/comfyui/stream":
            presented = request.query.get("apiKey")  # browsers cannot set headers on a WebSocket
        if key_ok(presented, self.keys):
            return None
        reason = "missing X-API-Key header" if presented is None else "invalid API key"
        return error_response(401, "Unauthorized", reason, headers={"WWW-Authenticate": "ApiKey"})
