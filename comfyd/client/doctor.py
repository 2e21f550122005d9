"""``comfyd doctor``: local checks that say what is wrong and how to fix it, one line each.

Configuration, database, outputs folder, each backend's ``/system_stats``, NVML, and the service at ``--url``.
Without ``--config`` it checks what the installed service runs (``/etc/comfyd/comfyd.toml`` with
``/etc/comfyd/comfyd.env``, as the systemd unit reads them) when that file exists, else what ``comfyd serve``
would use in this shell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from comfyd import __version__
from comfyd.client import options
from comfyd.client.api import ApiError
from comfyd.client.context import Context
from comfyd.client.options import EXIT_FAILED, EXIT_OK, CliError
from comfyd.client.output import human_size
from comfyd.config import BackendConfig, Config, ConfigError, load_config

ETC_CONFIG = Path("/etc/comfyd/comfyd.toml")
ENV_NAMES = ("COMFYUI_API_URL", "COMFYUI_OUTPUTS", "COMFYUI_MODELS", "MANAGEMENT_API_KEY", "STATE_DIRECTORY")
BACKEND_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    status: str  # ok | warn | FAIL
    check: str
    detail: str
    advice: str | None = None


def ok(check: str, detail: str) -> Check:
    return Check("ok", check, detail)


def warn(check: str, detail: str, advice: str | None = None) -> Check:
    return Check("warn", check, detail, advice)


def fail(check: str, detail: str, advice: str | None = None) -> Check:
    return Check("FAIL", check, detail, advice)


# -- configuration -------------------------------------------------------------------------------------------
def check_config(path_arg: str | None, env: Mapping[str, str]) -> tuple[Config | None, list[Check]]:
    checks: list[Check] = []
    path = path_arg or env.get("COMFYD_CONFIG") or (str(ETC_CONFIG) if ETC_CONFIG.exists() else None)
    if path is not None and Path(path) == ETC_CONFIG and options.ENV_FILE.exists():
        from_file = options.read_env_file(options.ENV_FILE)
        if not from_file and not os.access(options.ENV_FILE, os.R_OK):
            checks.append(warn("env file", f"cannot read {options.ENV_FILE}: the service's settings there are not "
                               "checked", "run doctor as root or as the comfyd user"))
        env = {**from_file, **env}
    used = [name for name in ENV_NAMES if env.get(name)] + sorted(k for k in env if k.startswith("COMFYD_"))
    source = path or "embedded defaults"
    if used:
        source += f" + environment {', '.join(used)}"
    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        checks.insert(0, fail("config", str(exc), "fix the file or variable it names (docs/configuration.md)"))
        return None, checks
    checks.insert(0, ok("config", f"loaded {source}"))
    if not config.auth_required:
        checks.append(warn("auth", "no API key is configured: comfyd only listens on loopback",
                           "set MANAGEMENT_API_KEY (or [auth] api_keys) to serve other hosts"))
    return config, checks


# -- files ---------------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def _creatable(check: str, path: Path, what: str) -> Check:
    ancestor = _nearest_existing(path)
    if ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK):
        return warn(check, f"{path} does not exist yet; comfyd creates {what} on start")
    return fail(check, f"{path} does not exist and {ancestor} is not writable by this user",
                f"create it and give it to the user comfyd runs as (chown comfyd {path})")


def check_database(config: Config) -> Check:
    from comfyd.store.migrations import MIGRATIONS

    path = config.db_path
    if not path.exists():
        return _creatable("database", path, "it")
    if not os.access(path, os.R_OK | os.W_OK):
        return fail("database", f"{path} is not readable and writable by this user",
                    "run doctor as the user comfyd runs as (sudo -u comfyd comfyd doctor), or fix its owner")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return fail("database", f"{path.parent} is not writable: SQLite's WAL needs its -wal and -shm files there",
                    f"make {path.parent} writable by the user comfyd runs as")
    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=2)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    except sqlite3.Error as exc:
        return fail("database", f"{path} cannot be read: {exc}", "is it an SQLite file? restore it from a backup")
    known = len(MIGRATIONS)
    if version > known:
        return fail("database", f"{path}: schema version {version} is newer than this comfyd knows ({known})",
                    "upgrade comfyd, or point it at another database")
    state = "current" if version == known else f"migrated to {known} on the next start"
    return ok("database", f"{path}: schema version {version} ({state}), journal mode {journal}")


def check_outputs(config: Config) -> Check:
    path = config.outputs_dir
    if not path.exists():
        return _creatable("outputs", path, "the folder")
    if not path.is_dir():
        return fail("outputs", f"{path} is not a folder", "set [paths] outputs / COMFYUI_OUTPUTS to a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        return fail("outputs", f"{path} is not writable by this user",
                    "comfyd writes fetched outputs there: give it to the user comfyd runs as")
    return ok("outputs", f"{path} is writable")


# -- network -------------------------------------------------------------------------------------------------
async def check_backend(session: aiohttp.ClientSession, backend: BackendConfig, timeout: float) -> Check:
    name = f"backend {backend.name}"
    advice = "start that ComfyUI, or fix its url in [[backends]] / COMFYUI_API_URL"
    try:
        async with session.get(f"{backend.url}/system_stats",
                               timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return fail(name, f"{backend.url}/system_stats answered HTTP {response.status}",
                            "is this a ComfyUI server?")
            stats = await response.json(content_type=None)
    except TimeoutError:
        return fail(name, f"{backend.url} did not answer within {timeout:g}s", advice)
    except (aiohttp.ClientError, ValueError) as exc:
        return fail(name, f"{backend.url} is unreachable: {exc or type(exc).__name__}", advice)
    system = stats.get("system") or {}
    devices = ", ".join(f"{d.get('name', '?')} ({human_size(d.get('vram_total'))})" for d in stats.get("devices") or [])
    return ok(name, f"{backend.url} ComfyUI {system.get('comfyui_version', '?')} (pool {backend.pool}); "
                    f"devices: {devices or 'none'}")


async def check_backends(config: Config, timeout: float) -> list[Check]:
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(check_backend(session, b, timeout) for b in config.backends)))


def _probe_nvml() -> Check:
    from comfyd.gpu.nvml import NvmlSampler

    sampler = NvmlSampler()
    if not sampler.open():
        return warn("nvml", sampler.unavailable_reason or "NVML unavailable",
                    "GPU metrics fall back to each ComfyUI's /system_stats")
    try:
        gpus = sampler.sample()
    except Exception as exc:  # noqa: BLE001 - report whatever NVML says
        return warn("nvml", f"NVML opened but sampling failed: {exc}")
    finally:
        sampler.close()
    names = ", ".join(f"{g.gpu_id}: {g.name}" for g in gpus)
    return ok("nvml", f"{len(gpus)} GPU(s): {names}" if gpus else "NVML works but sees no GPU")


async def check_service(ctx: Context) -> list[Check]:
    url = ctx.api.base
    try:
        _, health = await ctx.api.call("GET", "/health")
    except ApiError as exc:
        if exc.status == 503:
            return [warn("service", f"{url} is draining (shutting down) and takes no new work")]
        if exc.status not in (401, 403):
            return [fail("service", f"{url}/health answered HTTP {exc.status}: {exc.message}")]
        health = None  # /health behind the key: the key check below says the rest
    except CliError as exc:
        return [fail("service", exc.message.removeprefix("comfyd: "),
                     "start it (systemctl start comfyd, or comfyd serve), or pass --url / set COMFYD_URL")]
    checks = []
    if health is not None:
        detail = (f"{url} comfyd {health.get('version')}: {health.get('status')}, {health.get('queued')} queued, "
                  f"{health.get('running')} running, {health.get('backendsUp')}/{health.get('backends')} backends up")
        if health.get("version") != __version__:
            detail += f" (this client is {__version__})"
        checks.append(ok("service", detail) if health.get("status") == "ok"
                      else warn("service", detail, "no backend is up: see comfyd backends"))
    try:
        await ctx.api.get("/v1/comfyui/backends")
        checks.append(ok("api key", "accepted" if ctx.settings.api_key else "none needed"))
    except ApiError as exc:
        if exc.status not in (401, 403):
            checks.append(fail("api key", f"/v1/comfyui/backends answered HTTP {exc.status}: {exc.message}"))
        elif ctx.settings.api_key:
            checks.append(fail("api key", "the service rejects this API key",
                               "pass the key from /etc/comfyd/comfyd.env with --api-key or MANAGEMENT_API_KEY"))
        else:
            checks.append(fail("api key", "the service needs an API key and none was given",
                               "pass --api-key or set MANAGEMENT_API_KEY"))
    except CliError as exc:
        checks.append(fail("api key", exc.message))
    return checks


# -- the command ---------------------------------------------------------------------------------------------
def _line(check: Check) -> str:
    text = f"{check.status:<4}  {check.check:<14}  {check.detail}"
    return text + (f"  → {check.advice}" if check.advice and check.status != "ok" else "")


async def doctor(ctx: Context, args: argparse.Namespace) -> int:
    checks: list[Check] = []

    def report(found: list[Check]) -> None:
        checks.extend(found)
        if not ctx.settings.json:
            for check in found:
                ctx.console.line(_line(check))

    config, found = check_config(args.config, ctx.env)
    report(found)
    if config is not None:
        report([check_database(config), check_outputs(config)])
        report(await check_backends(config, min(ctx.settings.timeout, BACKEND_TIMEOUT)))
    report([await asyncio.to_thread(_probe_nvml)])
    report(await check_service(ctx))
    failed = any(c.status == "FAIL" for c in checks)
    if ctx.settings.json:
        ctx.console.json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    return EXIT_FAILED if failed else EXIT_OK
