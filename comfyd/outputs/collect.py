"""Bring a finished run's outputs onto comfyd's disk and describe them for the index.

With a shared disk (ComfyUI writes into the outputs folder comfyd reads) the file is already there; for a
remote backend, or when the file is missing locally, it is fetched through ComfyUI's ``/view``. Paths that
ComfyUI reports are checked like any client's: nothing lands outside the outputs folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from comfyd.comfy.client import ComfyClient
from comfyd.messages import Output
from comfyd.outputs.files import describe, safe_relpath

PREVIEWS = "_previews"
INLINE_BYTES = 256 * 1024  # a smaller file is hashed on the loop: quicker than a hop to a thread and back


async def collect_outputs(client: ComfyClient, refs: list[Output], outputs_dir: Path, *, local: bool,
                          workflow_id: str) -> list[Output]:
    """Saved outputs keep ComfyUI's place in the outputs folder. Previews (``type: temp``, which ComfyUI wipes on
    restart and never shares) are fetched into ``<workflowId>/_previews/`` so they stay with their workflow."""
    collected = []
    for ref in refs:
        temp = ref.folder_type != "output"
        subfolder = f"{workflow_id}/{PREVIEWS}" if temp else ref.subfolder
        path = outputs_dir / safe_relpath(f"{subfolder}/{ref.filename}" if subfolder else ref.filename)
        if temp or not (local and path.is_file()):
            await client.download(filename=ref.filename, subfolder=ref.subfolder, folder_type=ref.folder_type,
                                  dest=path)
        small = path.stat().st_size <= INLINE_BYTES
        facts = describe(path) if small else await asyncio.to_thread(describe, path)
        collected.append(Output(filename=ref.filename, subfolder=subfolder, folder_type=ref.folder_type,
                                node_id=ref.node_id, **facts))  # type: ignore[arg-type]
    return collected
