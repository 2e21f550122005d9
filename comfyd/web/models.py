"""``/v1/comfyui/models?type=``: the model catalogue."""

from __future__ import annotations

from aiohttp import web

from comfyd.errors import BadRequest
from comfyd.models.catalog import MODEL_TYPES
from comfyd.web.keys import SERVICE

routes = web.RouteTableDef()


@routes.get("/v1/comfyui/models")
async def list_models(request: web.Request) -> web.Response:
    model_type = request.query.get("type") or None
    if model_type is not None and model_type not in MODEL_TYPES:
        raise BadRequest(f"unknown model type {model_type!r}; one of {', '.join(MODEL_TYPES)}", field="type")
    service = request.app[SERVICE]
    remotes = [(e.config.name, e.config.url) for e in service.executors.values() if not e.config.shared_outputs]
    models = await service.models.list(model_type, remotes=remotes, session=service.session)
    return web.json_response({"models": models})
