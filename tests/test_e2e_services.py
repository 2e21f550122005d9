"""The service registry: a ComfyUI that registers itself becomes a backend without a restart."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.harness import Comfyd, workflow


async def test_registered_comfyui_becomes_a_backend_for_the_next_job(comfyd_factory, comfy_standin_factory) -> None:
    comfyd: Comfyd = await comfyd_factory(["http://127.0.0.1:9"], backend_wait=3600)  # configured one is dead
    other = await comfy_standin_factory("registered")
    body = {"service": "comfyui-mcp", "version": "1.0.0",
            "endpoints": {"health": f"{other.url}/system_stats", "api": other.url},
            "capabilities": ["text2img", "img2img", "video", "upscale"]}
    status, view = await comfyd.request("POST", "/v1/services/register", json=body)
    assert status == 201 and view["backend"] == "svc-comfyui-mcp" and view["pool"] == "local"
    workflow_id = await comfyd.submit(workflow("quick", **{"1.color": 4242}))
    end = await comfyd.wait_end(workflow_id)
    assert end["type"] == "workflow:completed"
    assert (await comfyd.get(workflow_id))["backend"] == "svc-comfyui-mcp"
    assert [p["prompt_id"] for p in other.posted] == [f"{workflow_id}-1"]
    monitor = comfyd.service.gpu_monitor
    await monitor.snapshot()  # its mailbox is in order: the new backend is watched by now
    assert any(g["gpu_id"].startswith("svc-comfyui-mcp:") for g in await monitor.sample_once())  # its GPUs too
    status, listing = await comfyd.request("GET", "/v1/services")
    [service] = listing["services"]
    assert service["service"] == "comfyui-mcp" and service["capabilities"] == body["capabilities"]
    async with asyncio.timeout(10):
        while (await comfyd.request("GET", "/v1/services"))[1]["services"][0]["status"] != "up":
            await asyncio.sleep(0)
    status, _ = await comfyd.request("DELETE", "/v1/services/comfyui-mcp")
    assert status == 200 and (await comfyd.request("GET", "/v1/services"))[1]["services"] == []
    assert (await comfyd.request("DELETE", "/v1/services/comfyui-mcp"))[0] == 404
    backends = {b["name"]: b["state"] for b in (await comfyd.request("GET", "/v1/comfyui/backends"))[1]["backends"]}
    assert backends["svc-comfyui-mcp"] == "retired"
    await monitor.snapshot()
    assert not any(g["gpu_id"].startswith("svc-comfyui-mcp:") for g in await monitor.sample_once())
    # registered again with the same URL: it takes work again
    assert (await comfyd.request("POST", "/v1/services/register", json=body))[0] == 201
    again = await comfyd.submit(workflow("quick", **{"1.color": 4244}))
    assert (await comfyd.wait_end(again))["type"] == "workflow:completed"
    assert (await comfyd.get(again))["backend"] == "svc-comfyui-mcp"


async def test_registration_is_persisted_and_bad_bodies_named(comfyd_factory, comfy_standin_factory) -> None:
    comfyd: Comfyd = await comfyd_factory(["http://127.0.0.1:9"])
    other = await comfy_standin_factory("persisted")
    status, body = await comfyd.request("POST", "/v1/services/register", json={"service": "x"})
    assert status == 400 and body["field"] == "endpoints"
    status, body = await comfyd.request("POST", "/v1/services/register",
                                        json={"service": "x", "endpoints": {"health": "ftp://nope"}})
    assert status == 400 and body["field"] == "endpoints.health"
    good = {"service": "gpu-box", "version": "2", "endpoints": {"health": f"{other.url}/system_stats",
                                                                  "api": other.url}, "pool": "salad"}
    assert (await comfyd.request("POST", "/v1/services/register", json=good))[0] == 201
    await comfyd.stop()
    again = Comfyd(comfyd.config)
    await again.start()
    try:
        _, listing = await again.request("GET", "/v1/services")
        assert [s["service"] for s in listing["services"]] == ["gpu-box"]
        workflow_id = await again.submit(workflow("quick", **{"1.color": 4343}), gpu="salad")
        assert (await again.wait_end(workflow_id))["type"] == "workflow:completed"
    finally:
        await again.stop()


async def test_comfyd_registers_itself_upstream_with_retries(comfyd_factory, tmp_path) -> None:
    from comfyd.upstream import register_upstream
    import aiohttp

    received: list[dict] = []
    arrived = asyncio.Event()
    attempts = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return web.Response(status=503)  # the management API is still starting
        received.append(await request.json())
        assert request.headers["X-API-Key"] == "upstream-key"
        arrived.set()
        return web.json_response({}, status=201)

    app = web.Application()
    app.router.add_post("/v1/services/register", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(register_upstream(session, f"http://127.0.0.1:{port}", api_key="upstream-key",
                                                     public_url="http://127.0.0.1:9090", backoff_max=0.05))
        await asyncio.wait_for(arrived.wait(), 10)
        await task
    await runner.cleanup()
    assert received[0]["service"] == "comfyd" and received[0]["endpoints"]["health"] == "http://127.0.0.1:9090/health"
