"""NvmlSampler against a stand-in for pynvml, and against the real pynvml of this machine.

The stand-in (``tests/gpu/fake_nvml.py``) exposes the same function names as pynvml and raises exactly what pynvml
raises, so the code under test sees the same classes, codes and messages as on a real host.
"""

from __future__ import annotations

import asyncio
import threading

import pynvml
import pytest

from comfyd.gpu import GpuSample, NvmlSampler, NvmlUnavailableError
from tests.gpu.fake_nvml import FakeNvml, GiB, nvml_error, two_gpus


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(two_gpus())


def test_stand_in_raises_what_pynvml_raises():
    err = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert type(err) is pynvml.NVMLError_GpuIsLost
    assert isinstance(err, pynvml.NVMLError) and err.value == 15
    assert str(err) == "GPU is lost"
    assert type(nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)) is pynvml.NVMLError_NotSupported


def test_two_gpus_sampled_with_units(fake):
    s = NvmlSampler(nvml=fake)
    assert s.open() is True
    assert s.unavailable_reason is None
    samples = s.sample()
    assert samples == [
        GpuSample(
            gpu_id="0", uuid="GPU-11111111-2222-3333-4444-555555555555", name="NVIDIA GeForce RTX 4090",
            utilization_percent=87.0, vram_used_bytes=20 * GiB, vram_total_bytes=24 * GiB,
            temperature_c=71.0, power_watts=312.456, source="nvml", backend=None,
        ),
        GpuSample(
            gpu_id="1", uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", name="NVIDIA RTX A6000",
            utilization_percent=0.0, vram_used_bytes=512 * 1024**2, vram_total_bytes=48 * GiB,
            temperature_c=34.0, power_watts=21.0, source="nvml", backend=None,
        ),
    ]
    assert all(isinstance(x.utilization_percent, float) for x in samples)
    assert all(isinstance(x.vram_used_bytes, int) for x in samples)
    assert s.lost == set() and s.skipped == {}
    s.close()
    assert fake.initialised == 0


def test_bytes_name_and_uuid_from_older_pynvml(fake):
    fake.devices[0].name = b"Tesla T4"
    fake.devices[0].uuid = b"GPU-0000"
    s = NvmlSampler(nvml=fake)
    assert s.open()
    first = s.sample()[0]
    assert first.name == "Tesla T4" and first.uuid == "GPU-0000"


def test_unsupported_field_becomes_none(fake):
    fake.devices[0].fail["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.devices[1].fail["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.devices[1].fail["nvmlDeviceGetUtilizationRates"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    s = NvmlSampler(nvml=fake)
    assert s.open()
    a, b = s.sample()
    assert a.power_watts is None
    assert a.temperature_c == 71.0 and a.utilization_percent == 87.0 and a.vram_total_bytes == 24 * GiB
    assert b.temperature_c is None and b.utilization_percent is None
    assert b.power_watts == 21.0 and b.vram_used_bytes == 512 * 1024**2
    assert s.lost == set()


def test_other_field_errors_also_become_none(fake):
    fake.devices[0].fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_NO_PERMISSION
    fake.devices[0].fail["nvmlDeviceGetUUID"] = pynvml.NVML_ERROR_TIMEOUT
    s = NvmlSampler(nvml=fake)
    assert s.open()
    a, b = s.sample()
    assert a.vram_used_bytes is None and a.vram_total_bytes is None and a.uuid is None
    assert a.name == "NVIDIA GeForce RTX 4090" and b.vram_total_bytes == 48 * GiB


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN, pynvml.NVML_ERROR_RESET_REQUIRED]
)
def test_gpu_lost_mid_run(fake, code):
    # device 1 answers the first sample, then is lost in the middle of the second (after its UUID and name).
    fake.devices[1].fail_after["nvmlDeviceGetUtilizationRates"] = (1, code)
    s = NvmlSampler(nvml=fake)
    assert s.open()
    first = s.sample()
    assert [x.gpu_id for x in first] == ["0", "1"] and s.lost == set()

    second = s.sample()
    assert [x.gpu_id for x in second] == ["0"]
    assert second[0] == first[0]
    assert s.lost == {1}
    assert set(s.skipped) == {1} and s.skipped[1]
    s.close()


