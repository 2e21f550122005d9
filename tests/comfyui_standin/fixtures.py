"""pytest fixtures for the stand-in (import them into a conftest.py).

    from comfyui_standin.fixtures import comfy_standin, comfy_standin_factory  # noqa: F401
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from .server import StandInComfyUI


@pytest_asyncio.fixture
async def comfy_standin(tmp_path: Path) -> AsyncIterator[StandInComfyUI]:
    """A started stand-in rooted at tmp_path/"comfy" (node_time 0), stopped afterwards."""
    standin = StandInComfyUI(root=tmp_path / "comfy", node_time=0.0)
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()


@pytest_asyncio.fixture
async def comfy_standin_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[StandInComfyUI]]]:
    """make(name="comfy", **kwargs) -> a started stand-in; all are stopped afterwards."""
    made: list[StandInComfyUI] = []

    async def make(name: str = "comfy", **kwargs: Any) -> StandInComfyUI:
        kwargs.setdefault("node_time", 0.0)
        standin = StandInComfyUI(root=tmp_path / name, **kwargs)
        await standin.start()
        made.append(standin)
        return standin

    try:
        yield make
    finally:
        for standin in made:
            await standin.stop()
