"""Typed application keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from comfyd.service import Service

SERVICE: web.AppKey["Service"] = web.AppKey("service")
