"""``/v1/comfyui/outputs`` (the index, newest first) and ``/v1/comfyui/output/{filename}`` (the file)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from comfyd.errors import BadRequest, NotFound
from comfyd.outputs.files import resolve_inside, safe_relpath
from comfyd.web.keys import SERVICE

routes = web.RouteTableDef()
MAX_LIMIT = 1000


def _int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {raw!r}", field=name) from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", field=name)
    return value


@routes.get("/v1/comfyui/outputs")
async def list_outputs(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    limit = _int(request, "limit", 50, low=1, high=MAX_LIMIT)
    page = await service.outputs.page(workflow_id=request.query.get("workflowId") or None,
                                      kind=request.query.get("kind") or request.query.get("type") or None,
                                      limit=limit, cursor=request.query.get("cursor") or None)
    return web.json_response(page)


@routes.get("/v1/comfyui/output/{filename:.+}")
async def download(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    path = resolve_inside(service.config.outputs_dir, request.match_info["filename"])
    # FileResponse answers Range (206), If-None-Match/ETag and If-Modified-Since, and sends from the kernel.
    return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600",
                                           "X-Content-Type-Options": "nosniff"})


@routes.delete("/v1/comfyui/outputs/{filename:.+}")
async def delete_output(request: web.Request) -> web.Response:
    """Remove an output file, its index entry, and its place in its job's outputs."""
    service = request.app[SERVICE]
    relpath = safe_relpath(request.match_info["filename"])
    try:
        path = resolve_inside(service.config.outputs_dir, relpath)
    except NotFound:
        path = None
    row = service.db.lookup("SELECT workflow_id FROM outputs WHERE path = ?", (relpath,))
    if path is None and row is None:
        raise NotFound(f"output {relpath} not found")
    if path is not None:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    statements = [service.outputs.delete_statement(relpath)]
    if row is not None and (unlisted := service.jobs.without_output(row[0], relpath)) is not None:
        statements.append(unlisted)  # the job no longer lists it either, in the same commit
    await service.db.write(statements)
    return web.json_response({"filename": relpath, "deleted": True})
