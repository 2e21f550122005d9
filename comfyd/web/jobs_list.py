"""``GET /v1/comfyui/workflows?status=&limit=``: recent workflows, newest first."""

from __future__ import annotations

from aiohttp import web

from comfyd.errors import BadRequest
from comfyd.web.keys import SERVICE
from comfyd.web.workflows import job_view

routes = web.RouteTableDef()
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


@routes.get("/v1/comfyui/workflows")
async def list_workflows(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"unknown status {status!r}; one of {', '.join(STATUSES)}", field="status")
    raw = request.query.get("limit") or str(DEFAULT_LIMIT)
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be a whole number, not {raw!r}", field="limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    jobs = await request.app[SERVICE].jobs.recent(limit, status)
    return web.json_response({"workflows": [job_view(job) for job in jobs]})
