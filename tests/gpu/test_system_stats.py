"""parse_system_stats against the /system_stats body recorded from a real ComfyUI 0.3.64 (trace s15)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from comfyd.gpu import GpuSample, parse_system_stats

S15_BODY = json.loads((Path(__file__).parent / "fixtures" / "system_stats_s15.json").read_text())


def test_recorded_cpu_backend():
    samples = parse_system_stats("local0", S15_BODY)
    assert samples == [
        GpuSample(
            gpu_id="local0:0", uuid=None, name="cpu", utilization_percent=None,
            vram_used_bytes=25276514304 - 24250798080, vram_total_bytes=25276514304,
            temperature_c=None, power_watts=None, source="system_stats", backend="local0",
        )
    ]


def test_cuda_device_shape_from_comfyui_source():
    # comfy/model_management.get_torch_device_name: "{device} {torch.cuda.get_device_name()} : {allocator}"
    body = {
        "system": {},
        "devices": [
            {
                "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "type": "cuda", "index": 0,
                "vram_total": 25_757_220_864, "vram_free": 4_000_000_000,
                "torch_vram_total": 20_000_000_000, "torch_vram_free": 100_000_000,
            }
        ],
    }
    (s,) = parse_system_stats("salad-1", body)
    assert s.gpu_id == "salad-1:0"
    assert s.name == "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync"
    assert s.vram_total_bytes == 25_757_220_864 and s.vram_used_bytes == 25_757_220_864 - 4_000_000_000
    assert s.source == "system_stats" and s.backend == "salad-1" and s.uuid is None


def test_name_carries_type_and_index_used():
    body = {"devices": [{"name": "NVIDIA A100", "type": "cuda", "index": 3, "vram_total": 10, "vram_free": 4}]}
    (s,) = parse_system_stats("b", body)
    assert s.name == "cuda NVIDIA A100" and s.gpu_id == "b:3" and s.vram_used_bytes == 6


def test_malformed_bodies_never_raise():
    assert parse_system_stats("b", {}) == []
    assert parse_system_stats("b", {"devices": None}) == []
    assert parse_system_stats("b", {"devices": ["x", 3]}) == []
    assert parse_system_stats("b", []) == []  # type: ignore[arg-type]
    (s,) = parse_system_stats("b", {"devices": [{"type": "cuda", "index": True, "vram_total": "big"}]})
    assert s.gpu_id == "b:0" and s.name == "cuda"
    assert s.vram_total_bytes is None and s.vram_used_bytes is None
    (s,) = parse_system_stats("b", {"devices": [{"name": "x", "vram_total": 5, "vram_free": 9}]})
    assert s.vram_used_bytes == 0 and s.name == "x"


def test_sample_is_frozen_and_encodes():
    (s,) = parse_system_stats("local0", S15_BODY)
    try:
        s.name = "other"  # type: ignore[misc]
    except AttributeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("GpuSample must be frozen")
    assert msgspec.json.decode(msgspec.json.encode(s), type=GpuSample) == s
    assert hash(s) == hash(msgspec.structs.replace(s))
