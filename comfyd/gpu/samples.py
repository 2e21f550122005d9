"""One reading of one GPU (or of one backend device when NVML is not available)."""

from __future__ import annotations

import msgspec

SOURCE_NVML = "nvml"
SOURCE_SYSTEM_STATS = "system_stats"


class GpuSample(msgspec.Struct, frozen=True):
    """A point-in-time reading of one device.

    Units: percent (0-100) for utilisation, bytes for VRAM, degrees Celsius for temperature, watts for power.
    A field is ``None`` when the source cannot report it (not supported by the device, or not exposed by
    ComfyUI's ``/system_stats``).

    ``gpu_id`` is the NVML index as a string (``"0"``) for NVML samples and ``"<backend>:<index>"`` for samples
    taken from a backend's ``/system_stats``; it is the ``gpu_id`` label of the Prometheus metrics.
    """

    gpu_id: str
    uuid: str | None
    name: str
    utilization_percent: float | None
    vram_used_bytes: int | None
    vram_total_bytes: int | None
    temperature_c: float | None
    power_watts: float | None
    source: str  # "nvml" | "system_stats"
    backend: str | None
