"""Validate a workflow at the door against a backend's node catalogue (``GET /object_info``).

Only what is certain to fail in ComfyUI is rejected, each with the node and input named: an unknown
``class_type``, a required input that is missing, a link to a node that is not in the workflow or to an
output slot the node does not have, and a workflow with no output node. Value ranges and combos are left
to ComfyUI (its answer is kept as ``errorDetail`` when it rejects the prompt).
"""

from __future__ import annotations

from typing import Any

from comfyd.errors import BadRequest


class Catalogue:
    def __init__(self, object_info: dict[str, Any]) -> None:
        self.classes = object_info

    def __len__(self) -> int:
        return len(self.classes)

    def check(self, workflow: dict[str, Any]) -> None:
        problems: list[dict[str, str]] = []
        has_output = False
        for node_id, node in workflow.items():
            class_type = node["class_type"]
            spec = self.classes.get(class_type)
            if spec is None:
                problems.append({"node": node_id, "classType": class_type,
                                 "message": f"node {node_id}: unknown class_type {class_type!r} (not installed on "
                                            "the backend; is a custom node missing?)"})
                continue
            has_output = has_output or bool(spec.get("output_node"))
            inputs = node["inputs"]
            for name in (spec.get("input") or {}).get("required") or {}:
                if name not in inputs:
                    problems.append({"node": node_id, "classType": class_type, "input": name,
                                     "message": f"node {node_id} ({class_type}): required input {name!r} is missing"})
            for name, value in inputs.items():
                if _is_link(value):
                    source = str(value[0])
                    if source not in workflow:
                        problems.append({"node": node_id, "classType": class_type, "input": name,
                                         "message": f"node {node_id} ({class_type}): input {name!r} links to node "
                                                    f"{source}, which is not in the workflow"})
                        continue
                    source_spec = self.classes.get(workflow[source]["class_type"])
                    outputs = (source_spec or {}).get("output")
                    if outputs is not None and not 0 <= int(value[1]) < max(1, len(outputs)):
                        problems.append({"node": node_id, "classType": class_type, "input": name,
                                         "message": f"node {node_id} ({class_type}): input {name!r} links to output "
                                                    f"{value[1]} of node {source}, which has {len(outputs)}"})
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BadRequest(first["message"] + more, field=_field(first), problems=problems)
        if not has_output:
            raise BadRequest("the workflow has no output node (SaveImage, PreviewImage, ...): ComfyUI would run "
                             "nothing", field="workflow")


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _field(problem: dict[str, str]) -> str:
    field = f"workflow.{problem['node']}"
    return f"{field}.inputs.{problem['input']}" if "input" in problem else f"{field}.class_type"
