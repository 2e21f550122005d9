"""Turn what ComfyUI reports about a failure into an error a person can act on.

``errorType`` is one of: validation, oom, node_error, timeout, backend_unavailable, backend_lost, internal.
The sentence names the node (id and class) and ComfyUI's own message; the detail keeps ComfyUI's data
(``node_errors``, ``exception_type``, the traceback) for whoever needs more.
"""

from __future__ import annotations

from typing import Any

from comfyd.messages import JobError

_OOM_MARKERS = ("out of memory", "outofmemoryerror", "allocation on device", "cuda error: out of memory")


def is_oom(exception_type: str, exception_message: str) -> bool:
    text = f"{exception_type} {exception_message}".lower()
    return any(marker in text for marker in _OOM_MARKERS)


def from_execution_error(data: dict[str, Any]) -> JobError:
    """``execution_error`` frame data (or the same data from a history entry)."""
    exc_type = str(data.get("exception_type") or "")
    exc_message = str(data.get("exception_message") or "").strip()
    node_id, node_type = data.get("node_id"), data.get("node_type")
    oom = is_oom(exc_type, exc_message)
    where = f"node {node_id} ({node_type})" if node_id is not None else "a node"
    if oom:
        message = f"Out of memory in {where}: {exc_message or exc_type}"
    else:
        message = f"{where} failed: {exc_type + ': ' if exc_type else ''}{exc_message}"
    detail = {
        "nodeId": node_id,
        "nodeType": node_type,
        "exceptionType": exc_type,
        "exceptionMessage": exc_message,
        "traceback": list(data.get("traceback") or [])[-20:],
    }
    return JobError(error_type="oom" if oom else "node_error", message=message, detail=detail)


def from_rejected_prompt(body: dict[str, Any], workflow: dict[str, Any] | None = None) -> JobError:
    """A 400 from ``POST /prompt``: ``{"error": {type, message, details}, "node_errors": {...}}``."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {"message": str(body.get("error"))}
    node_errors = body.get("node_errors") or {}
    problems = []
    for node_id, entry in node_errors.items():
        class_type = entry.get("class_type") or (workflow or {}).get(node_id, {}).get("class_type")
        for item in entry.get("errors", []):
            text = item.get("message", "invalid")
            if item.get("details"):
                text += f": {item['details']}"
            problems.append(f"node {node_id} ({class_type}): {text}")
    summary = error.get("message") or "ComfyUI rejected the workflow"
    if error.get("details") and not problems:
        summary += f" ({error['details']})"
    if problems:
        summary += " - " + "; ".join(problems[:10])
    detail = {"error": error, "nodeErrors": node_errors}
    return JobError(error_type="validation", message=summary, detail=detail)
