"""The composition root: the one place that constructs actors and wires their handles.

Start-up: database (migrations) → broadcaster → scheduler (recovery) → executors → model catalogue.
Shutdown runs it in reverse, after intake has stopped and running jobs have had their drain deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from typing import Any

import aiohttp
import structlog

from comfyd.actors.broadcaster import Broadcaster, PublishRaw
from comfyd.actors.executor import Executor
from comfyd.actors.base import ActorStopped, MailboxFull
from comfyd.actors.gpu_monitor import GpuMonitor, WatchBackend
from comfyd.actors.indexer import OutputIndexer
from comfyd.actors.janitor import Janitor
from comfyd.actors.registry import Registration, Registry
from comfyd.actors.scheduler import Scheduler
from comfyd.actors.supervisor import Supervisor
from comfyd.config import BackendConfig, Config
from comfyd.errors import Unavailable
from comfyd.intake import Intake
from comfyd.messages import (
    AddBackend,
    RetireBackend,
    SchedulerSnapshot,
    StopIntake,
)
from comfyd.metrics import Metrics
from comfyd.models.catalog import ModelCatalog
from comfyd.store.db import Database
from comfyd.store.jobs import JobStore
from comfyd.store.model_hashes import SqliteHashCache
from comfyd.store.outputs import OutputIndex
from comfyd.upstream import register_upstream

log = structlog.get_logger("comfyd.service")


class Service:
    def __init__(self, config: Config, *, reconnect_min: float = 0.2, cancel_wait: float = 30.0,
                 nvml: Any = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.db = Database(config.db_path, synchronous=config.database.synchronous,
                           busy_timeout_ms=config.database.busy_timeout_ms, batch_max=config.database.batch_max)
        self.db.on_commit = lambda _size: self.metrics.db_batches.inc()
        self.jobs = JobStore(self.db)
        self.outputs = OutputIndex(self.db)
        self.supervisor = Supervisor()
        self.broadcaster = Broadcaster(self.metrics)
        self.scheduler = Scheduler(self.jobs, self.broadcaster.publish, self.metrics,
                                   max_attempts=config.scheduler.max_attempts,
                                   backend_wait=config.scheduler.backend_wait, publish_raw=self._publish_raw)
        self.intake = Intake(self.scheduler)
        self.executors: dict[str, Executor] = {}
        self.janitor = Janitor(self.db, config.retention)
        self.gpu_monitor: GpuMonitor | None = None
        self.nvml = nvml  # an NvmlSampler; None: the real NVML
        self.indexer = OutputIndexer(self.db, config.outputs_dir, interval=config.paths.outputs_rescan_seconds)
        self.models = ModelCatalog(config.models_dir, SqliteHashCache(self.db))
        self.reconnect_min = reconnect_min
        self.cancel_wait = cancel_wait
        self.stream_queue_size = 1024
        self.stream_max_backlog = 4 * 1024 * 1024
        self.accepting = False
        self.session: aiohttp.ClientSession | None = None
        self._seq = itertools.count(1)
        self.instance_id = ""
        self.registry: Registry | None = None  # type: ignore[assignment]
        self._upstream: asyncio.Task[None] | None = None

    # -- what the web edge uses ----------------------------------------------------------------------------
    def pools(self) -> set[str]:
        return {e.config.pool for e in self.executors.values() if not e.retired}

    def next_seq(self) -> int:
        return next(self._seq)

    def catalogue_check(self, workflow: dict[str, Any], pool: str) -> None:
        """Reject at the door what the pool's ComfyUI would reject: unknown nodes, missing inputs, bad links.
        Without a catalogue yet (no backend of the pool has answered), ComfyUI itself validates at run time."""
        for executor in self.executors.values():
            if executor.config.pool == pool and executor.catalogue is not None:
                executor.catalogue.check(workflow)
                return

    def check_capacity(self) -> None:
        """Before a job is stored: shed load at the edge instead of growing a backlog in memory."""
        mailbox = self.scheduler.mailbox_depth
        if mailbox > self.scheduler.mailbox_size * 0.9:
            raise Unavailable(f"the scheduler is behind ({mailbox} messages waiting); retry shortly", retry_after=1)
        if self.scheduler.queued_count >= self.config.scheduler.max_queued:
            raise Unavailable(f"the queue is full ({self.config.scheduler.max_queued} jobs, scheduler.max_queued)",
                              retry_after=30)

    async def ask_snapshot(self) -> dict[str, Any]:
        return await self.scheduler.ask(SchedulerSnapshot(), 5.0)

    def backend_views(self) -> list[dict[str, Any]]:
        return [executor.snapshot() for executor in self.executors.values()]

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.config.outputs_dir.mkdir(parents=True, exist_ok=True)
        await self.db.open()
        self.instance_id = await self._instance_id()
        self._seq = itertools.count(await self.jobs.max_seq() + 1)
        self.session = aiohttp.ClientSession()
        self.supervisor.start(self.broadcaster)
        for backend in self.config.backends:
            self._add_executor(backend)
        self.registry = Registry(self.db, self.session, self._backend_joined, self._backend_left)
        for registration in await self.registry.load():  # registered backends recover with the rest
            if registration.endpoints.api and (name := self._backend_for(registration)) is not None:
                self.registry.set_backend(registration.service, name)
        self.gpu_monitor = GpuMonitor(
            self.metrics, self._publish_raw,
            [(name, executor.client, executor.config.pool) for name, executor in self.executors.items()],
            nvml=self.nvml)
        self.supervisor.start(self.gpu_monitor)
        self.supervisor.start(self.scheduler)
        await asyncio.wait_for(self.scheduler.recovered.wait(), 60)
        for executor in self.executors.values():
            self.supervisor.start(executor)
        await self.models.start()
        self.supervisor.start(self.janitor)
        self.supervisor.start(self.registry)
        if self.config.upstream.url:
            public = self.config.upstream.public_url or f"http://{self.config.server.host}:{self.config.server.port}"
            self._upstream = asyncio.create_task(register_upstream(
                self.session, self.config.upstream.url, api_key=self.config.upstream.api_key, public_url=public),
                name="upstream-registration")
        self.supervisor.start(self.indexer)
        self.accepting = True
        log.info("service_started", backends=len(self.executors), db=str(self.config.db_path),
                 outputs=str(self.config.outputs_dir))

    def _publish_raw(self, topic: str, payload: bytes) -> None:
        try:
            self.broadcaster.tell(PublishRaw(topic=topic, payload=payload))
        except Exception:  # telemetry must never break its source
            self.metrics.ws_dropped.labels(reason="broadcaster_busy").inc()

    def _backend_for(self, registration: Registration) -> str | None:
        """Before start: make a registered service's backend (unless a configured one has its URL)."""
        url = (registration.endpoints.api or "").rstrip("/")
        for executor in self.executors.values():
            if executor.config.url == url:
                return executor.config.name
        return self._add_executor(BackendConfig(url=url, name=f"svc-{registration.service}",
                                                pool=registration.pool)).config.name

    def _backend_joined(self, service: str, url: str, pool: str) -> str | None:
        """At run time: a registered service offers a ComfyUI API; drive it like a configured backend."""
        url = url.rstrip("/")
        for executor in self.executors.values():
            if executor.config.url == url:
                if executor.retired:  # registered again: it takes work again
                    executor.retired = False
                    self.scheduler.tell(AddBackend(name=executor.config.name, pool=executor.config.pool,
                                                   capacity=executor.capacity, executor=executor))
                    self._watch_gpus(executor, present=True)
                return executor.config.name
        assert self.session is not None
        config = BackendConfig(url=url, name=f"svc-{service}", pool=pool)
        executor = Executor(config, self.scheduler, self.session, outputs_dir=self.config.outputs_dir,
                            instance_id=self.instance_id, reconnect_min=self.reconnect_min,
                            progress_interval=self.config.scheduler.progress_interval)
        self.executors[config.name] = executor
        self.scheduler.tell(AddBackend(name=config.name, pool=pool, capacity=executor.capacity, executor=executor))
        self.supervisor.start(executor)
        self._watch_gpus(executor, present=True)
        return config.name

    def _backend_left(self, name: str) -> None:
        self.executors[name].retired = True
        self.scheduler.tell(RetireBackend(name=name))
        self._watch_gpus(self.executors[name], present=False)

    def _watch_gpus(self, executor: Executor, *, present: bool) -> None:
        """A backend that joined (or left) at run time is sampled (or no longer) by the GPU monitor."""
        if self.gpu_monitor is None:
            return  # not started yet: it starts with every executor there is
        try:
            self.gpu_monitor.tell(WatchBackend(name=executor.config.name, pool=executor.config.pool,
                                               client=executor.client if present else None))
        except (MailboxFull, ActorStopped):
            log.warning("gpu_watch_skipped", backend=executor.config.name)

    def _add_executor(self, backend: BackendConfig) -> Executor:
        assert self.session is not None
        executor = Executor(backend, self.scheduler, self.session, outputs_dir=self.config.outputs_dir,
                            instance_id=self.instance_id, reconnect_min=self.reconnect_min,
                            progress_interval=self.config.scheduler.progress_interval)
        self.executors[backend.name] = executor
        self.scheduler.add_backend(backend.name, backend.pool, executor.capacity, executor)
        return executor

    async def _instance_id(self) -> str:
        row = await self.db.fetchone("SELECT value FROM meta WHERE key = 'instance_id'")
        if row is not None:
            return str(row[0])
        value = secrets.token_hex(4)
        await self.db.write([("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (value,))])
        return value

    async def drain(self, deadline: float) -> None:
        """Stop taking work; give running jobs until ``deadline`` seconds to finish. The rest stays queued."""
        self.accepting = False
        try:
            self.scheduler.tell(StopIntake())
            await asyncio.wait_for(self.scheduler.idle.wait(), deadline)
            log.info("drain_complete")
        except asyncio.TimeoutError:
            log.warning("drain_deadline_passed", deadline=deadline,
                        left=len(self.scheduler.active))
        except Exception as exc:  # the scheduler already stopped: nothing left to wait for
            log.warning("drain_skipped", error=repr(exc))

    async def stop(self) -> None:
        self.accepting = False
        if self._upstream is not None:
            self._upstream.cancel()
        await self.registry.stop(10)
        await self.janitor.stop(10)
        await self.indexer.stop(10)
        await self.models.stop()
        self.supervisor._stopping = True  # noqa: SLF001 - stops below are not crashes
        for executor in self.executors.values():
            await executor.stop(10)
        await self.scheduler.stop(10)
        await self.intake.close()
        if self.gpu_monitor is not None:
            await self.gpu_monitor.stop(5)
        await self.broadcaster.stop(10)
        if self.session is not None:
            await self.session.close()
        await self.db.close()
        log.info("service_stopped")