def test_gpu_lost_at_handle_and_recovery(fake):
    fake.devices[0].fail["nvmlDeviceGetHandleByIndex"] = pynvml.NVML_ERROR_GPU_IS_LOST
    s = NvmlSampler(nvml=fake)
    assert s.open()
    assert [x.gpu_id for x in s.sample()] == ["1"]
    assert s.lost == {0}
    del fake.devices[0].fail["nvmlDeviceGetHandleByIndex"]
    assert [x.gpu_id for x in s.sample()] == ["0", "1"]
    assert s.lost == set()  # `lost` describes the latest sample


def test_device_without_permission_is_skipped_not_lost(fake):
    fake.devices[1].fail["nvmlDeviceGetHandleByIndex"] = pynvml.NVML_ERROR_NO_PERMISSION
    s = NvmlSampler(nvml=fake)
    assert s.open()
    assert [x.gpu_id for x in s.sample()] == ["0"]
    assert s.lost == set()
    assert "Permission" in s.skipped[1] or "permission" in s.skipped[1]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so.1"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "version"),
    ],
)
def test_open_fails_cleanly(code, words):
    fake = FakeNvml(two_gpus(), init_error=code)
    s = NvmlSampler(nvml=fake)
    assert s.open() is False
    assert isinstance(s.unavailable_reason, str) and words in s.unavailable_reason
    assert "\n" not in s.unavailable_reason
    with pytest.raises(NvmlUnavailableError):
        s.sample()
    s.close()  # no shutdown for an init that failed
    assert "nvmlShutdown" not in fake.calls


def test_open_fails_on_oserror():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    s = NvmlSampler(nvml=Broken([]))
    assert s.open() is False
    assert "could not be loaded" in s.unavailable_reason


def test_no_pynvml_module():
    s = NvmlSampler(nvml=None)
    assert s.open() is False
    assert "not installed" in s.unavailable_reason


def test_whole_library_failure_raises_unavailable(fake):
    s = NvmlSampler(nvml=fake)
    assert s.open()

    def count():
        raise nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    fake.nvmlDeviceGetCount = count
    with pytest.raises(NvmlUnavailableError, match="driver is not loaded"):
        s.sample()


def test_open_twice_inits_once_and_close_is_idempotent(fake):
    s = NvmlSampler(nvml=fake)
    assert s.open() and s.open()
    assert fake.initialised == 1
    s.close()
    s.close()
    assert fake.initialised == 0 and fake.calls["nvmlShutdown"] == 1
    with pytest.raises(NvmlUnavailableError):
        s.sample()


def test_real_pynvml_on_this_machine():
    """No NVIDIA driver here: open() is False with a reason, and nothing raises. On a GPU host it samples."""
    s = NvmlSampler()
    try:
        opened = s.open()
        if opened:  # a real NVIDIA host
            samples = s.sample()
            assert all(x.source == "nvml" for x in samples)
        else:
            assert s.unavailable_reason
            with pytest.raises(NvmlUnavailableError):
                s.sample()
    finally:
        s.close()


async def test_sample_async_runs_off_the_loop(fake):
    s = NvmlSampler(nvml=fake)
    assert await s.open_async()
    loop_thread = threading.get_ident()
    fake.threads.clear()
    samples = await s.sample_async()
    assert len(samples) == 2
    assert fake.threads and loop_thread not in fake.threads
    await s.close_async()
    assert fake.initialised == 0


async def test_sample_async_does_not_block_the_loop(fake):
    gate = threading.Event()
    entered = threading.Event()
    original = fake.nvmlDeviceGetCount

    def slow_count():
        entered.set()
        assert gate.wait(5)
        return original()

    fake.nvmlDeviceGetCount = slow_count
    s = NvmlSampler(nvml=fake)
    assert s.open()
    task = asyncio.create_task(s.sample_async())
    assert await asyncio.to_thread(entered.wait, 5)  # the loop keeps running while the driver call blocks
    assert not task.done()
    gate.set()
    assert len(await task) == 2
