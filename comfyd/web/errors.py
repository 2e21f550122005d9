"""Errors to HTTP, in one place: every error body is ``{"error", "message", ...}`` with JSON content type."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from comfyd.actors.base import ActorStopped, MailboxFull
from comfyd.errors import ComfydError, Unavailable
from comfyd.web.keys import SERVICE

log = structlog.get_logger("comfyd.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, reason: str, message: str, headers: dict[str, str] | None = None,
                   **extra: object) -> web.Response:
    return web.json_response({"error": reason, "message": message, **extra}, status=status, headers=headers)


def from_domain(exc: ComfydError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def response_for(request: web.Request, exc: Exception) -> web.Response:
    """The error body for what a handler raised; HTTP exceptions that are not errors (redirects) or that
    already carry a JSON body are raised again as they are."""
    if isinstance(exc, ComfydError):
        return from_domain(exc)
    if isinstance(exc, (MailboxFull, ActorStopped, asyncio.TimeoutError)):
        return error_response(503, "Service Unavailable", f"comfyd is overloaded or stopping: {exc}",
                              headers={"Retry-After": "1"})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[SERVICE].config.server.max_body_bytes
        return error_response(413, "Payload Too Large", f"the body is larger than the limit of {limit} bytes",
                              field="body", limit=limit)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400 or exc.content_type == "application/json":
            raise exc
        return error_response(exc.status, exc.reason, exc.text or exc.reason)
    if isinstance(exc, json.JSONDecodeError):
        return error_response(400, "Bad Request", f"the body is not valid JSON: {exc}", field="body")
    log.error("http_handler_failed", method=request.method, path=request.path, exc_info=exc)
    return error_response(500, "Internal Server Error", "an unexpected error occurred; see the service log")
