"""NVML sampling of the host's NVIDIA GPUs.

Every NVML call blocks (it talks to the driver, and can take tens of milliseconds per device, seconds for
``nvmlInit`` on a large host), so the asyncio side must call :meth:`NvmlSampler.sample_async` /
:meth:`NvmlSampler.open_async`, which run the blocking calls in a worker thread.

Where NVML is absent (no NVIDIA driver, a container without the driver mounted, a CPU-only box)
:meth:`NvmlSampler.open` returns ``False`` and leaves one human-readable sentence in
:attr:`NvmlSampler.unavailable_reason`; the GPU monitor then falls back to the backends' ``/system_stats``.

Errors are classified by their NVML return code (``exc.value``), not by the exception subclass, so the
sampler behaves the same with any pynvml version and with a stand-in module injected by tests.
"""

from __future__ import annotations

import asyncio
import threading
from types import ModuleType
from typing import Any

from comfyd.gpu.samples import SOURCE_NVML, GpuSample

try:  # nvidia-ml-py is a hard dependency, but never let its absence break the import of comfyd.
    import pynvml as _pynvml
except ImportError:  # pragma: no cover - only without nvidia-ml-py installed
    _pynvml = None

_DEFAULT = object()

# NVML return codes (nvml.h). They are stable C ABI values; the module's own constants are preferred when present.
_CODES = {
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_RESET_REQUIRED": 16,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "NVML_ERROR_UNKNOWN": 999,
}
_NVML_TEMPERATURE_GPU = 0


class NvmlUnavailableError(RuntimeError):
    """NVML cannot be used for sampling (never opened, or the whole library failed, e.g. driver unloaded)."""


