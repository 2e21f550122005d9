"""Shared helpers for the ``scripts/bench_*.py`` benchmarks (not a benchmark itself).

Machine facts, percentiles, free ports, a ``comfyd serve`` subprocess with its log in a file, ``wrk`` runs
and their parsed output. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
COMFYD = VENV_BIN / "comfyd"
QUICK = ROOT / "tests" / "workflows" / "quick.json"
API_KEY = "bench-key"


# -- machine and numbers ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
                            "loadavg": os.getloadavg()}
    with contextlib.suppress(ImportError):
        import aiohttp
        info["aiohttp"] = aiohttp.__version__
    with contextlib.suppress(ImportError):
        import msgspec
        info["msgspec"] = msgspec.__version__
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["mem_gb"] = round(int(mem) / 1024 / 1024, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "comfyd"],
                               capture_output=True, text=True, check=True).stdout.strip()
        info["revision"] = head + (" + uncommitted changes in comfyd/" if dirty else "")
    return info


def print_machine() -> dict[str, Any]:
    info = machine_info()
    print(f"machine: nproc={info['nproc']} cpu={info['cpu']!r} mem={info.get('mem_gb')} GB "
          f"python={info['python']} aiohttp={info.get('aiohttp')} msgspec={info.get('msgspec')} "
          f"loadavg={' '.join(f'{x:.2f}' for x in info['loadavg'])} comfyd={info.get('revision')}")
    return info


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``median (min–max, n=N)``."""
    if not values:
        return "n/a"
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))}, n={len(values)})"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int = 65536) -> int:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, timeout: float, ok: Iterable[int] = (200,), interval: float = 0.01) -> float:
    """Poll until ``url`` answers with one of ``ok``; return the monotonic time it did."""
    ok = set(ok)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(url, timeout=1.0)
            if status in ok:
                return time.monotonic()
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer {sorted(ok)} within {timeout}s")


# -- cleanup: every child this benchmark started dies with it ----------------------------------------------
_CHILDREN: list[subprocess.Popen[bytes]] = []


