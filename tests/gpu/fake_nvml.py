"""A stand-in for pynvml, shared by the NVML sampler and GPU monitor tests.

It exposes the same function names as pynvml and raises exactly what pynvml raises: an error is built as
``pynvml.NVMLError(code)`` with pynvml's own code constants, and ``NVMLError.__new__`` maps the code to the subclass
pynvml generated for it (``NVMLError_GpuIsLost`` ...; all subclasses of the real ``NVMLError``). So the code under
test sees the same classes, codes and messages as on a real host.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pynvml

GiB = 1024**3


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeDevice:
    def __init__(self, *, uuid, name, util, used, total, temp, power_mw):
        self.uuid, self.name, self.util = uuid, name, util
        self.used, self.total, self.temp, self.power_mw = used, total, temp, power_mw
        self.fail: dict[str, int] = {}  # NVML function name -> error code it raises
        self.fail_after: dict[str, tuple[int, int]] = {}  # function -> (successful calls before failing, code)


class FakeNvml:
    """Same names as pynvml: functions, NVMLError and its subclasses, NVML_* constants."""

    def __init__(self, devices: list[FakeDevice], init_error: int | None = None):
        for attr in dir(pynvml):
            if attr.startswith(("NVML_ERROR_", "NVMLError", "NVML_TEMPERATURE_")) or attr == "NVML_SUCCESS":
                setattr(self, attr, getattr(pynvml, attr))
        self.devices = devices
        self.init_error = init_error
        self.initialised = 0
        self.calls: dict[str, int] = {}
        self.threads: set[int] = set()

    def _call(self, fn: str, handle: FakeDevice | None = None) -> None:
        self.threads.add(threading.get_ident())
        key = fn if handle is None else f"{fn}#{id(handle)}"
        self.calls[key] = self.calls.get(key, 0) + 1
        if fn != "nvmlInit" and not self.initialised:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is not None:
            if fn in handle.fail:
                raise nvml_error(handle.fail[fn])
            if fn in handle.fail_after:
                ok, code = handle.fail_after[fn]
                if self.calls[key] > ok:
                    raise nvml_error(code)

    def nvmlInit(self):
        self._call("nvmlInit")
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self._call("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        dev = self.devices[index]
        self._call("nvmlDeviceGetHandleByIndex", dev)
        return dev

    def nvmlDeviceGetUUID(self, h):
        self._call("nvmlDeviceGetUUID", h)
        return h.uuid

    def nvmlDeviceGetName(self, h):
        self._call("nvmlDeviceGetName", h)
        return h.name

    def nvmlDeviceGetUtilizationRates(self, h):
        self._call("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=h.util, memory=h.util // 2)  # c_nvmlUtilization_t: ints, percent

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        self._call("nvmlDeviceGetMemoryInfo", h)
        return SimpleNamespace(total=h.total, free=h.total - h.used, used=h.used)  # c_nvmlMemory_t: bytes

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._call("nvmlDeviceGetTemperature", h)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return h.temp  # int, degrees C

    def nvmlDeviceGetPowerUsage(self, h):
        self._call("nvmlDeviceGetPowerUsage", h)
        return h.power_mw  # int, milliwatts


def two_gpus() -> list[FakeDevice]:
    return [
        FakeDevice(
            uuid="GPU-11111111-2222-3333-4444-555555555555", name="NVIDIA GeForce RTX 4090",
            util=87, used=20 * GiB, total=24 * GiB, temp=71, power_mw=312_456,
        ),
        FakeDevice(
            uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", name="NVIDIA RTX A6000",
            util=0, used=512 * 1024**2, total=48 * GiB, temp=34, power_mw=21_000,
        ),
    ]
