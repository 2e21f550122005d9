"""Questions to ComfyUI about one prompt, and the calls that take it out of ComfyUI's hands.

Each answers with where the prompt is now: ``history`` (finished), ``running``, ``pending``, ``unknown``
(ComfyUI does not know it: it restarted or never got it), ``gone`` (deleted), ``withdrawn``, or
``unreachable``. ``POST /queue {delete}`` and ``POST /interrupt`` answer an empty 200 whatever happened, so
every call is followed by a look at ``/queue``.
"""

from __future__ import annotations

from typing import Any

from comfyd.comfy.client import BackendError, BackendUnreachable, ComfyClient


async def where_is(client: ComfyClient, prompt_id: str) -> tuple[str, dict[str, Any] | None]:
    try:
        entry = await client.history(prompt_id)
        if entry is not None:
            return "history", entry
        running, pending = await client.queue()
        if prompt_id in running:
            return "running", None
        if prompt_id in pending:
            return "pending", None
        entry = await client.history(prompt_id)  # it may have finished between the two calls
        return ("history", entry) if entry is not None else ("unknown", None)
    except (BackendUnreachable, BackendError):
        return "unreachable", None


async def stop(client: ComfyClient, prompt_id: str) -> str:
    """Waiting inside ComfyUI: delete it there. Running: interrupt that prompt only (it then ends with
    ``execution_interrupted`` on the socket: answer ``interrupting``)."""
    try:
        running, pending = await client.queue()
        if prompt_id in pending:
            await client.delete_pending([prompt_id])
            running, pending = await client.queue()
        if prompt_id in running:
            await client.interrupt(prompt_id)
            return "interrupting"
        return "pending" if prompt_id in pending else "gone"
    except (BackendUnreachable, BackendError):
        return "unreachable"


async def take_back(client: ComfyClient, prompt_id: str) -> str:
    """Delete a prompt that waits in ComfyUI's queue, unless it has started meanwhile."""
    try:
        _, pending = await client.queue()
        if prompt_id not in pending:
            return "running-or-gone"
        await client.delete_pending([prompt_id])
        running, pending = await client.queue()
    except (BackendUnreachable, BackendError):
        return "unreachable"
    return "withdrawn" if prompt_id not in running and prompt_id not in pending else "running-or-gone"
