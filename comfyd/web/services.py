"""``/v1/services``: register (the seed's body), list, deregister."""

from __future__ import annotations

import msgspec
from aiohttp import web

from comfyd.actors.registry import Deregister, ListServices, Register, Registration
from comfyd.errors import BadRequest
from comfyd.web.keys import SERVICE

routes = web.RouteTableDef()
_decode = msgspec.json.Decoder(Registration)


@routes.post("/v1/services/register")
async def register(request: web.Request) -> web.Response:
    try:
        registration = _decode.decode(await request.read())
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid registration: {exc}", field=_field(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", field="body") from None
    if not registration.service.strip():
        raise BadRequest("service must be a non-empty name", field="service")
    for field, url in (("endpoints.health", registration.endpoints.health), ("endpoints.api",
                                                                             registration.endpoints.api)):
        if url is not None and not url.startswith(("http://", "https://")):
            raise BadRequest(f"{field} must be an http(s) URL, not {url!r}", field=field)
    service = request.app[SERVICE]
    view = await service.registry.ask(Register(registration=registration), 10)
    return web.json_response(view, status=201)


@routes.get("/v1/services")
async def list_services(request: web.Request) -> web.Response:
    return web.json_response({"services": await request.app[SERVICE].registry.ask(ListServices(), 10)})


@routes.delete("/v1/services/{name}")
async def deregister(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE].registry.ask(Deregister(name=request.match_info["name"]), 10))


def _field(text: str) -> str:
    if "`$." in text:
        return text.split("`$.", 1)[1].split("`", 1)[0]
    if "missing required field `" in text:
        return text.split("missing required field `", 1)[1].split("`", 1)[0]
    return "body"
