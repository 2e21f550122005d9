"""GPU sampling: NVML on the host, ComfyUI's ``/system_stats`` as the fallback."""

from comfyd.gpu.nvml import NvmlSampler, NvmlUnavailableError
from comfyd.gpu.samples import SOURCE_NVML, SOURCE_SYSTEM_STATS, GpuSample
from comfyd.gpu.system_stats import parse_system_stats

__all__ = [
    "GpuSample",
    "NvmlSampler",
    "NvmlUnavailableError",
    "SOURCE_NVML",
    "SOURCE_SYSTEM_STATS",
    "parse_system_stats",
]
