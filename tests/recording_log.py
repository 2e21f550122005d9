"""A stand-in for a module's structlog logger in tests: keeps (level, event, fields) of every call."""

from __future__ import annotations

from typing import Any


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, *args: Any, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return record

    def events(self, level: str | None = None) -> list[str]:
        """Event names, of one level or of all."""
        return [event for lvl, event, _ in self.lines if level is None or lvl == level]

    def named(self, event: str) -> list[dict[str, Any]]:
        """The fields of every line with this event name."""
        return [fields for _, name, fields in self.lines if name == event]
