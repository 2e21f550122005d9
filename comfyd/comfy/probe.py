"""Questions to ComfyUI about one prompt, and the calls that take it out of ComfyUI's hands.

Each answers with where the prompt is now: ``history`` (finished), ``running``, ``pending``, ``unknown``
(ComfyUI does not know it: it restarted or never got it), ``gone`` (deleted), ``withdrawn``, or
``unreachable``. ``POST /queue {delete}`` and ``POST /interrupt`` answer an empty 200 whatever happened, so
every call is followed by a look at ``/queue``.
"""

from __future__ import annotations

from typing import Any

import structlog

from comfyd.actors.executor_state import Posted, Rejected, Unreachable
from comfyd.comfy import errors as comfy_errors
from comfyd.comfy.client import (
    BackendError,
    BackendUnreachable,
    ComfyClient,
    PromptRejected,
)
from comfyd.messages import JobError, Message, Run

log = structlog.get_logger("comfyd.executor")


async def post(client: ComfyClient, run: Run, client_id: str, *, free_first: bool) -> Message:
    """Hand a prompt to ComfyUI under comfyd's prompt_id. Answers ``Posted``, ``Rejected`` (ComfyUI said no:
    validation, or an unexpected answer) or ``Unreachable``. After an out-of-memory failure, ``free_first``
    lets ComfyUI release what it holds before the next prompt."""
    if free_first:
        try:
            await client.free()
        except (BackendUnreachable, BackendError) as exc:
            log.warning("comfyui_free_failed", url=client.base_url, error=str(exc))
    try:
        await client.post_prompt(run.workflow, client_id=client_id, prompt_id=run.prompt_id,
                                 extra_data={"comfyd": {"workflow_id": run.workflow_id, "attempt": run.attempt}})
    except PromptRejected as exc:
        return Rejected(prompt_id=run.prompt_id, error=comfy_errors.from_rejected_prompt(exc.body, run.workflow))
    except BackendUnreachable as exc:
        return Unreachable(prompt_id=run.prompt_id, reason=str(exc))
    except BackendError as exc:
        return Rejected(prompt_id=run.prompt_id, error=JobError(error_type="internal", message=str(exc)))
    return Posted(prompt_id=run.prompt_id)


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