def track(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _CHILDREN.append(process)
    return process


def _kill_children() -> None:
    for process in _CHILDREN:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                process.wait(5)


def install_cleanup() -> None:
    """SIGTERM/SIGHUP end the benchmark like Ctrl-C (``finally`` blocks run); at exit, any child still alive
    (started through ``track``) is killed by its pid."""
    import atexit

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    atexit.register(_kill_children)


# -- comfyd as a subprocess ---------------------------------------------------------------------------------
class ComfydServe:
    """``comfyd serve`` in its own process group, JSON log lines in ``log_path``."""

    def __init__(self, data_dir: Path, comfyui_url: str, *, port: int | None = None, outputs: Path | None = None,
                 toml: str = "", env: dict[str, str] | None = None, source: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.source = source  # run comfyd from another source tree (python -m comfyd, PYTHONPATH=source)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.data_dir / "comfyd.log"
        config = self.data_dir / "comfyd.toml"
        config.write_text(toml)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYD_", "COMFYUI_"))}
        self.env.update({"MANAGEMENT_API_KEY": API_KEY, "COMFYD_PORT": str(self.port),
                         "COMFYD_DATA_DIR": str(self.data_dir), "COMFYD_LOG_FORMAT": "json",
                         "COMFYD_CONFIG": str(config)})
        if comfyui_url:  # else the backends come from the TOML
            self.env["COMFYUI_API_URL"] = comfyui_url
        if outputs is not None:
            self.env["COMFYUI_OUTPUTS"] = str(outputs)
        if source is not None:
            self.env["PYTHONPATH"] = str(source)
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True, timeout: float = 60.0) -> float:
        """Spawn; with ``wait`` return once /health answers. Returns the monotonic spawn time. If the port was
        taken meanwhile (a shared machine), start again on another free port."""
        for attempt in range(3):
            started = self._spawn()
            if not wait:
                return started
            try:
                self.wait_ready(timeout)
                return started
            except RuntimeError:
                if attempt == 2 or "address already in use" not in self.tail().lower():
                    raise
                self.port = free_port()
                self.env["COMFYD_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def _spawn(self) -> float:
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.started_at = time.monotonic()
        command = [str(COMFYD), "serve"] if self.source is None else [python(), "-m", "comfyd", "serve"]
        # python -m puts the working directory first on sys.path: run from the source tree itself
        cwd = str(self.source) if self.source is not None else str(ROOT)
        self.process = track(subprocess.Popen(command, env=self.env, cwd=cwd, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        return self.started_at

    def wait_ready(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"comfyd exited with {self.process.returncode}; log:\n{self.tail()}")
            try:
                status, _ = http_get(self.url + "/health", timeout=1.0)
                if status == 200:
                    return time.monotonic()
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.005)
        raise TimeoutError(f"comfyd not ready after {timeout}s; log:\n{self.tail()}")

    def log_lines(self, since_start: bool = True) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(self._log_offset)
            out = []
            for raw in f:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    out.append({"raw": raw.decode(errors="replace")})
            return out

    def find_log(self, event: str) -> dict[str, Any] | None:
        for line in self.log_lines():
            if line.get("event") == event:
                return line
        return None

    def tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it overruns ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)


# -- wrk ---------------------------------------------------------------------------------------------------
POST_LUA = """\
local f = assert(io.open({body_path!r}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = {api_key!r}
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def have_wrk() -> str | None:
    return shutil.which("wrk")


def write_post_lua(directory: Path, body: bytes, api_key: str = API_KEY) -> Path:
    body_path = directory / "body.json"
    body_path.write_bytes(body)
    script = directory / "post.lua"
    script.write_text(POST_LUA.replace("{body_path!r}", json.dumps(str(body_path)))
                      .replace("{api_key!r}", json.dumps(api_key)))
    return script


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, script: Path, *, duration: float, connections: int, threads: int,
            timeout: float = 10.0) -> dict[str, Any]:
    """Run wrk --latency and parse: rps, p50/p75/p90/p99 (ms), requests, errors, non2xx."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", f"--timeout={timeout:g}s", "--latency",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    result: dict[str, Any] = {"raw": out, "non2xx": 0, "socket_errors": ""}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        result["requests"] = int(m.group(1))
    for q in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s+{q}%\s+(\S+)", out, re.MULTILINE):
            result[f"p{q}"] = _ms(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        result["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors:(.*)", out):
        result["socket_errors"] = m.group(1).strip()
    if "rps" not in result:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    return result


def python() -> str:
    """The interpreter to run helper processes with (the venv's when present)."""
    venv = VENV_BIN / "python"
    return str(venv) if venv.exists() else sys.executable


# -- py-spy profiles ----------------------------------------------------------------------------------------
# (category, substrings): a sample goes to the first category whose pattern matches the frame nearest the leaf
INTAKE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("logging: structlog → stdlib logging → JSON → stdout", ("structlog/", "logging/__init__", "comfyd/logs.py")),
    ("SQLite: aiosqlite hand-offs + group-commit loop", ("aiosqlite/", "comfyd/store/db.py", "sqlite3")),
    ("metrics: middleware + prometheus_client", ("prometheus_client/", "metrics_mw.py", "comfyd/metrics.py")),
    ("body decode + shape checks (msgspec, workflow.py)", ("decode_submit", "check_workflow", "msgspec")),
    ("prefix_outputs (filename_prefix rewrite)", ("prefix_outputs",)),
    ("scheduler actor: Enqueue, position, gauges, publish", ("comfyd/actors/scheduler.py", "comfyd/actors/pending.py",
                                                           "sortedcontainers/", "comfyd/actors/broadcaster.py",
                                                           "comfyd/events.py")),
    ("actor runtime: ask/mailbox/futures", ("comfyd/actors/base.py", "asyncio/queues.py", "asyncio/tasks.py:wait_for",
                                           "wait_for (asyncio/tasks.py")),
    ("job row: insert statement, msgspec encode", ("comfyd/store/jobs.py",)),
    ("uuid4", ("uuid.py",)),
    ("json_response (stdlib json encode)", ("json/encoder", "json/__init__", "json_response")),
    ("auth + error middlewares", ("comfyd/web/auth.py", "hmac.py", "comfyd/web/errors.py")),
    ("submit handler's own lines", ("comfyd/web/workflows.py", "comfyd/service.py")),
    ("epoll wait (idle or waiting for I/O)", ("EpollSelector.select",)),
]


def profile_breakdown(raw_path: Path, rules: list[tuple[str, tuple[str, ...]]],
                      thread: str = "MainThread") -> tuple[dict[str, float], dict[str, int]]:
    """Shares (0..1) of ``thread``'s samples per category from a ``py-spy record --format raw --threads`` file,
    and the sample count per thread."""
    per_thread: dict[str, int] = {}
    counts: dict[str, int] = {}
    total = 0
    for line in Path(raw_path).read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        per_thread[name] = per_thread.get(name, 0) + n
        if thread not in frames[0]:
            continue
        total += n
        category = "aiohttp + asyncio, other: HTTP parse, sockets, event loop, task switching"
        for frame in reversed(frames[1:]):
            hit = next((c for c, pats in rules if any(p in frame for p in pats)), None)
            if hit is not None:
                category = hit
                break
        counts[category] = counts.get(category, 0) + n
    return ({c: n / total for c, n in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}), per_thread


def print_breakdown(raw_path: Path, rules: list[tuple[str, tuple[str, ...]]], rate: int, seconds: float) -> None:
    shares, per_thread = profile_breakdown(raw_path, rules)
    print(f"  py-spy samples per thread ({rate} Hz × {seconds:g} s = {int(rate * seconds)} possible; idle not sampled):")
    for name, n in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        print(f"    {n:6d}  {name}")
    print("  main (event-loop) thread, share of its samples:")
    for category, share in shares.items():
        print(f"    {share * 100:5.1f}%  {category}")
