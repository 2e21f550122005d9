"""GPU samples from a ComfyUI backend's ``GET /system_stats``: the fallback where NVML is absent (no local NVIDIA
driver, or a remote backend whose GPU this host cannot see).

ComfyUI reports the torch device it runs on::

    {"system": {...}, "devices": [{"name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "type": "cuda",
                                   "index": 0, "vram_total": ..., "vram_free": ..., "torch_vram_total": ...,
                                   "torch_vram_free": ...}]}

Policy: comfyd reports what the backend reports. A ComfyUI started with ``--cpu`` reports one device
``{"name": "cpu", "type": "cpu", "index": null}`` whose ``vram_*`` figures are the host's RAM; it is kept (it is
the memory that backend computes in), and its ``name`` always carries the device type so a ``cpu`` device cannot be
mistaken for a GPU. ``vram_total``/``vram_free`` are the device-wide figures (``torch.cuda.mem_get_info``), so
``used = total - free`` counts every process on the device, as NVML does; the ``torch_vram_*`` figures (torch's
own pool) are not used. ComfyUI does not expose utilisation, temperature or power: those are ``None``.
"""

from __future__ import annotations

from typing import Any

from comfyd.gpu.samples import SOURCE_SYSTEM_STATS, GpuSample


def parse_system_stats(backend_name: str, body: dict) -> list[GpuSample]:
    """Turn a ``/system_stats`` body into one :class:`GpuSample` per device, in the order the backend lists them.

    ``gpu_id`` is ``f"{backend_name}:{index}"`` (index 0 when the backend gives none, as for ``cpu``). Malformed
    entries are skipped and malformed numbers become ``None``; this never raises on a bad body.
    """
    devices = body.get("devices") if isinstance(body, dict) else None
    if not isinstance(devices, list):
        return []
    samples: list[GpuSample] = []
    for device in devices:
        if not isinstance(device, dict):
            continue
        index = device.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = None
        total = _bytes(device.get("vram_total"))
        free = _bytes(device.get("vram_free"))
        used = max(total - free, 0) if total is not None and free is not None else None
        samples.append(
            GpuSample(
                gpu_id=f"{backend_name}:{index if index is not None else 0}",
                uuid=None,
                name=_name(device.get("name"), device.get("type")),
                utilization_percent=None,
                vram_used_bytes=used,
                vram_total_bytes=total,
                temperature_c=None,
                power_watts=None,
                source=SOURCE_SYSTEM_STATS,
                backend=backend_name,
            )
        )
    return samples


def _name(name: Any, dev_type: Any) -> str:
    """The backend's device name, prefixed with its type unless the name already starts with it
    (``"cuda:0 NVIDIA ..."`` and ``"cpu"`` stay as they are; a bare ``"NVIDIA ..."`` of type cuda becomes
    ``"cuda NVIDIA ..."``)."""
    name = name.strip() if isinstance(name, str) else ""
    dev_type = dev_type.strip() if isinstance(dev_type, str) else ""
    if not dev_type:
        return name or "unknown"
    if not name:
        return dev_type
    if name.lower().startswith(dev_type.lower()):
        return name
    return f"{dev_type} {name}"


def _bytes(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or value < 0 or value == float("inf"):  # NaN, negative, infinite
        return None
    return int(value)
