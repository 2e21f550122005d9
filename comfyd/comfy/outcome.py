"""How a run ends: read its history entry (it lags the socket), collect its outputs, and decide the result.

A run that succeeded with every frame heard on one socket needs no history: ComfyUI sends ``executed`` for
every output node, cached ones included (trace s02), before ``execution_success``, and the history entry holds
the same outputs. Skipping the read spares ComfyUI a request at the moment it starts the next prompt."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyd.comfy import errors as comfy_errors
from comfyd.comfy.client import BackendError, BackendUnreachable, ComfyClient
from comfyd.config import BackendConfig
from comfyd.errors import ComfydError
from comfyd.messages import JobError, JobFinished
from comfyd.outputs.collect import collect_outputs

if TYPE_CHECKING:
    from comfyd.actors.executor_state import RunState


async def conclude(client: ComfyClient, state: RunState, backend: BackendConfig, outputs_dir: Path,
                   entry: dict[str, Any] | None = None) -> tuple[JobFinished, bool]:
    """The run's ``JobFinished``, and whether it ran out of memory (the backend should free memory next)."""
    run, tracker = state.run, state.tracker
    if entry is None and not (tracker.succeeded and state.heard_all):
        entry = await history_with_retry(client, run.prompt_id)
    if entry is not None:
        tracker.on_history(entry)
    if tracker.error is not None:
        error = comfy_errors.from_execution_error(tracker.error)
        return job_result(state, backend.name, "failed", error=error), error.error_type == "oom"
    if tracker.interrupted is not None or (state.stop_reason and not tracker.succeeded):
        return stopped_result(state, backend.name), False
    if tracker.succeeded or entry is not None:
        try:
            outputs = await collect_outputs(client, tracker.output_list(include_temp=True), outputs_dir,
                                            local=backend.shared_outputs, workflow_id=run.workflow_id)
        except (BackendUnreachable, BackendError, OSError, ComfydError) as exc:
            return job_result(state, backend.name, "failed", error=JobError(
                error_type="internal", message=f"the outputs could not be collected: {exc}")), False
        return job_result(state, backend.name, "completed", outputs=tuple(outputs)), False
    return job_result(state, backend.name, "failed", retry=True, error=JobError(
        error_type="backend_lost", message="ComfyUI ended the prompt without a result")), False


async def history_with_retry(client: ComfyClient, prompt_id: str, attempts: int = 20) -> dict[str, Any] | None:
    delay = 0.01
    for _ in range(attempts):
        try:
            entry = await client.history(prompt_id)
        except (BackendUnreachable, BackendError):
            entry = None
        if entry is not None:
            return entry
        await asyncio.sleep(delay)  # ComfyUI writes history just after the socket says so: retry pacing
        delay = min(delay * 2, 0.5)
    return None


def stopped_result(state: RunState, backend: str) -> JobFinished:
    if state.stop_reason == "timeout":
        return job_result(state, backend, "failed", error=JobError(
            error_type="timeout",
            message=f"the job ran longer than its timeout of {state.run.timeout:g}s and was interrupted"))
    if state.stop_reason == "cancel":
        return job_result(state, backend, "cancelled")
    node = (state.tracker.interrupted or {}).get("node_type")
    return job_result(state, backend, "failed", error=JobError(
        error_type="internal",
        message=f"the prompt was interrupted on the backend by someone else{f' at {node}' if node else ''}"))


def job_result(state: RunState, backend: str, status: str, *, outputs: tuple = (), error: JobError | None = None,
               retry: bool = False) -> JobFinished:
    tracker = state.tracker
    return JobFinished(workflow_id=state.run.workflow_id, backend=backend, status=status,  # type: ignore[arg-type]
                       outputs=outputs, error=error, retry=retry, current_node=tracker.current_class,
                       progress=tracker.progress if state.started else None)
