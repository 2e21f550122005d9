"""Writing what the commands found: results on stdout, notes and errors on stderr, tables and JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO


class Console:
    def __init__(self, stdout: TextIO, stderr: TextIO, *, json_mode: bool = False) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.json_mode = json_mode

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """Commentary for a person (progress, summaries): stderr, so stdout stays the result."""
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        self.note(f"comfyd: {message}")

    def json(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2, ensure_ascii=False))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.stdout.write(format_table(headers, rows))
        self.stdout.flush()

    def fields(self, pairs: Sequence[tuple[str, Any]]) -> None:
        """``key  value`` lines, keys aligned; pairs whose value is None or empty are left out."""
        shown = [(k, cell(v)) for k, v in pairs if v not in (None, "", [])]
        width = max((len(k) for k, _ in shown), default=0)
        for key, value in shown:
            self.line(f"{key.ljust(width)}  {value}")


def is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in texts)]) for i, h in enumerate(headers)]
    out = []
    for row in [list(headers), *texts]:
        padded = [text.ljust(width) for text, width in zip(row, widths)]
        out.append("  ".join(padded).rstrip() + "\n")
    return "".join(out)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def age(epoch_ms: int | None, now: float | None = None) -> str:
    if epoch_ms is None:
        return "-"
    now = time.time() if now is None else now
    return human_duration(now - epoch_ms / 1000)


def local_time(epoch_ms: int | None) -> str:
    if epoch_ms is None:
        return "-"
    return datetime.fromtimestamp(epoch_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def short_id(workflow_id: str) -> str:
    return workflow_id[:8]


def percent(progress: float | None) -> str:
    return "-" if progress is None else f"{progress:.0f}%"
