"""Configuration: embedded defaults < TOML file < environment < command-line flags.

The seed's environment variables keep their meaning (``COMFYUI_API_URL``, ``COMFYUI_OUTPUTS``,
``COMFYUI_MODELS``, ``MANAGEMENT_API_KEY``); everything else is ``COMFYD_*``. See docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

Pool = str
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 9090
    max_body_bytes: int = 8 * 1024 * 1024
    drain_seconds: float = 60.0
    public_metrics: bool = True
    public_health: bool = True


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    api_keys: list[str] = []


class DatabaseConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""  # default: <data_dir>/comfyd.db
    synchronous: Synchronous = "NORMAL"
    busy_timeout_ms: int = 5000
    batch_max: int = 512


class PathsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = ""
    outputs: str = ""  # ComfyUI's output folder when it shares this disk (COMFYUI_OUTPUTS)
    models: str = ""  # ComfyUI's models folder (COMFYUI_MODELS)
    outputs_rescan_seconds: float = 300.0  # how often files that arrived by other means are indexed


class SchedulerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    aging_seconds: float = 600.0  # a job waiting this long outranks one class above it
    max_attempts: int = 2  # a job lost with its backend is re-queued until it has run this often
    default_timeout: float = 0.0  # seconds per job; 0 = none
    max_queued: int = 1_000_000
    backend_wait: float = 600.0  # queued jobs fail backend_unavailable when no backend of their pool is up this long
    progress_interval: float = 0.1  # seconds between a running job's progress reports (0: every change)


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    days: float = 30.0  # finished jobs older than this are pruned (their output files are kept)
    max_finished: int = 1_000_000  # and no more than this many finished jobs are kept
    interval_seconds: float = 600.0


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    name: str = ""
    pool: Pool = "local"
    gpu: int | None = None
    prefetch: int = 1  # prompts kept waiting inside ComfyUI's queue so the GPU never idles
    silence_seconds: float = 30.0  # no frame this long while a job runs: check /history and /queue
    shared_outputs: bool = True  # ComfyUI writes into the outputs folder comfyd reads


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = ""  # a management API to register comfyd with on start (COMFYD_UPSTREAM_URL); empty: none
    api_key: str = ""  # its X-API-Key (COMFYD_UPSTREAM_API_KEY)
    public_url: str = ""  # how the upstream reaches comfyd; default http://<host>:<port>


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: str = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    backends: list[BackendConfig] = []

    # -- derived paths -----------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.paths.data_dir).expanduser()

    @property
    def db_path(self) -> Path:
        return Path(self.database.path).expanduser() if self.database.path else self.data_dir / "comfyd.db"

    @property
    def outputs_dir(self) -> Path:
        return Path(self.paths.outputs).expanduser() if self.paths.outputs else self.data_dir / "outputs"

    @property
    def models_dir(self) -> Path | None:
        return Path(self.paths.models).expanduser() if self.paths.models else None

    @property
    def pools(self) -> set[str]:
        return {b.pool for b in self.backends}

    @property
    def auth_required(self) -> bool:
        return bool(self.auth.api_keys)


DEFAULT_BACKEND_URL = "http://127.0.0.1:8188"


def default_data_dir(env: Mapping[str, str]) -> str:
    if state := env.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return state.split(":")[0]
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "comfyd")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the effective configuration. ``overrides`` are command-line flags (host, port, data_dir)."""
    env = os.environ if env is None else env
    path = path or env.get("COMFYD_CONFIG") or None
    if path:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            config = msgspec.toml.decode(raw, type=Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    else:
        config = Config()
    _apply_env(config, env)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "data_dir":
            config.paths.data_dir = str(value)
        elif key in ("host", "port"):
            setattr(config.server, key, value)
        else:
            raise ConfigError(f"unknown override {key}")
    if not config.paths.data_dir:
        config.paths.data_dir = default_data_dir(env)
    if not config.backends:
        config.backends = [BackendConfig(url=DEFAULT_BACKEND_URL)]
    _finish_backends(config)
    validate(config)
    return config


def _apply_env(config: Config, env: Mapping[str, str]) -> None:
    if urls := env.get("COMFYUI_API_URL"):
        config.backends = [BackendConfig(url=url) for url in _split(urls)]
    if outputs := env.get("COMFYUI_OUTPUTS"):
        config.paths.outputs = outputs
    if models := env.get("COMFYUI_MODELS"):
        config.paths.models = models
    if keys := env.get("MANAGEMENT_API_KEY"):
        config.auth.api_keys = _split(keys)
    if host := env.get("COMFYD_HOST"):
        config.server.host = host
    if port := env.get("COMFYD_PORT"):
        try:
            config.server.port = int(port)
        except ValueError:
            raise ConfigError(f"COMFYD_PORT must be a port number, not {port!r}") from None
    if data_dir := env.get("COMFYD_DATA_DIR"):
        config.paths.data_dir = data_dir
    if db := env.get("COMFYD_DATABASE"):
        config.database.path = db
    if sync := env.get("COMFYD_SYNCHRONOUS"):
        config.database.synchronous = sync.upper()  # type: ignore[assignment]
    if level := env.get("COMFYD_LOG_LEVEL"):
        config.logging.level = level
    if fmt := env.get("COMFYD_LOG_FORMAT"):
        config.logging.format = fmt  # type: ignore[assignment]
    if upstream := env.get("COMFYD_UPSTREAM_URL"):
        config.upstream.url = upstream
    if upstream_key := env.get("COMFYD_UPSTREAM_API_KEY"):
        config.upstream.api_key = upstream_key
    if drain := env.get("COMFYD_DRAIN_SECONDS"):
        try:
            config.server.drain_seconds = float(drain)
        except ValueError:
            raise ConfigError(f"COMFYD_DRAIN_SECONDS must be a number of seconds, not {drain!r}") from None


def _finish_backends(config: Config) -> None:
    seen: set[str] = set()
    for index, backend in enumerate(config.backends):
        backend.url = backend.url.rstrip("/")
        if not backend.name:
            backend.name = f"{backend.pool}-{index}" if backend.pool != "local" else f"gpu{index}"
        if backend.gpu is None and backend.pool == "local":
            backend.gpu = index
        if backend.name in seen:
            raise ConfigError(f"backends: name {backend.name!r} is used twice")
        seen.add(backend.name)


def validate(config: Config) -> None:
    if not 0 < config.server.port < 65536:
        raise ConfigError(f"server.port must be 1-65535, not {config.server.port}")
    if config.database.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(f"database.synchronous must be NORMAL, FULL, EXTRA or OFF, not "
                          f"{config.database.synchronous!r}")
    if config.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"logging.level must be debug, info, warning, error or critical, not "
                          f"{config.logging.level!r}")
    if config.logging.format not in ("auto", "json", "console"):
        raise ConfigError(f"logging.format must be auto, json or console, not {config.logging.format!r}")
    if config.scheduler.progress_interval < 0:
        raise ConfigError(f"scheduler.progress_interval must be 0 or more seconds, not "
                          f"{config.scheduler.progress_interval}")
    for backend in config.backends:
        if not backend.url.startswith(("http://", "https://")):
            raise ConfigError(f"backend {backend.name}: url must start with http:// or https://, "
                              f"not {backend.url!r}")
    if not config.auth_required and not is_loopback(config.server.host):
        raise ConfigError(
            f"refusing to serve on {config.server.host} without an API key: set MANAGEMENT_API_KEY "
            "(or auth.api_keys), or listen on 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
