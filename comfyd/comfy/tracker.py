"""What one prompt has done so far, folded from ComfyUI's WebSocket frames and its history entry.

Progress is the share of the prompt's nodes that have finished, with the running node counted by its own
``value / max`` (``progress_state`` is cumulative; ``progress`` refines the running node). Nodes served from
the cache (``execution_cached``) are left out of the total. It never goes backwards, and reaches 100 only
when the prompt succeeded. ``currentNode`` is the running node's ``class_type``, as the seed shows
("KSampler").
"""

from __future__ import annotations

from typing import Any

from comfyd.messages import Output


class PromptTracker:
    def __init__(self, workflow: dict[str, Any]) -> None:
        self.workflow = workflow
        self.cached: set[str] = set()
        self.nodes: dict[str, tuple[float, float, str]] = {}  # node id -> (value, max, state)
        self.current: str | None = None
        self.outputs: dict[tuple[str, str, str], Output] = {}
        self.started = False
        self.succeeded = False
        self.error: dict[str, Any] | None = None
        self.interrupted: dict[str, Any] | None = None
        self._progress = 0.0

    # -- frames --------------------------------------------------------------------------------------------
    def apply(self, frame_type: str, data: dict[str, Any]) -> str | None:
        """Fold one frame of this prompt in. Returns "start" when execution has begun, "end" on
        ``executing {node: null}`` (the prompt is over and its history entry is readable)."""
        match frame_type:
            case "execution_start":
                return "start"
            case "execution_cached":
                self.on_cached(data.get("nodes") or [])
            case "executing":
                if data.get("node") is None:
                    return "end"
                self.on_executing(data["node"])
                return "start"
            case "progress_state":
                self.on_progress_state(data.get("nodes") or {})
            case "progress":
                self.on_progress(data.get("node"), data.get("value", 0), data.get("max", 1))
            case "executed":
                self.on_executed(data.get("node"), data.get("output"))
            case "execution_success":
                self.succeeded = True
            case "execution_error":
                self.error = data
            case "execution_interrupted":
                self.interrupted = data
        return None

    def on_cached(self, nodes: list[str]) -> None:
        self.cached.update(str(n) for n in nodes)

    def on_executing(self, node: str | None) -> None:
        if node is not None:
            self.current = str(node)

    def on_progress_state(self, nodes: dict[str, Any]) -> None:
        for node_id, state in nodes.items():
            self.nodes[str(node_id)] = (float(state.get("value", 0)), float(state.get("max", 1) or 1),
                                        str(state.get("state", "running")))
            if state.get("state") == "running":
                self.current = str(node_id)

    def on_progress(self, node: str | None, value: float, maximum: float) -> None:
        if node is None:
            node = self.current
        if node is None:
            return
        previous = self.nodes.get(str(node))
        if previous is None or previous[2] != "finished":
            self.nodes[str(node)] = (float(value), float(maximum or 1), "running")

    def on_executed(self, node: str | None, output: dict[str, Any] | None) -> None:
        for ref in _refs(output or {}):
            self.outputs.setdefault((ref.folder_type, ref.subfolder, ref.filename),
                                    Output(filename=ref.filename, subfolder=ref.subfolder,
                                           folder_type=ref.folder_type, node_id=None if node is None else str(node)))

    def on_history(self, entry: dict[str, Any]) -> None:
        """Merge a ``/history/{id}`` entry (outputs and the final status message)."""
        for node_id, output in (entry.get("outputs") or {}).items():
            self.on_executed(node_id, output)
        for kind, data in (entry.get("status") or {}).get("messages") or []:
            if kind == "execution_success":
                self.succeeded = True
            elif kind == "execution_error":
                self.error = data
            elif kind == "execution_interrupted":
                self.interrupted = data
            elif kind == "execution_cached":
                self.on_cached(data.get("nodes") or [])

    # -- views ---------------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.succeeded or self.error is not None or self.interrupted is not None

    @property
    def progress(self) -> float:
        if self.succeeded:
            return 100.0
        total = max(1, len([n for n in self.workflow if n not in self.cached]))
        done = 0.0
        for node_id, (value, maximum, state) in self.nodes.items():
            if node_id in self.cached:
                continue
            done += 1.0 if state == "finished" else min(1.0, value / maximum if maximum else 0.0)
        self._progress = max(self._progress, min(99.0, round(100.0 * done / total, 1)))
        return self._progress

    @property
    def current_class(self) -> str | None:
        if self.current is None:
            return None
        node = self.workflow.get(self.current)
        return node.get("class_type", self.current) if isinstance(node, dict) else self.current

    def output_list(self, *, include_temp: bool = False) -> list[Output]:
        return [o for o in self.outputs.values() if include_temp or o.folder_type == "output"]


def _refs(output: dict[str, Any]) -> list[Output]:
    """File references in a node's UI output: ``images``, ``gifs``, ``videos``, ``audio``, ... lists."""
    refs = []
    for items in output.values():
        if not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("filename"), str):
                refs.append(Output(filename=item["filename"], subfolder=str(item.get("subfolder") or ""),
                                   folder_type=str(item.get("type") or "output")))
    return refs
