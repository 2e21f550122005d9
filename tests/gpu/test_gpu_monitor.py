"""The GPU monitor, driven through its handle: NVML through the pynvml stand-in, ``/system_stats`` through real
aiohttp servers on loopback answering the body a real ComfyUI recorded (trace s15), values read back from a real
``Metrics()`` registry. Nothing waits by sleeping: tests await published payloads, events, or the actor's task.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import pynvml
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from comfyd.actors import gpu_monitor
from comfyd.actors.base import MailboxFull
from comfyd.actors.gpu_monitor import GpuMonitor, WatchBackend
from comfyd.comfy.client import ComfyClient
from comfyd.gpu import NvmlSampler
from comfyd.metrics import Metrics
from comfyd.web import gpus
from comfyd.web.keys import SERVICE
from tests.gpu.fake_nvml import FakeNvml, GiB, two_gpus
from tests.recording_log import RecordingLog

WAIT = 5.0  # upper bound for anything awaited here; nothing should come close
S15_BODY = json.loads((Path(__file__).parent / "fixtures" / "system_stats_s15.json").read_text())
S15_TOTAL = 25276514304
S15_USED = 25276514304 - 24250798080
GAUGES = ("comfyui_gpu_utilization", "comfyui_vram_usage_bytes", "comfyui_vram_total_bytes",
          "comfyui_gpu_temperature_celsius", "comfyui_gpu_power_watts")


# -- helpers -------------------------------------------------------------------------------------------------
class Published:
    """The ``publish_raw`` callback: records (topic, decoded payload) and lets a test await the next one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.fail_with: Exception | None = None

    def __call__(self, topic: str, payload: bytes) -> None:
        assert isinstance(payload, bytes)
        if self.fail_with is not None:
            raise self.fail_with
        self.queue.put_nowait((topic, msgspec.json.decode(payload)))

    async def next(self) -> dict[str, Any]:
        topic, body = await asyncio.wait_for(self.queue.get(), WAIT)
        assert topic == "gpu"
        return body


class StatsServer:
    """A ComfyUI stand-in for ``GET /system_stats`` on 127.0.0.1: answers the recorded body, or ``status``, or
    holds the request until ``release`` is set when ``hang`` is on."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.hits = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/system_stats", self._stats)
        self.server = TestServer(app, host="127.0.0.1")

    async def _stats(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hang:
            self.entered.set()
            await self.release.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="boom")
        return web.json_response(S15_BODY)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def value(metrics: Metrics, name: str, gpu_id: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"gpu_id": gpu_id})


def series(metrics: Metrics, gpu_id: str) -> dict[str, float | None]:
    return {name: value(metrics, name, gpu_id) for name in GAUGES}


def unavailable_nvml() -> NvmlSampler:
    return NvmlSampler(nvml=FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recording = RecordingLog()
    monkeypatch.setattr(gpu_monitor, "log", recording)
    return recording


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(two_gpus())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def stats_servers() -> AsyncIterator[Callable[[], Awaitable[StatsServer]]]:
    started: list[StatsServer] = []

    async def make() -> StatsServer:
        server = StatsServer()
        await server.server.start_server()
        started.append(server)
        return server

    yield make
    for server in started:
        server.release.set()
        await server.server.close()


@pytest.fixture
def refused_url() -> Any:
    """A loopback port that refuses connections: bound (so no one else takes it) but not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
async def monitors() -> AsyncIterator[Callable[..., GpuMonitor]]:
    started: list[GpuMonitor] = []

    def make(*args: Any, **kwargs: Any) -> GpuMonitor:
        monitor = GpuMonitor(*args, **kwargs)
        monitor.start()
        started.append(monitor)
        return monitor

    yield make
    for monitor in started:
        await monitor.stop(WAIT)


