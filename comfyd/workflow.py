"""The submit body, decoded once at the door: shape checks that name what and where, and the output prefix.

Checks here need nothing but the body. Checks against a backend's node catalogue (unknown class_type,
missing required input, links to missing nodes) live in ``comfyd.comfy.catalogue``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from comfyd.errors import BadRequest


class SubmitBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    workflow: dict[str, Any]
    priority: Literal["low", "normal", "high"] = "normal"
    gpu: str = "local"
    timeout: float | None = None  # seconds of execution before comfyd interrupts it
    keepPrefix: bool = False  # noqa: N815 - the wire name


_submit = msgspec.json.Decoder(SubmitBody)
_PATH = re.compile(r"at `\$\.?([^`]*)`")


def decode_submit(raw: bytes) -> SubmitBody:
    if not raw.strip():
        raise BadRequest("the body is empty: send JSON {\"workflow\": {...}}", field="body")
    try:
        body = _submit.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        field = (match.group(1) or "body") if match else "body"
        if "missing required field `workflow`" in text:
            field = "workflow"
        raise BadRequest(f"invalid submit body: {text}", field=field) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", field="body") from None
    check_workflow(body.workflow)
    if body.timeout is not None and body.timeout <= 0:
        raise BadRequest("timeout must be a positive number of seconds", field="timeout")
    return body


def check_workflow(workflow: dict[str, Any]) -> None:
    """An API-format workflow: ``{node_id: {"class_type": str, "inputs": {...}}, ...}``."""
    if isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list):
        raise BadRequest("this is a workflow in ComfyUI's UI format (top-level nodes/links); export it in API "
                         "format (Workflow > Export (API)) and submit that", field="workflow")
    if not workflow:
        raise BadRequest("the workflow has no nodes", field="workflow")
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            raise BadRequest(f"node {node_id} must be an object with class_type and inputs",
                             field=f"workflow.{node_id}")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise BadRequest(f"node {node_id} has no class_type", field=f"workflow.{node_id}.class_type")
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            raise BadRequest(f"node {node_id} ({class_type}) has no inputs object", field=f"workflow.{node_id}.inputs")
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str) and ".." in prefix.replace("\\", "/").split("/"):
            raise BadRequest(f"node {node_id}: filename_prefix may not contain '..' (files stay in the outputs "
                             "folder)", field=f"workflow.{node_id}.inputs.filename_prefix")


def prefix_outputs(workflow: dict[str, Any], workflow_id: str) -> dict[str, Any]:
    """Put every saving node's files under a folder named for the workflow (``<id>/<prefix>``), so that
    outputs are attributable and ComfyUI's per-save directory listing stays short."""
    rewritten = {}
    for node_id, node in workflow.items():
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            node = {**node, "inputs": {**node["inputs"], "filename_prefix": f"{workflow_id}/{prefix.lstrip('/')}"}}
        rewritten[node_id] = node
    return rewritten
