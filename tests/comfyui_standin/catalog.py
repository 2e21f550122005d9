"""The node catalogue: the real ``GET /object_info`` plus a few test-only classes.

Validation reads input specs, combo lists, output types and ``output_node``
from here, exactly as the real server reads them from its node classes.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

OBJECT_INFO_PATH = Path(__file__).with_name("object_info.json")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Test-only node classes. They are listed by GET /object_info like any other
# class (python_module "custom_nodes.comfyd_standin").
TEST_NODE_INFO: dict[str, dict[str, Any]] = {
    "StandInRaise": {
        "input": {
            "required": {
                "exception_type": ["STRING", {"default": "RuntimeError", "multiline": False}],
                "exception_message": ["STRING", {"default": "stand-in failure", "multiline": True}],
            },
            "optional": {"image": ["IMAGE"]},
        },
        "input_order": {"required": ["exception_type", "exception_message"], "optional": ["image"]},
        "output": ["IMAGE"],
        "output_is_list": [False],
        "output_name": ["IMAGE"],
        "name": "StandInRaise",
        "display_name": "Stand-in: raise an exception",
        "description": "Test-only. Raises exception_type(exception_message) when it runs "
        "(e.g. torch.OutOfMemoryError). Never cached.",
        "python_module": "custom_nodes.comfyd_standin",
        "category": "testing",
        "output_node": True,
    },
    "StandInSleep": {
        "input": {
            "required": {
                "seconds": ["FLOAT", {"default": 0.1, "min": 0.0, "max": 3600.0, "step": 0.01}],
                "steps": ["INT", {"default": 10, "min": 1, "max": 10000, "step": 1}],
            },
            "optional": {"image": ["IMAGE"]},
        },
        "input_order": {"required": ["seconds", "steps"], "optional": ["image"]},
        "output": ["IMAGE"],
        "output_is_list": [False],
        "output_name": ["IMAGE"],
        "name": "StandInSleep",
        "display_name": "Stand-in: sleep with progress",
        "description": "Test-only. Sleeps `seconds` in `steps` ProgressBar steps (progress "
        "messages, interrupt checked at every step), passes the image through. Never cached.",
        "python_module": "custom_nodes.comfyd_standin",
        "category": "testing",
        "output_node": True,
    },
}


@functools.lru_cache(maxsize=1)
def _load_base() -> dict[str, Any]:
    data = json.loads(OBJECT_INFO_PATH.read_text(encoding="utf-8"))
    data.update(copy.deepcopy(TEST_NODE_INFO))
    return data


class Catalog:
    """Read-only view of the node classes, with LoadImage's file list made live."""

    def __init__(self, input_dir: Path) -> None:
        self._info = _load_base()
        self._input_dir = input_dir

    def has(self, class_type: Any) -> bool:
        return isinstance(class_type, str) and class_type in self._info

    def info(self, class_type: str) -> dict[str, Any]:
        return self._info[class_type]

    def is_output(self, class_type: str) -> bool:
        return bool(self._info[class_type].get("output_node"))

    def output_types(self, class_type: str) -> list[Any]:
        return list(self._info[class_type].get("output", []))

    def inputs(self, class_type: str) -> list[tuple[str, str]]:
        """(name, category) for the required then optional inputs, in declared order."""
        spec = self._info[class_type]["input"]
        order = self._info[class_type].get("input_order", {})
        out: list[tuple[str, str]] = []
        for category in ("required", "optional"):
            names = order.get(category) or list(spec.get(category, {}))
            out.extend((name, category) for name in names if name in spec.get(category, {}))
        return out

    def input_spec(self, class_type: str, name: str) -> tuple[Any, dict[str, Any]]:
        """(type, options) of one input; options is {} when the spec has none."""
        spec = self._info[class_type]["input"]
        for category in ("required", "optional"):
            if name in spec.get(category, {}):
                entry = spec[category][name]
                input_type = entry[0]
                if class_type == "LoadImage" and name == "image":
                    input_type = self.input_images()
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                return input_type, options
        raise KeyError(name)

    def input_images(self) -> list[str]:
        """Top-level image files of input/, as LoadImage's combo list shows them."""
        try:
            names = [
                p.name
                for p in self._input_dir.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            ]
        except FileNotFoundError:
            return []
        return sorted(names)

    def object_info(self, class_type: str | None = None) -> dict[str, Any]:
        if class_type is not None:
            if class_type not in self._info:
                return {}
            classes = {class_type: self._info[class_type]}
        else:
            classes = self._info
        if "LoadImage" in classes:
            classes = dict(classes)
            load = copy.deepcopy(classes["LoadImage"])
            load["input"]["required"]["image"][0] = self.input_images()
            classes["LoadImage"] = load
        return classes