# -- NVML ----------------------------------------------------------------------------------------------------
async def test_nvml_values_land_in_metrics_with_labels_and_units(fake, monitors, logs):
    metrics, published = Metrics(), Published()
    monitor = monitors(metrics, published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    before = int(time.time() * 1000)
    body = await published.next()  # the first sample is taken at start

    assert series(metrics, "0") == {
        "comfyui_gpu_utilization": 87.0,  # percent
        "comfyui_vram_usage_bytes": 20 * GiB,
        "comfyui_vram_total_bytes": 24 * GiB,
        "comfyui_gpu_temperature_celsius": 71.0,
        "comfyui_gpu_power_watts": 312.456,  # NVML's milliwatts as watts
    }
    assert series(metrics, "1") == {
        "comfyui_gpu_utilization": 0.0,
        "comfyui_vram_usage_bytes": 512 * 1024**2,
        "comfyui_vram_total_bytes": 48 * GiB,
        "comfyui_gpu_temperature_celsius": 34.0,
        "comfyui_gpu_power_watts": 21.0,
    }
    assert body["type"] == "gpu:stats"
    assert before <= body["timestamp"] <= int(time.time() * 1000)
    assert [g["gpu_id"] for g in body["gpus"]] == ["0", "1"]
    assert body["gpus"][0] == {
        "gpu_id": "0", "uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA GeForce RTX 4090",
        "utilization_percent": 87.0, "vram_used_bytes": 20 * GiB, "vram_total_bytes": 24 * GiB,
        "temperature_c": 71.0, "power_watts": 312.456, "source": "nvml", "backend": None,
    }
    snapshot = await monitor.snapshot()
    assert snapshot == {"gpus": body["gpus"], "source": "nvml"}
    assert threading.get_ident() not in fake.threads  # NVML was only ever called off the event loop
    assert logs.named("nvml_unavailable") == []


async def test_values_follow_each_sample_and_unknown_fields_have_no_series(fake, monitors):
    metrics, published = Metrics(), Published()
    fake.devices[1].fail["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    monitor = monitors(metrics, published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    await published.next()
    assert value(metrics, "comfyui_gpu_power_watts", "1") is None
    assert value(metrics, "comfyui_gpu_temperature_celsius", "1") == 34.0

    fake.devices[0].util, fake.devices[0].used = 12, 3 * GiB
    fake.devices[0].fail["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_NO_PERMISSION
    gpus = await monitor.sample_once()
    assert value(metrics, "comfyui_gpu_utilization", "0") == 12.0
    assert value(metrics, "comfyui_vram_usage_bytes", "0") == 3 * GiB
    assert value(metrics, "comfyui_gpu_temperature_celsius", "0") is None  # not left at 71
    assert gpus[0]["temperature_c"] is None
    assert (await published.next())["gpus"] == gpus


async def test_gpu_lost_mid_run_drops_its_series_and_logs_once(fake, monitors, logs):
    metrics, published = Metrics(), Published()
    # device 1 answers the first sample, then is lost in the middle of every later one
    fake.devices[1].fail_after["nvmlDeviceGetUtilizationRates"] = (1, pynvml.NVML_ERROR_GPU_IS_LOST)
    monitor = monitors(metrics, published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    await published.next()
    assert value(metrics, "comfyui_vram_total_bytes", "1") == 48 * GiB

    gpus = await monitor.sample_once()
    assert [g["gpu_id"] for g in gpus] == ["0"]
    assert series(metrics, "1") == dict.fromkeys(GAUGES)  # every series of the lost GPU is gone
    assert value(metrics, "comfyui_gpu_utilization", "0") == 87.0
    lost = logs.named("gpu_lost")
    assert len(lost) == 1 and lost[0]["gpu"] == "1" and "lost" in lost[0]["reason"].lower()

    await monitor.sample_once()
    assert len(logs.named("gpu_lost")) == 1  # once per GPU, not once per sample
    assert [g["gpu_id"] for g in (await monitor.snapshot())["gpus"]] == ["0"]

    del fake.devices[1].fail_after["nvmlDeviceGetUtilizationRates"]
    await monitor.sample_once()
    assert value(metrics, "comfyui_gpu_utilization", "1") == 0.0
    assert logs.named("gpu_recovered") == [{"gpu": "1"}]


async def test_nvml_and_remote_backends(fake, monitors, stats_servers, session):
    local, remote = await stats_servers(), await stats_servers()
    metrics, published = Metrics(), Published()
    backends = [("gpu0", ComfyClient(local.url, session), "local"),
                ("salad-0", ComfyClient(remote.url, session), "salad")]
    monitor = monitors(metrics, published, backends, interval=3600, nvml=NvmlSampler(nvml=fake))
    body = await published.next()
    assert [(g["gpu_id"], g["source"]) for g in body["gpus"]] == [
        ("0", "nvml"), ("1", "nvml"), ("salad-0:0", "system_stats")]
    assert local.hits == 0 and remote.hits == 1  # a local backend's GPU is one NVML already reads
    assert value(metrics, "comfyui_vram_total_bytes", "salad-0:0") == S15_TOTAL
    assert (await monitor.snapshot())["source"] == "nvml"


async def test_nvml_failing_later_falls_back_to_system_stats(fake, monitors, stats_servers, session, logs):
    local = await stats_servers()
    metrics, published = Metrics(), Published()
    monitor = monitors(metrics, published, [("gpu0", ComfyClient(local.url, session))], interval=3600,
                       nvml=NvmlSampler(nvml=fake))
    await published.next()

    def count() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    fake.nvmlDeviceGetCount = count
    assert await monitor.sample_once() == []
    assert series(metrics, "0") == dict.fromkeys(GAUGES)
    assert len(logs.named("nvml_failed")) == 1 and fake.initialised == 0
    gpus = await monitor.sample_once()
    assert [g["gpu_id"] for g in gpus] == ["gpu0:0"] and local.hits == 1
    assert (await monitor.snapshot())["source"] == "system_stats"
    assert len(logs.named("nvml_failed")) == 1


# -- the /system_stats fallback ------------------------------------------------------------------------------
async def test_real_pynvml_missing_falls_back_to_system_stats(monitors, stats_servers, session, logs):
    probe = NvmlSampler()
    if probe.open():  # pragma: no cover - a real NVIDIA host: the fallback is not what runs there
        probe.close()
        pytest.skip("NVML works on this machine")
    server = await stats_servers()
    metrics, published = Metrics(), Published()
    monitor = monitors(metrics, published, [("local0", ComfyClient(server.url, session))], interval=3600)
    body = await published.next()

    assert body["gpus"] == [{
        "gpu_id": "local0:0", "uuid": None, "name": "cpu", "utilization_percent": None,
        "vram_used_bytes": S15_USED, "vram_total_bytes": S15_TOTAL, "temperature_c": None,
        "power_watts": None, "source": "system_stats", "backend": "local0",
    }]
    assert series(metrics, "local0:0") == {
        "comfyui_gpu_utilization": None,  # ComfyUI does not report it: no series rather than a made-up 0
        "comfyui_vram_usage_bytes": S15_USED,
        "comfyui_vram_total_bytes": S15_TOTAL,
        "comfyui_gpu_temperature_celsius": None,
        "comfyui_gpu_power_watts": None,
    }
    await monitor.sample_once()
    await monitor.sample_once()
    (line,) = logs.named("nvml_unavailable")  # one line, however many samples
    assert line["reason"] and "\n" not in line["reason"] and line["backends"] == ["local0"]
    assert (await monitor.snapshot())["source"] == "system_stats"


async def test_a_backend_that_is_down_does_not_break_the_others(monitors, stats_servers, session, refused_url,
                                                              logs):
    good, flaky = await stats_servers(), await stats_servers()
    flaky.status = 500
    metrics, published = Metrics(), Published()
    backends = [("a", ComfyClient(good.url, session)), ("down", ComfyClient(refused_url, session)),
                ("flaky", ComfyClient(flaky.url, session))]
    monitor = monitors(metrics, published, backends, interval=3600, nvml=unavailable_nvml())
    body = await published.next()
    assert [g["gpu_id"] for g in body["gpus"]] == ["a:0"]
    assert value(metrics, "comfyui_vram_total_bytes", "a:0") == S15_TOTAL
    await monitor.sample_once()
    assert sorted(f["backend"] for f in logs.named("gpu_probe_failed")) == ["down", "flaky"]  # once each

    flaky.status = 200
    gpus = await monitor.sample_once()
    assert [g["gpu_id"] for g in gpus] == ["a:0", "flaky:0"]
    assert value(metrics, "comfyui_vram_usage_bytes", "flaky:0") == S15_USED
    assert logs.named("gpu_probe_recovered") == [{"backend": "flaky"}]

    flaky.status = 503  # down again: its series go rather than freeze at their last value
    await monitor.sample_once()
    assert series(metrics, "flaky:0") == dict.fromkeys(GAUGES)
    assert value(metrics, "comfyui_vram_total_bytes", "a:0") == S15_TOTAL
    assert len(logs.named("gpu_probe_failed")) == 3


async def test_samples_repeat_on_the_interval(monitors, stats_servers, session):
    server = await stats_servers()
    published = Published()
    monitors(Metrics(), published, [("b", ComfyClient(server.url, session))], interval=0.01,
             nvml=unavailable_nvml())
    stamps = [(await published.next())["timestamp"] for _ in range(3)]
    assert stamps == sorted(stamps) and server.hits >= 3


async def test_no_source_at_all(monitors, logs):
    published = Published()
    monitor = monitors(Metrics(), published, [], interval=0.01, nvml=unavailable_nvml())
    assert await monitor.snapshot() == {"gpus": [], "source": "none"}  # answered after on_start
    assert published.queue.empty() and len(logs.named("nvml_unavailable")) == 1


async def test_a_backend_that_joins_later_is_sampled_and_one_that_leaves_is_not(fake, monitors, stats_servers,
                                                                                  session):
    remote = await stats_servers()
    metrics, published = Metrics(), Published()
    monitor = monitors(metrics, published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    await published.next()  # the first sample: NVML only
    monitor.tell(WatchBackend(name="svc-salad", pool="salad", client=ComfyClient(remote.url, session)))
    await monitor.snapshot()  # handled in order: the backend is watched now
    gpus = await monitor.sample_once()
    assert [(g["gpu_id"], g["source"]) for g in gpus] == [("0", "nvml"), ("1", "nvml"), ("svc-salad:0", "system_stats")]
    assert value(metrics, "comfyui_vram_total_bytes", "svc-salad:0") == S15_TOTAL
    monitor.tell(WatchBackend(name="svc-salad"))  # deregistered
    await monitor.snapshot()
    gpus = await monitor.sample_once()
    assert [g["gpu_id"] for g in gpus] == ["0", "1"]
    assert value(metrics, "comfyui_vram_total_bytes", "svc-salad:0") is None  # its series is gone


async def test_with_no_source_sampling_starts_when_a_backend_joins(monitors, stats_servers, session):
    remote = await stats_servers()
    published = Published()
    monitor = monitors(Metrics(), published, [], interval=3600, nvml=unavailable_nvml())
    assert (await monitor.snapshot())["source"] == "none"
    monitor.tell(WatchBackend(name="svc-0", pool="local", client=ComfyClient(remote.url, session)))
    body = await published.next()
    assert [(g["gpu_id"], g["source"]) for g in body["gpus"]] == [("svc-0:0", "system_stats")]
    assert (await monitor.snapshot())["source"] == "system_stats"


async def test_publish_failure_does_not_stop_sampling(fake, monitors, logs):
    metrics, published = Metrics(), Published()
    monitor = monitors(metrics, published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    await published.next()
    published.fail_with = MailboxFull("broadcaster mailbox is full")
    fake.devices[0].util = 55
    await monitor.sample_once()
    assert value(metrics, "comfyui_gpu_utilization", "0") == 55.0
    assert logs.named("gpu_stats_dropped") == [{"error": "broadcaster mailbox is full"}]


# -- stop ----------------------------------------------------------------------------------------------------
async def test_stop_is_prompt_between_samples(fake, monitors):
    published = Published()
    monitor = monitors(Metrics(), published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    await published.next()
    started = time.monotonic()
    await monitor.stop(WAIT)
    assert time.monotonic() - started < 1.0
    assert monitor.task is not None and monitor.task.done() and not monitor.task.cancelled()
    assert fake.initialised == 0  # NVML shut down
    assert published.queue.empty()


async def test_stop_is_prompt_while_a_backend_hangs(monitors, stats_servers, session):
    server = await stats_servers()
    server.hang = True
    monitor = monitors(Metrics(), Published(), [("slow", ComfyClient(server.url, session))], interval=3600,
                       nvml=unavailable_nvml())
    await asyncio.wait_for(server.entered.wait(), WAIT)
    started = time.monotonic()
    await monitor.stop(WAIT)
    assert time.monotonic() - started < 1.0
    assert monitor.task is not None and monitor.task.done() and not monitor.task.cancelled()


async def test_stop_does_not_wait_for_a_sample_stuck_in_the_driver(monitors):
    entered, gate, shut = threading.Event(), threading.Event(), threading.Event()

    class StuckNvml(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            entered.set()
            assert gate.wait(WAIT)
            return super().nvmlDeviceGetCount()

        def nvmlShutdown(self) -> None:
            super().nvmlShutdown()
            shut.set()

    stuck = StuckNvml(two_gpus())
    monitor = GpuMonitor(Metrics(), Published(), [], interval=3600, nvml=NvmlSampler(nvml=stuck))
    monitor.nvml_close_timeout = 0.05
    monitor.start()
    try:
        assert await asyncio.to_thread(entered.wait, WAIT)
        started = time.monotonic()
        await monitor.stop(WAIT)
        assert time.monotonic() - started < 1.0
    finally:
        gate.set()
    assert await asyncio.to_thread(shut.wait, WAIT)  # NVML is still shut down once the driver returns
    assert stuck.initialised == 0


# -- the REST route ------------------------------------------------------------------------------------------
async def test_gpus_route(fake, monitors):
    published = Published()
    monitor = monitors(Metrics(), published, [], interval=3600, nvml=NvmlSampler(nvml=fake))
    body = await published.next()
    for service, expected in ((SimpleNamespace(gpu_monitor=monitor), {"gpus": body["gpus"], "source": "nvml"}),
                              (SimpleNamespace(), {"gpus": [], "source": "none"})):
        app = web.Application()
        app[SERVICE] = service  # type: ignore[assignment]
        app.add_routes(gpus.routes)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get("/v1/comfyui/gpus")
            assert response.status == 200
            assert await response.json() == expected
