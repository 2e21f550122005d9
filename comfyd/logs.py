"""Logging, configured in one place: JSON lines on stdout for journald, a console renderer on a TTY.

comfyd's own loggers go straight from structlog to stdout as bytes (msgspec renders the JSON): no stdlib
``logging`` machinery on the hot path, which matters when every job transition is a line. Records of other
libraries (aiohttp, asyncio) still come through the standard library, rendered by the same processors into
the same shape. Event names are fixed snake_case; lines carry ``workflow_id``, ``backend`` and ``gpu`` where
they apply, and ``logger`` names the module.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import PurePath

import msgspec
import structlog


def _fallback(value: object) -> str:
    """What msgspec cannot encode: paths as themselves, anything else as its repr."""
    return str(value) if isinstance(value, PurePath) else repr(value)


_json = msgspec.json.Encoder(enc_hook=_fallback)


class _Timestamp:
    """``timestamp``: ISO 8601 in UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes it,
    with the date and time formatted once per second instead of once per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def _render_json(_logger: object, _name: str, event: dict[str, object]) -> bytes:
    return _json.encode(event)


class _NamedBytesLogger(structlog.BytesLogger):
    def __init__(self, name: str) -> None:
        super().__init__(sys.stdout.buffer)
        self.name = name


class _NamedPrintLogger(structlog.PrintLogger):
    def __init__(self, name: str) -> None:
        super().__init__(sys.stdout)
        self.name = name


def _factory(cls: type) -> object:
    def make(*args: object) -> object:
        return cls(str(args[0]) if args else "comfyd")

    return make


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    numeric = logging.getLevelName(level.upper())
    shared: list[structlog.types.Processor] = [structlog.processors.add_log_level, _Timestamp()]
    if use_console:
        renderer: structlog.types.Processor = structlog.dev.ConsoleRenderer()
        factory = _factory(_NamedPrintLogger)
        tail: list[structlog.types.Processor] = [renderer]
    else:
        factory = _factory(_NamedBytesLogger)
        tail = [structlog.processors.format_exc_info, _render_json]
    structlog.configure(
        processors=[*shared, structlog.stdlib.add_logger_name, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([] if use_console else [structlog.processors.format_exc_info]),
            structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
