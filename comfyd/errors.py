"""Domain errors, defined once. ``web.errors`` maps each to an HTTP status and one body shape:
``{"error": <reason phrase>, "message": <what a person can act on>, ...extra}`` as the seed's routes answer.
"""

from __future__ import annotations

from typing import Any


class ComfydError(Exception):
    status = 500
    reason = "Internal Server Error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.reason, "message": self.message, **self.extra}


class BadRequest(ComfydError):
    status = 400
    reason = "Bad Request"

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        if field is not None:
            extra["field"] = field
        super().__init__(message, **extra)


class Unauthorized(ComfydError):
    status = 401
    reason = "Unauthorized"


class NotFound(ComfydError):
    status = 404
    reason = "Not Found"


class Conflict(ComfydError):
    status = 409
    reason = "Conflict"


class PayloadTooLarge(ComfydError):
    status = 413
    reason = "Payload Too Large"


class Unavailable(ComfydError):
    """Temporarily unable to take the request (draining, database busy, mailbox full)."""

    status = 503
    reason = "Service Unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = retry_after


class StorageError(Unavailable):
    """The database refused a write (locked, full, read-only). Nothing was acknowledged."""
