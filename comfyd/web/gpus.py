"""``GET /v1/comfyui/gpus``: the GPU monitor's latest sample.

``{"gpus": [...], "source": "nvml" | "system_stats" | "none"}``; each GPU carries its own ``source`` too (with
NVML, remote backends are still read through ``/system_stats``). Without a GPU monitor: no GPUs, source ``none``.
"""

from __future__ import annotations

from aiohttp import web

from comfyd.web.keys import SERVICE

routes = web.RouteTableDef()


@routes.get("/v1/comfyui/gpus")
async def list_gpus(request: web.Request) -> web.Response:
    monitor = getattr(request.app[SERVICE], "gpu_monitor", None)
    if monitor is None:
        return web.json_response({"gpus": [], "source": "none"})
    return web.json_response(await monitor.snapshot())
