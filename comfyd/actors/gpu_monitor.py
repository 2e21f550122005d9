"""The GPU monitor: samples every GPU on an interval, off the event loop, into the metrics and the stream.

Sources. On start the monitor opens NVML once (in a worker thread). Where NVML works it reads this host's GPUs
through it, and asks ``GET /system_stats`` only of the backends whose pool is not ``local`` (remote servers, cloud
pools: GPUs this host's NVML cannot see); a ``local`` backend's GPU is one of the NVML devices. Where NVML does not
work (no NVIDIA driver, no permission, ...) the monitor logs one ``nvml_unavailable`` line with the reason and asks
every backend's ``/system_stats`` instead. If NVML fails as a whole later (driver unloaded), it logs
``nvml_failed`` once and falls back the same way.

Stale values. A GPU that is no longer reported (its backend is down, NVML lost it or skipped it) has its series
removed from every gauge, and so has a field its source does not report (``/system_stats`` has no utilisation,
temperature or power): a dashboard shows a gap, never a frozen value. A GPU lost mid-run logs ``gpu_lost`` once
(``gpu_recovered`` if it comes back); a backend whose ``/system_stats`` fails logs ``gpu_probe_failed`` once, until
it answers again. Nothing a source does stops the other sources from being sampled.

Each sample sets the gauges (percent, bytes, degrees Celsius, watts), is published to stream clients that
subscribed to topic ``gpu`` as ``{"type": "gpu:stats", "timestamp": <epoch ms>, "gpus": [...]}``, and is kept as
the answer to ``GpuSnapshot``. The sample is applied to the monitor's state in one synchronous step after all its
readings are in, so a snapshot always holds one whole sample.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import structlog

from comfyd.actors.base import Actor
from comfyd.comfy.client import ComfyClient
from comfyd.gpu import (
    SOURCE_NVML,
    SOURCE_SYSTEM_STATS,
    GpuSample,
    NvmlSampler,
    NvmlUnavailableError,
    parse_system_stats,
)
from comfyd.messages import Message
from comfyd.metrics import Metrics

log = structlog.get_logger("comfyd.gpu_monitor")

SOURCE_NONE = "none"
TOPIC = "gpu"

# Metrics attribute -> GpuSample field. The units are the sample's: percent, bytes, bytes, Celsius, watts.
_GAUGES = (
    ("gpu_utilization", "utilization_percent"),
    ("vram_usage", "vram_used_bytes"),
    ("vram_total", "vram_total_bytes"),
    ("gpu_temperature", "temperature_c"),
    ("gpu_power", "power_watts"),
)

_encoder = msgspec.json.Encoder()


class GpuSnapshot(Message, frozen=True):
    """Ask: the latest sample, ``{"gpus": [sample dicts], "source": "nvml" | "system_stats" | "none"}``."""


class WatchBackend(Message, frozen=True):
    """A backend that joined at run time (the service registry): sample it like the configured ones. Without
    a ``client``: it left, stop sampling it (its series go with the next sample)."""

    name: str
    pool: str = "local"
    client: Any = None


class Backend(NamedTuple):
    """A ComfyUI server whose ``/system_stats`` the monitor may ask. ``(name, client)`` means pool ``local``."""

    name: str
    client: ComfyClient
    pool: str = "local"


class GpuMonitor(Actor[Message]):
    mailbox_size = 100
    nvml_close_timeout = 2.0  # a sample stuck in the driver holds NVML's lock: stop does not wait for it

    def __init__(self, metrics: Metrics, publish_raw: Callable[[str, bytes], None],
                 backends: Sequence[tuple[str, ComfyClient] | tuple[str, ComfyClient, str]], *,
                 interval: float = 5.0, nvml: NvmlSampler | None = None) -> None:
        super().__init__("gpu_monitor")
        self.metrics = metrics
        self.publish_raw = publish_raw
        self.backends = [Backend(*backend) for backend in backends]
        self.interval = interval
        self.probe_timeout = max(1.0, min(interval, 10.0))  # a silent backend never delays the next sample
        self.nvml = nvml if nvml is not None else NvmlSampler()
        self.source = SOURCE_NONE
        self._use_nvml = False
        self._probes: list[Backend] = []
        self._latest: list[dict[str, Any]] = []
        self._series: dict[str, set[str]] = {attr: set() for attr, _ in _GAUGES}  # gauge -> gpu_ids it holds
        self._lost: set[int] = set()  # NVML indices reported lost (logged once each)
        self._probe_down: set[str] = set()  # backends whose /system_stats failed (logged once each)
        self._stop = asyncio.Event()
        self._sampling: asyncio.Task[None] | None = None

    # -- the handle --------------------------------------------------------------------------------------
    async def snapshot(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self.ask(GpuSnapshot(), timeout)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self._stop.clear()
        self._use_nvml = await self.nvml.open_async()
        if not self._use_nvml:
            log.info("nvml_unavailable", reason=self.nvml.unavailable_reason, fallback=SOURCE_SYSTEM_STATS,
                     backends=[b.name for b in self.backends])
        self._choose_sources()
        if self.source != SOURCE_NONE:
            self._sampling = self.spawn(self._sample_forever(), name="gpu_monitor:sampling")

    async def on_stop(self) -> None:
        self._stop.set()
        if self._sampling is not None:  # no NVML call may start after the close below
            self._sampling.cancel()
            await asyncio.gather(self._sampling, return_exceptions=True)
            self._sampling = None
        if self._use_nvml:
            try:
                await asyncio.wait_for(self.nvml.close_async(), self.nvml_close_timeout)
            except TimeoutError:
                log.warning("nvml_close_slow", timeout=self.nvml_close_timeout)

    async def handle(self, message: Message) -> Any:
        match message:
            case GpuSnapshot():
                return {"gpus": list(self._latest), "source": self.source}
            case WatchBackend():
                self.backends = [b for b in self.backends if b.name != message.name]
                if message.client is not None:
                    self.backends.append(Backend(message.name, message.client, message.pool))
                self._choose_sources()
                if self.source != SOURCE_NONE and self._sampling is None:
                    self._sampling = self.spawn(self._sample_forever(), name="gpu_monitor:sampling")
            case _:
                raise TypeError(f"gpu monitor cannot handle {type(message).__name__}")

    # -- sampling ----------------------------------------------------------------------------------------
    async def _sample_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sample_once()
            except Exception:  # a bug in one sample must not end the sampling
                log.exception("gpu_sample_failed")
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    async def sample_once(self) -> list[dict[str, Any]]:
        """Read every source now, set the gauges, publish ``gpu:stats``; return the sample dicts."""
        readings = [self._probe(backend) for backend in self._probes]
        if self._use_nvml:
            readings.insert(0, self._sample_nvml())
        groups = await asyncio.gather(*readings)
        samples = [sample for group in groups for sample in group]
        self._apply(samples)
        self._publish(self._latest)
        return self._latest

    async def _sample_nvml(self) -> list[GpuSample]:
        try:
            samples = await self.nvml.sample_async()
        except NvmlUnavailableError as exc:
            if self._use_nvml:
                log.warning("nvml_failed", reason=str(exc), fallback=SOURCE_SYSTEM_STATS)
                self._use_nvml = False
                self._choose_sources()
                await self.nvml.close_async()
            return []
        present = {int(sample.gpu_id) for sample in samples}
        for index in sorted(self.nvml.lost - self._lost):
            log.warning("gpu_lost", gpu=str(index), reason=self.nvml.skipped.get(index))
        for index in sorted(self._lost & present):
            log.info("gpu_recovered", gpu=str(index))
        self._lost = (self._lost | self.nvml.lost) - present
        return samples

    async def _probe(self, backend: Backend) -> list[GpuSample]:
        try:
            body = await asyncio.wait_for(backend.client.system_stats(), self.probe_timeout)
        except Exception as exc:  # down, timed out, 5xx, not JSON: this backend only
            if backend.name not in self._probe_down:
                self._probe_down.add(backend.name)
                log.warning("gpu_probe_failed", backend=backend.name, error=str(exc) or repr(exc))
            return []
        if backend.name in self._probe_down:
            self._probe_down.discard(backend.name)
            log.info("gpu_probe_recovered", backend=backend.name)
        return parse_system_stats(backend.name, body)

    def _choose_sources(self) -> None:
        if self._use_nvml:
            self._probes = [b for b in self.backends if b.pool != "local"]
            self.source = SOURCE_NVML
        else:
            self._probes = list(self.backends)
            self.source = SOURCE_SYSTEM_STATS if self._probes else SOURCE_NONE

    def _apply(self, samples: list[GpuSample]) -> None:
        """Set every known value and remove every series this sample no longer reports. Synchronous."""
        current: dict[str, set[str]] = {attr: set() for attr, _ in _GAUGES}
        for sample in samples:
            for attr, field in _GAUGES:
                value = getattr(sample, field)
                if value is not None:
                    getattr(self.metrics, attr).labels(gpu_id=sample.gpu_id).set(value)
                    current[attr].add(sample.gpu_id)
        for attr, gpu_ids in self._series.items():
            gauge = getattr(self.metrics, attr)
            for gpu_id in gpu_ids - current[attr]:
                gauge.remove(gpu_id)
        self._series = current
        self._latest = [msgspec.structs.asdict(sample) for sample in samples]

    def _publish(self, gpus: list[dict[str, Any]]) -> None:
        payload = _encoder.encode({"type": "gpu:stats", "timestamp": int(time.time() * 1000), "gpus": gpus})
        try:
            self.publish_raw(TOPIC, payload)
        except Exception as exc:  # broadcaster stopping or full: telemetry never breaks sampling
            log.warning("gpu_stats_dropped", error=str(exc) or repr(exc))
