"""/metrics after a real run: every series comfyd promises is there and parses."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from comfyd.gpu.nvml import NvmlSampler
from tests.gpu.fake_nvml import FakeNvml, two_gpus
from tests.harness import Comfyd, make_config, workflow


async def test_every_series_present_after_success_failure_and_cancel(standin, tmp_path) -> None:
    config = make_config(tmp_path, [standin.url])
    config.paths.outputs = str(standin.output_dir)
    comfyd = await Comfyd(config, nvml=NvmlSampler(nvml=FakeNvml(two_gpus()))).start()
    try:
        ok = await comfyd.submit(workflow("quick", **{"1.color": 5}))
        bad = await comfyd.submit(workflow("fail_exec"))
        for workflow_id in (ok, bad):
            await comfyd.wait_end(workflow_id)
        standin.hold()
        held = await comfyd.submit(workflow("quick", **{"1.color": 6}))
        await standin.wait_for(lambda: standin.held is not None)
        cancel = asyncio.create_task(comfyd.request("DELETE", f"/v1/comfyui/workflow/{held}"))
        await standin.wait_for(lambda: standin.interrupt_calls)
        standin.release()
        assert (await cancel)[0] == 200
        await comfyd.service.gpu_monitor.sample_once()
        async with comfyd.stream() as ws:  # one WebSocket client connected while scraping
            await ws.send_json({"type": "ping"})
            await ws.receive_json(timeout=5)
            status, text = await comfyd.request("GET", "/metrics")
    finally:
        await comfyd.stop()
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert {s: value("comfyui_workflow_total", status=s) for s in
            ("queued", "started", "completed", "failed", "cancelled")} == \
        {"queued": 3, "started": 3, "completed": 1, "failed": 1, "cancelled": 1}
    assert value("comfyui_workflow_errors_total", error_type="node_error") == 1
    assert value("comfyui_workflow_duration_seconds_count", gpu_type="local") == 1
    buckets = sorted(float(dict(k[1])["le"]) for k in samples if k[0] == "comfyui_workflow_duration_seconds_bucket")
    assert buckets == [1, 5, 10, 30, 60, 120, 300, 600, float("inf")]
    assert value("comfyui_queue_length") == 0
    assert value("comfyui_gpu_utilization", gpu_id="0") > 0 and ("comfyui_gpu_utilization", (("gpu_id", "1"),)) in samples
    assert value("comfyui_vram_usage_bytes", gpu_id="0") > 0
    assert value("comfyui_vram_total_bytes", gpu_id="0") >= value("comfyui_vram_usage_bytes", gpu_id="0")
    assert ("comfyui_gpu_temperature_celsius", (("gpu_id", "0"),)) in samples
    assert ("comfyui_gpu_power_watts", (("gpu_id", "0"),)) in samples
    assert value("comfyd_queue_wait_seconds_count", gpu_type="local") == 3
    assert value("comfyd_backend_up", backend="gpu0", pool="local") == 1
    assert ("comfyd_backend_busy", (("backend", "gpu0"), ("pool", "local"))) in samples
    assert value("comfyd_ws_clients") == 1
    assert value("comfyd_ws_messages_dropped_total", reason="slow_client") == 0
    assert value("comfyd_ws_slow_clients_dropped_total") == 0
    assert value("comfyd_http_requests_total", method="POST", route="/v1/comfyui/workflow", status="202") == 3
    assert any(k[0] == "comfyd_http_request_duration_seconds_bucket" for k in samples)
    # label values stay bounded: no workflow id anywhere in /metrics
    assert ok not in text.decode() and bad not in text.decode()
