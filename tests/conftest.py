"""Shared fixtures: a stand-in ComfyUI and comfyd running in-process on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.comfyui_standin import StandInComfyUI
from tests.comfyui_standin.fixtures import comfy_standin, comfy_standin_factory  # noqa: F401
from tests.harness import Comfyd, make_config


@pytest.fixture
def standin_node_time() -> float:
    """Seconds each node takes in the stand-in; a test module may override this fixture."""
    return 0.002


@pytest.fixture
async def standin(tmp_path: Path, standin_node_time: float) -> AsyncIterator[StandInComfyUI]:
    server = StandInComfyUI(tmp_path / "comfy", node_time=standin_node_time)
    await server.start()
    try:
        yield server
    finally:
        server.release()
        await server.stop()


@pytest.fixture
async def comfyd_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Comfyd]]]:
    started: list[Comfyd] = []

    async def make(backends: list[StandInComfyUI] | list[str], *, outputs: Path | None = None,
                   models: Path | None = None, **scheduler: Any) -> Comfyd:
        urls = [b if isinstance(b, str) else b.url for b in backends]
        config = make_config(tmp_path, urls, **scheduler)
        first = backends[0] if backends else None
        if models is not None:
            config.paths.models = str(models)
        if outputs is not None:
            config.paths.outputs = str(outputs)
        elif isinstance(first, StandInComfyUI):
            config.paths.outputs = str(first.output_dir)
        app = await Comfyd(config).start()
        started.append(app)
        return app

    yield make
    for app in reversed(started):
        await app.stop()


@pytest.fixture
async def comfyd(standin: StandInComfyUI, comfyd_factory: Callable[..., Awaitable[Comfyd]]) -> Comfyd:
    return await comfyd_factory([standin])
