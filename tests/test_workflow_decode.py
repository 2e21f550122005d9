"""decode_submit: every refusal names its field; prefix_outputs puts saved files under the workflow's folder."""

from __future__ import annotations

import copy
import json
import posixpath
from typing import Any

import pytest

from comfyd.errors import BadRequest
from comfyd.workflow import decode_submit, prefix_outputs

GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def body(**fields: Any) -> bytes:
    return json.dumps({"workflow": GRAPH, **fields}).encode()


def refusal(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as error:
        decode_submit(raw)
    assert error.value.status == 400
    return error.value


def test_a_valid_body_with_defaults() -> None:
    submit = decode_submit(body())
    assert submit.workflow == GRAPH
    assert (submit.priority, submit.gpu, submit.timeout, submit.keepPrefix) == ("normal", "local", None, False)


def test_a_valid_body_with_every_field_and_unknown_extras() -> None:
    submit = decode_submit(body(priority="high", gpu="salad", timeout=90, keepPrefix=True, client="x"))
    assert (submit.priority, submit.gpu, submit.timeout, submit.keepPrefix) == ("high", "salad", 90.0, True)


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t"])
def test_an_empty_body(raw: bytes) -> None:
    error = refusal(raw)
    assert error.extra["field"] == "body"
    assert "empty" in error.message


@pytest.mark.parametrize("raw", [b"not json", b"{", b'{"workflow": {}', b"\xff\xfe", b"{'workflow': {}}"])
def test_a_body_that_is_not_json(raw: bytes) -> None:
    error = refusal(raw)
    assert error.extra["field"] == "body"
    assert "JSON" in error.message


@pytest.mark.parametrize("raw", [b"[]", b"42", b'"workflow"', b"null"])
def test_a_body_that_is_not_an_object(raw: bytes) -> None:
    assert refusal(raw).extra["field"] == "body"


def test_no_workflow() -> None:
    error = refusal(b'{"priority": "high"}')
    assert error.extra["field"] == "workflow"
    assert "workflow" in error.message


@pytest.mark.parametrize("workflow", [[], "graph", 3, None, True])
def test_a_workflow_that_is_not_an_object(workflow: Any) -> None:
    error = refusal(json.dumps({"workflow": workflow}).encode())
    assert error.extra["field"] == "workflow"


def test_a_workflow_without_nodes() -> None:
    error = refusal(b'{"workflow": {}}')
    assert error.extra["field"] == "workflow"
    assert "no nodes" in error.message


@pytest.mark.parametrize("node", [5, "SaveImage", [], None])
def test_a_node_that_is_not_an_object(node: Any) -> None:
    error = refusal(json.dumps({"workflow": {**GRAPH, "12": node}}).encode())
    assert error.extra["field"] == "workflow.12"
    assert "12" in error.message


@pytest.mark.parametrize("node", [{"inputs": {}}, {"class_type": "", "inputs": {}}, {"class_type": 7, "inputs": {}},
                                  {"class_type": None, "inputs": {}}])
def test_a_node_without_class_type(node: dict[str, Any]) -> None:
    error = refusal(json.dumps({"workflow": {**GRAPH, "12": node}}).encode())
    assert error.extra["field"] == "workflow.12.class_type"
    assert "class_type" in error.message


@pytest.mark.parametrize("node", [{"class_type": "SaveImage"}, {"class_type": "SaveImage", "inputs": []},
                                  {"class_type": "SaveImage", "inputs": None}])
def test_a_node_without_inputs(node: dict[str, Any]) -> None:
    error = refusal(json.dumps({"workflow": {**GRAPH, "12": node}}).encode())
    assert error.extra["field"] == "workflow.12.inputs"
    assert "SaveImage" in error.message and "inputs" in error.message


def test_a_ui_format_workflow_is_told_to_export_the_api_format() -> None:
    ui = {"last_node_id": 9, "last_link_id": 9, "version": 0.4,
          "nodes": [{"id": 9, "type": "SaveImage", "widgets_values": ["ComfyUI"]}],
          "links": [[9, 8, 0, 9, 0, "IMAGE"]]}
    error = refusal(json.dumps({"workflow": ui}).encode())
    assert error.extra["field"] == "workflow"
    assert "UI format" in error.message
    assert "API" in error.message  # "Export (API)" / "Save (API Format)"


@pytest.mark.parametrize("priority", ["urgent", "HIGH", "", 1, None])
def test_an_unknown_priority(priority: Any) -> None:
    error = refusal(body(priority=priority))
    assert error.extra["field"] == "priority"
    assert "priority" in error.message


@pytest.mark.parametrize("timeout", [-1, 0, -0.5])
def test_a_timeout_that_is_not_positive(timeout: float) -> None:
    error = refusal(body(timeout=timeout))
    assert error.extra["field"] == "timeout"


def test_a_timeout_that_is_not_a_number() -> None:
    assert refusal(body(timeout="soon")).extra["field"] == "timeout"


@pytest.mark.parametrize("gpu", [1, None, ["local"]])
def test_a_gpu_that_is_not_a_string(gpu: Any) -> None:
    assert refusal(body(gpu=gpu)).extra["field"] == "gpu"


# -- prefix_outputs ------------------------------------------------------------------------------------------
def test_prefix_outputs_rewrites_filename_prefix_and_leaves_other_nodes_alone() -> None:
    original = copy.deepcopy(GRAPH)
    rewritten = prefix_outputs(GRAPH, "wf-1")
    assert rewritten["9"]["inputs"] == {"filename_prefix": "wf-1/ComfyUI", "images": ["8", 0]}
    assert rewritten["9"]["class_type"] == "SaveImage"
    assert rewritten["4"] == GRAPH["4"] and rewritten["8"] == GRAPH["8"]
    assert list(rewritten) == list(GRAPH)
    assert GRAPH == original  # the caller's graph is not changed


def test_prefix_outputs_handles_every_saving_node_and_subfolders() -> None:
    graph = {
        "1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "portraits/face"}},
        "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"filename_prefix": "/abs"}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["7", 0]}},  # a link, not a string
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    rewritten = prefix_outputs(graph, "wf-2")
    assert rewritten["1"]["inputs"]["filename_prefix"] == "wf-2/portraits/face"
    assert rewritten["2"]["inputs"]["filename_prefix"] == "wf-2/abs"
    assert rewritten["3"]["inputs"]["filename_prefix"] == ["7", 0]
    assert rewritten["4"] == graph["4"]


@pytest.mark.parametrize("prefix", ["../other-workflow/x", "a/../../x"])
def test_prefix_outputs_keeps_files_inside_the_workflow_folder(prefix: str) -> None:
    graph = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix}}}
    try:
        rewritten = prefix_outputs(decode_submit(json.dumps({"workflow": graph}).encode()).workflow, "wf-3")
    except BadRequest as error:  # refusing it at the door is as good
        assert "filename_prefix" in error.extra.get("field", "")
        return
    resolved = posixpath.normpath(rewritten["9"]["inputs"]["filename_prefix"])
    assert resolved.startswith("wf-3/"), f"{prefix!r} saves to {resolved!r}, outside the workflow's folder"
