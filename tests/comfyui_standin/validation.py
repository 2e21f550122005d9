"""POST /prompt validation, reproducing the error bodies the real server returns.

Result: ``(ok, error, good_outputs, node_errors)``. When ``ok`` is False the
server answers 400 ``{"error": error, "node_errors": node_errors}``; else the
prompt is queued with ``good_outputs`` and the response still carries
``node_errors`` of the branches that were dropped.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .nodes import NODES

Verdict = tuple[bool, list[dict[str, Any]], str]  # (valid, own errors, node id)


def _error(type_: str, message: str, details: str = "", extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


def _type_name(ex: BaseException) -> str:
    module = type(ex).__module__
    name = type(ex).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _types_match(received: Any, expected: Any) -> bool:
    if received == expected or received == "*" or expected == "*":
        return True
    if isinstance(expected, list) or expected == "COMBO":
        return received == "COMBO" or isinstance(received, list)
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return set(received.split(",")).issubset(set(expected.split(",")))


class _Validator:
    def __init__(self, catalog: Catalog, prompt: dict[str, Any], input_dir: Path) -> None:
        self.catalog = catalog
        self.prompt = prompt
        self.input_dir = input_dir
        self.validated: dict[str, Verdict] = {}
        self._visiting: set[str] = set()

    def node(self, unique_id: str) -> Verdict:
        if unique_id in self.validated:
            return self.validated[unique_id]
        if unique_id in self._visiting:
            raise RecursionError(f"dependency cycle at node {unique_id}")
        self._visiting.add(unique_id)
        try:
            verdict = self._node(unique_id)
        finally:
            self._visiting.discard(unique_id)
        self.validated[unique_id] = verdict
        return verdict

    def _node(self, unique_id: str) -> Verdict:
        node = self.prompt[unique_id]
        inputs = node["inputs"]  # KeyError -> exception_during_validation, as on the real server
        class_type = node["class_type"]
        impl = NODES.get(class_type)
        custom_names = impl.validate_names if impl is not None else ()
        errors: list[dict[str, Any]] = []
        valid = True

        for name, category in self.catalog.inputs(class_type):
            input_type, options = self.catalog.input_spec(class_type, name)
            input_config = [input_type, options]
            if name not in inputs:
                if category == "required":
                    errors.append(
                        _error("required_input_missing", "Required input is missing", name, {"input_name": name})
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            name,
                            {"input_name": name, "input_config": input_config, "received_value": value},
                        )
                    )
                    continue
                linked_id = value[0]
                linked_class = self.prompt[linked_id]["class_type"]  # KeyError for a missing node
                output_types = tuple(self.catalog.output_types(linked_class))
                received_type = output_types[value[1]]
                if not _types_match(received_type, input_type):
                    details = f"{name}, received_type({received_type}) mismatch input_type({input_type})"
                    errors.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            details,
                            {
                                "input_name": name,
                                "input_config": input_config,
                                "received_type": received_type,
                                "linked_node": value,
                            },
                        )
                    )
                    continue
                try:
                    if self.node(linked_id)[0] is False:
                        valid = False
                except Exception as ex:  # noqa: BLE001 - reported like the real server
                    valid = False
                    self.validated[linked_id] = (
                        False,
                        [
                            _error(
                                "exception_during_validation",
                                "Exception when validating inner node",
                                str(ex),
                                {
                                    "input_name": name,
                                    "input_config": input_config,
                                    "exception_message": str(ex),
                                    "exception_type": _type_name(ex),
                                    "traceback": traceback.format_tb(ex.__traceback__),
                                    "linked_node": value,
                                },
                            )
                        ],
                        linked_id,
                    )
                continue

            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            try:
                value = self._convert(input_type, value)
                inputs[name] = value
            except Exception as ex:  # noqa: BLE001 - reported like the real server
                errors.append(
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {input_type} value",
                        f"{name}, {value}, {ex}",
                        {
                            "input_name": name,
                            "input_config": input_config,
                            "received_value": value,
                            "exception_message": str(ex),
                        },
                    )
                )
                continue
            if name in custom_names:
                continue
            extra = {"input_name": name, "input_config": input_config, "received_value": value}
            if "min" in options and value < options["min"]:
                message = f"Value {value} smaller than min of {options['min']}"
                errors.append(_error("value_smaller_than_min", message, name, extra))
                continue
            if "max" in options and value > options["max"]:
                message = f"Value {value} bigger than max of {options['max']}"
                errors.append(_error("value_bigger_than_max", message, name, extra))
                continue
            combo = input_type if isinstance(input_type, list) else None
            if input_type == "COMBO":
                combo = list(options.get("options", []))
            if combo is not None and value not in combo:
                if len(combo) > 20:
                    list_info, extra["input_config"] = f"(list of length {len(combo)})", None
                else:
                    list_info = str(combo)
                errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {list_info}", extra))
                continue

        if impl is not None and impl.validate is not None:
            result = impl.validate(inputs, self.input_dir)
            if result is not True:
                for name in impl.validate_names:
                    details = name if result is False else f"{name} - {result}"
                    errors.append(
                        _error("custom_validation_failed", "Custom validation failed for node", details, {"input_name": name})
                    )

        if errors or not valid:
            return (False, errors, unique_id)
        return (True, [], unique_id)

    @staticmethod
    def _convert(input_type: Any, value: Any) -> Any:
        if input_type == "INT":
            return int(value)
        if input_type == "FLOAT":
            return float(value)
        if input_type == "STRING":
            return str(value)
        if input_type == "BOOLEAN":
            return bool(value)
        return value


def validate_prompt(
    catalog: Catalog, prompt: dict[str, Any], input_dir: Path, partial_targets: list[Any] | None = None
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            error = _error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
            return (False, error, [], {})
        class_type = node["class_type"]
        if not catalog.has(class_type):
            error = _error(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.", f"Node ID '#{node_id}'"
            )
            return (False, error, [], {})
        if partial_targets is None and catalog.is_output(class_type):
            outputs.append(node_id)
    if partial_targets is not None:
        outputs = [str(t) for t in partial_targets if str(t) in prompt]

    if not outputs:
        return (False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {})

    validator = _Validator(catalog, prompt, input_dir)
    good_outputs: list[str] = []
    failures: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        try:
            valid, reasons, _ = validator.node(output_id)
        except Exception as ex:  # noqa: BLE001 - reported like the real server
            valid = False
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(ex),
                    {"exception_type": _type_name(ex), "traceback": traceback.format_tb(ex.__traceback__)},
                )
            ]
            validator.validated[output_id] = (False, reasons, output_id)
        if valid is True:
            good_outputs.append(output_id)
            continue
        failures.append((output_id, reasons))
        # Every node that failed so far (with its own errors) gets this output as a dependent.
        for node_id, (node_valid, node_reasons, _) in validator.validated.items():
            if node_valid is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(output_id)

    if not good_outputs:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, reasons in failures for e in reasons)
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return (False, error, [], node_errors)
    return (True, None, good_outputs, node_errors)