class NvmlSampler:
    """Samples utilisation, VRAM, temperature and power of every NVIDIA GPU through NVML.

    Lifecycle: ``open()`` once (``False`` = NVML unusable here, see ``unavailable_reason``), ``sample()`` as often as
    needed, ``close()`` at the end. After each ``sample()``:

    * ``lost``: NVML indices of the devices that were skipped in that sample because the GPU is gone or broken
      (``GPU_IS_LOST``, ``RESET_REQUIRED`` or ``UNKNOWN`` from any call on it). Replaced on every sample.
    * ``skipped``: index -> reason for every device left out of that sample (the lost ones included, plus devices
      whose handle could not be obtained at all, e.g. ``NO_PERMISSION``).

    A field a device does not support (``NOT_SUPPORTED``) or will not give (any other per-field NVML error)
    becomes ``None`` in the sample; the other fields and the other devices are unaffected.
    """

    def __init__(self, nvml: Any = _DEFAULT) -> None:
        self._nvml: ModuleType | Any | None = _pynvml if nvml is _DEFAULT else nvml
        self._opened = False
        self._lock = threading.Lock()
        self.unavailable_reason: str | None = None
        self.lost: set[int] = set()
        self.skipped: dict[int, str] = {}
        if self._nvml is not None:
            c = {name: getattr(self._nvml, name, value) for name, value in _CODES.items()}
            self._lost_codes = frozenset(
                (c["NVML_ERROR_GPU_IS_LOST"], c["NVML_ERROR_RESET_REQUIRED"], c["NVML_ERROR_UNKNOWN"])
            )
            self._hints = {
                c["NVML_ERROR_LIBRARY_NOT_FOUND"]: "the NVML library (libnvidia-ml.so.1) was not found:"
                " no NVIDIA driver is installed or it is not visible to this process",
                c["NVML_ERROR_DRIVER_NOT_LOADED"]: "the NVIDIA kernel driver is not loaded",
                c["NVML_ERROR_NO_PERMISSION"]: "this process lacks permission to use NVML (/dev/nvidia*)",
                c["NVML_ERROR_LIB_RM_VERSION_MISMATCH"]: "the NVML library and the loaded NVIDIA kernel driver"
                " differ in version (driver upgraded without a reboot?)",
                c["NVML_ERROR_FUNCTION_NOT_FOUND"]: "the NVML library is too old for this pynvml",
            }
            self._temperature_gpu = getattr(self._nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU)

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def is_open(self) -> bool:
        return self._opened

    def open(self) -> bool:
        """Initialise NVML. Returns ``False`` (and sets ``unavailable_reason``) when it cannot be used. Never raises
        for a missing library or driver."""
        with self._lock:
            if self._opened:
                return True
            if self._nvml is None:
                self.unavailable_reason = "NVML unavailable: the nvidia-ml-py package (pynvml) is not installed"
                return False
            try:
                self._nvml.nvmlInit()
            except self._nvml.NVMLError as exc:
                self.unavailable_reason = f"NVML unavailable: {self._describe(exc)}"
                return False
            except OSError as exc:  # some bindings let the dlopen failure through
                self.unavailable_reason = f"NVML unavailable: the NVML library could not be loaded ({exc})"
                return False
            self._opened = True
            self.unavailable_reason = None
            return True

    def close(self) -> None:
        """Shut NVML down if this sampler initialised it. Idempotent; never raises for NVML errors."""
        with self._lock:
            if not self._opened:
                return
            self._opened = False
            try:
                self._nvml.nvmlShutdown()
            except (self._nvml.NVMLError, OSError):
                pass

    async def open_async(self) -> bool:
        return await asyncio.to_thread(self.open)

    async def close_async(self) -> None:
        await asyncio.to_thread(self.close)

    # ----------------------------------------------------------------------------------------------- sampling

    async def sample_async(self) -> list[GpuSample]:
        """:meth:`sample`, run in a worker thread so the event loop never blocks on the driver."""
        return await asyncio.to_thread(self.sample)

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU NVML can see, in NVML index order. Blocking.

        Raises :class:`NvmlUnavailableError` when NVML is not open or the device count itself cannot be read
        (the library as a whole has failed); per-device and per-field failures never raise.
        """
        with self._lock:
            if not self._opened:
                raise NvmlUnavailableError(self.unavailable_reason or "NVML is not open")
            nvml = self._nvml
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except nvml.NVMLError as exc:
                self.unavailable_reason = f"NVML failed: {self._describe(exc)}"
                raise NvmlUnavailableError(self.unavailable_reason) from exc

            samples: list[GpuSample] = []
            lost: set[int] = set()
            skipped: dict[int, str] = {}
            for index in range(count):
                try:
                    samples.append(self._sample_device(index))
                except _DeviceLost as exc:
                    lost.add(index)
                    skipped[index] = exc.reason
                except _DeviceSkipped as exc:
                    skipped[index] = exc.reason
            self.lost = lost
            self.skipped = skipped
            return samples

    def _sample_device(self, index: int) -> GpuSample:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            if self._code(exc) in self._lost_codes:
                raise _DeviceLost(self._describe(exc)) from exc
            raise _DeviceSkipped(self._describe(exc)) from exc

        uuid = self._field(nvml.nvmlDeviceGetUUID, handle)
        name = self._field(nvml.nvmlDeviceGetName, handle)
        util = self._field(nvml.nvmlDeviceGetUtilizationRates, handle)
        mem = self._field(nvml.nvmlDeviceGetMemoryInfo, handle)
        temp = self._field(nvml.nvmlDeviceGetTemperature, handle, self._temperature_gpu)
        power_mw = self._field(nvml.nvmlDeviceGetPowerUsage, handle)

        return GpuSample(
            gpu_id=str(index),
            uuid=_text(uuid) if uuid is not None else None,
            name=_text(name) if name is not None else f"GPU {index}",
            utilization_percent=float(util.gpu) if util is not None else None,
            vram_used_bytes=int(mem.used) if mem is not None else None,
            vram_total_bytes=int(mem.total) if mem is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_watts=power_mw / 1000.0 if power_mw is not None else None,  # NVML reports milliwatts
            source=SOURCE_NVML,
            backend=None,
        )

    def _field(self, fn: Any, *args: Any) -> Any:
        """Call one NVML getter; ``None`` when the device cannot give that field, :class:`_DeviceLost` when the
        device itself is gone."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            if self._code(exc) in self._lost_codes:
                raise _DeviceLost(self._describe(exc)) from exc
            # NOT_SUPPORTED is the common case (e.g. power on some boards); NO_PERMISSION, TIMEOUT,
            # INSUFFICIENT_POWER, NO_DATA ... likewise leave just this field empty.
            return None

    # ----------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _code(exc: BaseException) -> int | None:
        return getattr(exc, "value", None)

    def _describe(self, exc: BaseException) -> str:
        code = self._code(exc)
        hint = getattr(self, "_hints", {}).get(code)
        try:
            text = str(exc)
        except Exception:  # pragma: no cover - pynvml's __str__ may call into the library
            text = ""
        label = f"{type(exc).__name__}" + (f" (code {code})" if code is not None else "")
        if hint:
            return f"{hint} [{label}: {text}]" if text else f"{hint} [{label}]"
        return f"{label}: {text}" if text else label


class _DeviceLost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _DeviceSkipped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(value: Any) -> str:
    """pynvml < 11.5 returns ``bytes`` for names and UUIDs, newer versions ``str``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
