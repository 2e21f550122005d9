"""What every client command shares: exit codes, the global options, and where their defaults come from."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the job failed, a doctor check failed, or any other API error
EXIT_USAGE = 2  # bad arguments, bad input file, configuration error, a request comfyd rejects as invalid
EXIT_CANCELLED = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_UNREACHABLE = 6
EXIT_UNAUTHORIZED = 7

EXIT_CODES_HELP = """\
exit codes:
  0  ok
  1  the job failed, a doctor check failed, or another API error
  2  usage or configuration error (also: a workflow comfyd rejects as invalid)
  3  the job was cancelled
  4  not found
  5  conflict (e.g. cancelling a job that has already finished)
  6  cannot reach comfyd (connection refused, timed out)
  7  unauthorized (missing or wrong API key)

environment:
  COMFYD_URL          default for --url (else http://127.0.0.1:9090)
  MANAGEMENT_API_KEY  default for --api-key (else MANAGEMENT_API_KEY= in /etc/comfyd/comfyd.env, if readable)
"""

DEFAULT_URL = "http://127.0.0.1:9090"
DEFAULT_TIMEOUT = 30.0
ENV_FILE = Path("/etc/comfyd/comfyd.env")


class CliError(Exception):
    """A command cannot go on: ``comfyd: <message>`` on stderr and ``code`` as the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    json: bool
    timeout: float


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--url --api-key --json --timeout``. On subcommands ``suppress`` keeps a value given before the
    subcommand (``comfyd --json list``) from being reset to the default by the subcommand's own parser."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("connection and output")
    group.add_argument("--url", default=default, help=f"comfyd's address (default: $COMFYD_URL, else {DEFAULT_URL})")
    group.add_argument("--api-key", default=default, metavar="KEY",
                       help="X-API-Key to send (default: $MANAGEMENT_API_KEY, else /etc/comfyd/comfyd.env)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="machine-readable JSON on stdout")
    group.add_argument("--timeout", type=positive_float, default=default, metavar="SECONDS",
                       help=f"per-request timeout (default {DEFAULT_TIMEOUT:g})")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def resolve(args: argparse.Namespace, env: Mapping[str, str], env_file: Path = ENV_FILE) -> Settings:
    url = (getattr(args, "url", None) or env.get("COMFYD_URL") or DEFAULT_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--url must start with http:// or https://, not {url!r}", EXIT_USAGE)
    key = getattr(args, "api_key", None) or _first_key(env.get("MANAGEMENT_API_KEY")) or key_from_env_file(env_file)
    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT
    return Settings(url=url, api_key=key, json=bool(getattr(args, "json", False)), timeout=timeout)


def _first_key(value: str | None) -> str | None:
    """The server accepts a comma-separated list of keys; a client sends one."""
    if not value:
        return None
    keys = [part.strip() for part in value.split(",") if part.strip()]
    return keys[0] if keys else None


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a systemd EnvironmentFile; empty when the file is missing or unreadable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def key_from_env_file(path: Path) -> str | None:
    return _first_key(read_env_file(path).get("MANAGEMENT_API_KEY"))
