"""The service registry: ComfyUI instances (or the ComfyUI MCP server) announce themselves, as the seed's
``registerWithManagementAPI`` does. Registrations are persisted; each service's health endpoint is polled
and the service marked up or down; one that offers a ComfyUI API (``endpoints.api``) becomes a backend of
its pool without a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import structlog

from comfyd.actors.base import Actor
from comfyd.errors import NotFound
from comfyd.messages import Message
from comfyd.store.db import Database, now_ms

log = structlog.get_logger("comfyd.registry")


class Endpoints(msgspec.Struct, kw_only=True):
    health: str
    api: str | None = None


class Registration(msgspec.Struct, kw_only=True):
    """The seed's body: ``{service, version, endpoints: {health, api}, capabilities}`` (+ ``pool``)."""

    service: str
    version: str = ""
    endpoints: Endpoints
    capabilities: list[str] = []
    pool: str = "local"


class Register(Message, frozen=True):
    registration: Any  # Registration


class Deregister(Message, frozen=True):
    name: str


class ListServices(Message, frozen=True):
    pass


class Poll(Message, frozen=True):
    pass


class Polled(Message, frozen=True):
    name: str
    up: bool
    detail: str


@dataclass(slots=True)
class Entry:
    registration: Registration
    registered_at: int
    status: str = "unknown"
    detail: str = ""
    checked_at: int | None = None
    backend: str | None = None


_encode = msgspec.json.Encoder()


class Registry(Actor[Message]):
    mailbox_size = 256

    def __init__(self, db: Database, session: aiohttp.ClientSession,
                 add_backend: Callable[[str, str, str], str | None],
                 retire_backend: Callable[[str], None], *, interval: float = 10.0) -> None:
        super().__init__("registry")
        self.db = db
        self.session = session
        self.add_backend = add_backend  # (service name, api url, pool) -> backend name
        self.retire_backend = retire_backend
        self.interval = interval
        self.entries: dict[str, Entry] = {}

    async def load(self) -> list[Registration]:
        """Registrations persisted by earlier runs (the composition root makes their backends first)."""
        rows = await self.db.fetchall("SELECT name, version, endpoints, capabilities, pool, registered_at "
                                      "FROM services ORDER BY registered_at")
        for row in rows:
            registration = Registration(service=row["name"], version=row["version"],
                                        endpoints=msgspec.json.decode(row["endpoints"], type=Endpoints),
                                        capabilities=msgspec.json.decode(row["capabilities"]), pool=row["pool"])
            self.entries[registration.service] = Entry(registration, row["registered_at"])
        return [e.registration for e in self.entries.values()]

    async def on_start(self) -> None:
        self.every(self.interval, Poll, now=True)

    async def handle(self, message: Message) -> Any:
        match message:
            case Register():
                return await self._register(message.registration)
            case Deregister():
                return await self._deregister(message.name)
            case ListServices():
                return [self.view(e) for e in self.entries.values()]
            case Poll():
                for name, entry in self.entries.items():
                    self.spawn(self._check(name, entry.registration.endpoints.health), name="registry:check")
            case Polled():
                if (entry := self.entries.get(message.name)) is not None:
                    status = "up" if message.up else "down"
                    if status != entry.status:
                        log.info("service_up" if message.up else "service_down", service=message.name,
                                 detail=message.detail)
                    entry.status, entry.detail, entry.checked_at = status, message.detail, now_ms()
            case _:
                raise TypeError(f"registry cannot handle {type(message).__name__}")
        return None

    async def _register(self, registration: Registration) -> dict[str, Any]:
        await self.db.write([(
            "INSERT INTO services (name, version, endpoints, capabilities, pool, registered_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET version = excluded.version, "
            "endpoints = excluded.endpoints, capabilities = excluded.capabilities, pool = excluded.pool",
            (registration.service, registration.version, _encode.encode(registration.endpoints).decode(),
             _encode.encode(registration.capabilities).decode(), registration.pool, now_ms()))])
        entry = self.entries.get(registration.service)
        if entry is None:
            entry = self.entries[registration.service] = Entry(registration, now_ms())
        else:
            entry.registration = registration
        if registration.endpoints.api and entry.backend is None:
            entry.backend = self.add_backend(registration.service, registration.endpoints.api, registration.pool)
        log.info("service_registered", service=registration.service, version=registration.version,
                 backend=entry.backend, pool=registration.pool)
        self.spawn(self._check(registration.service, registration.endpoints.health), name="registry:check")
        return self.view(entry)

    async def _deregister(self, name: str) -> dict[str, Any]:
        entry = self.entries.pop(name, None)
        if entry is None:
            raise NotFound(f"service {name} is not registered")
        await self.db.write([("DELETE FROM services WHERE name = ?", (name,))])
        if entry.backend is not None:
            self.retire_backend(entry.backend)
        log.info("service_deregistered", service=name, backend=entry.backend)
        return {"service": name, "deregistered": True}

    async def _check(self, name: str, url: str) -> None:
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                up, detail = response.status < 400, f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            up, detail = False, f"{type(exc).__name__}: {exc}"
        try:
            self.tell(Polled(name=name, up=up, detail=detail))
        except Exception:  # stopping
            pass

    def set_backend(self, name: str, backend: str) -> None:
        """Wiring at start-up: a persisted registration's backend was already made."""
        if (entry := self.entries.get(name)) is not None:
            entry.backend = backend

    @staticmethod
    def view(entry: Entry) -> dict[str, Any]:
        r = entry.registration
        return {"service": r.service, "version": r.version,
                "endpoints": {"health": r.endpoints.health, "api": r.endpoints.api},
                "capabilities": r.capabilities, "pool": r.pool, "status": entry.status, "detail": entry.detail,
                "checkedAt": entry.checked_at, "registeredAt": entry.registered_at, "backend": entry.backend}
