"""Running one prompt: node order, the classic cache, progress and the WS events.

Per executed node the owner sees: progress_state (running) -> executing ->
progress / binary frames -> executed (UI nodes) -> progress_state (finished).
Endings: execution_success | execution_error | execution_interrupted; the
worker then writes history, broadcasts status and sends executing null.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hub as wire
from . import images as im
from .images import Frame
from .nodes import NODES, StandInNodeError
from .prompt_queue import Outcome, QueueItem

if TYPE_CHECKING:
    from .runtime import Runtime

OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)
OOM_TYPES = {"torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"}


class Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class NodeFailed(Exception):
    def __init__(self, node_id: str, error: BaseException, inputs: dict[str, Any]) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.error = error
        self.inputs = inputs


@dataclass
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _type_name(ex: BaseException) -> str:
    if isinstance(ex, StandInNodeError):
        return ex.type_name
    module, name = type(ex).__module__, type(ex).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    if isinstance(value, list) and value and all(isinstance(f, Frame) for f in value):
        first = value[0]
        return f"tensor(shape=[{len(value)}, {first.height}, {first.width}, {first.channels}])"
    return str(value)


class _Context:
    """What a node function may use (see nodes.NodeContext)."""

    def __init__(self, run: PromptRun, node_id: str) -> None:
        rt = run.rt
        self._run = run
        self.node_id = node_id
        self.prompt_id = run.item.prompt_id
        self.prompt = run.item.prompt
        self.extra_data = run.item.extra_data
        self.output_dir: Path = rt.output_dir
        self.temp_dir: Path = rt.temp_dir
        self.input_dir: Path = rt.input_dir

    @property
    def temp_prefix(self) -> str:
        """PreviewImage's `_temp_xxxxx`: random per node object, kept while the node is cached."""
        return self._run.rt.object_state(self.node_id, self.prompt[self.node_id]["class_type"])

    async def progress(self, value: int, total: int, preview: Frame | None = None) -> None:
        """comfy.utils.ProgressBar.update_absolute: interrupt check, then the reports."""
        run, hub = self._run, self._run.rt.hub
        run.rt.check_interrupt(self.node_id)
        value = min(value, total)
        run.progress_update(self.node_id, value, total)
        client = run.client_id
        png = im.png_bytes(preview, 1) if preview is not None else None
        metadata_ok = hub.supports_preview_metadata(client)
        if png is not None and metadata_ok:
            meta = {
                "node_id": self.node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": self.node_id,
                "parent_node_id": None,
                "real_node_id": self.node_id,
                "image_type": "image/png",
            }
            hub.emit_binary(wire.preview_with_metadata_frame(png, meta), client)
        hub.emit("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id}, client)
        if png is not None and not metadata_ok:
            hub.emit_binary(wire.preview_frame(png), client)
        await run.rt.yield_now()

    def text(self, message: str) -> None:
        """PromptServer.send_progress_text without sid: broadcast to every socket."""
        self._run.rt.hub.emit_binary(wire.progress_text_frame(self.node_id, message), None)


class PromptRun:
    def __init__(self, rt: Runtime, item: QueueItem) -> None:
        self.rt = rt
        self.item = item
        self.prompt = item.prompt
        self.client_id = item.client_id
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.outputs_ui: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.executed: list[str] = []
        # progress registry: entries appear when first touched (execution order)
        self.registry: dict[str, dict[str, Any]] = {}
        self.sigs: dict[str, str] = {}

    # -- messages -----------------------------------------------------------------
    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.rt.hub.emit(event, data, self.client_id)

    def _send_progress_state(self) -> None:
        pid = self.item.prompt_id
        nodes = {
            nid: {
                "value": e["value"],
                "max": e["max"],
                "state": e["state"],
                "node_id": nid,
                "prompt_id": pid,
                "display_node_id": nid,
                "parent_node_id": None,
                "real_node_id": nid,
            }
            for nid, e in self.registry.items()
            if e["state"] != "pending"
        }
        self.rt.hub.emit("progress_state", {"prompt_id": pid, "nodes": nodes}, self.client_id)

    def _entry(self, nid: str) -> dict[str, Any]:
        return self.registry.setdefault(nid, {"state": "pending", "value": 0, "max": 1})

    def progress_start(self, nid: str) -> None:
        self._entry(nid).update(state="running", value=0.0, max=1.0)
        self._send_progress_state()

    def progress_update(self, nid: str, value: Any, total: Any) -> None:
        self._entry(nid).update(state="running", value=value, max=total)
        self._send_progress_state()

    def progress_finish(self, nid: str) -> None:
        entry = self._entry(nid)
        entry.update(state="finished", value=entry["max"])
        self._send_progress_state()

    def _ui_report(self, nid: str, ui: dict[str, Any]) -> None:
        self.outputs_ui[nid] = ui
        self.meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
        if self.client_id is not None:
            data = {"node": nid, "display_node": nid, "output": ui, "prompt_id": self.item.prompt_id}
            self.rt.hub.emit("executed", data, self.client_id)

    # -- cache keys ---------------------------------------------------------------
    def _signature(self, nid: str, stack: frozenset[str] = frozenset()) -> str:
        if nid in self.sigs:
            return self.sigs[nid]
        node = self.prompt.get(nid)
        if not isinstance(node, dict) or nid in stack:
            return f"missing:{nid}"
        class_type = node.get("class_type")
        inputs = node.get("inputs", {}) if isinstance(node.get("inputs"), dict) else {}
        impl = NODES.get(class_type) if isinstance(class_type, str) else None
        changed = impl.is_changed(inputs, self.rt.input_dir) if impl and impl.is_changed else None
        parts = []
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value):
                parts.append([name, "link", self._signature(value[0], stack | {nid}), value[1]])
            else:
                parts.append([name, "value", json.dumps(value, sort_keys=True, default=str)])
        raw = json.dumps([class_type, repr(changed), parts], sort_keys=True)
        self.sigs[nid] = hashlib.sha256(raw.encode()).hexdigest()
        return self.sigs[nid]

    # -- execution ----------------------------------------------------------------
    async def execute(self) -> Outcome:
        rt, pid = self.rt, self.item.prompt_id
        rt.interrupt_requested = False  # a stale (idle) interrupt is forgotten here
        self.add_message("execution_start", {"prompt_id": pid}, broadcast=False)
        for nid in self.prompt:
            self._signature(nid)
        rt.cache_retain(set(self.sigs.values()), {(n, self.prompt[n].get("class_type")) for n in self.prompt})
        cached = [nid for nid in self.prompt if self.sigs[nid] in rt.cache]
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": pid}, broadcast=False)
        pending, dependents = self._plan()
        try:
            while pending:
                nid = self._pick(pending, dependents)
                await self._run_node(nid)
                del pending[nid]
                for dep in dependents[nid]:
                    if dep in pending:
                        pending[dep].discard(nid)
        except Interrupted as stop:
            node_type = self.prompt[stop.node_id]["class_type"]
            data = {"prompt_id": pid, "node_id": stop.node_id, "node_type": node_type, "executed": list(self.executed)}
            self.add_message("execution_interrupted", data, broadcast=True)
            return self._outcome("error", False)
        except NodeFailed as failed:
            self._report_failure(failed)
            return self._outcome("error", False)
        self.add_message("execution_success", {"prompt_id": pid}, broadcast=False)
        return self._outcome("success", True)

    def _outcome(self, status: str, completed: bool) -> Outcome:
        return Outcome(status, completed, self.messages, dict(self.outputs_ui), dict(self.meta))

    def _report_failure(self, failed: NodeFailed) -> None:
        ex = failed.error
        type_name = _type_name(ex)
        tips = OOM_TIPS if type_name in OOM_TYPES else ""
        data = {
            "prompt_id": self.item.prompt_id,
            "node_id": failed.node_id,
            "node_type": self.prompt[failed.node_id]["class_type"],
            "executed": list(self.executed),
            "exception_message": f"{ex}\n{tips}",
            "exception_type": type_name,
            "traceback": traceback.format_tb(ex.__traceback__),
            "current_inputs": {name: [_format_value(v)] for name, v in failed.inputs.items()},
            "current_outputs": list(self.prompt),
        }
        self.add_message("execution_error", data, broadcast=False)

    def _plan(self) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        """Pending nodes (insertion = depth-first from the outputs) with their uncached upstreams."""
        pending: dict[str, set[str]] = {}
        dependents: dict[str, set[str]] = defaultdict(set)

        def add(nid: str) -> None:
            if nid in pending:
                return
            pending[nid] = set()
            for value in self.prompt[nid].get("inputs", {}).values():
                if is_link(value) and value[0] in self.prompt and self.sigs[value[0]] not in self.rt.cache:
                    add(value[0])
                    pending[nid].add(value[0])
                    dependents[value[0]].add(nid)

        for output_id in self.item.outputs:
            add(output_id)
        return pending, dependents

    def _pick(self, pending: dict[str, set[str]], dependents: dict[str, set[str]]) -> str:
        """First ready output node; else one feeding an output (1 or 2 hops away); else the first."""
        ready = [nid for nid, ups in pending.items() if not ups]
        if not ready:
            raise NodeFailed(next(iter(pending)), RuntimeError("Dependency cycle detected"), {})

        def is_output(nid: str) -> bool:
            return self.rt.catalog.is_output(self.prompt[nid]["class_type"])

        for nid in ready:
            if is_output(nid):
                return nid
        for nid in ready:
            if any(is_output(d) for d in dependents[nid] if d in pending):
                return nid
        for nid in ready:
            for d in dependents[nid]:
                if d in pending and any(is_output(d2) for d2 in dependents[d] if d2 in pending):
                    return nid
        return ready[0]

    def _inputs(self, nid: str) -> dict[str, Any]:
        node = self.prompt[nid]
        class_type = node["class_type"]
        given = node.get("inputs", {})
        values: dict[str, Any] = {}
        for name, _category in self.rt.catalog.inputs(class_type):
            if name not in given:
                continue
            value = given[name]
            if is_link(value):
                values[name] = self.rt.cache[self.sigs[value[0]]].outputs[value[1]]
            else:
                values[name] = value
        return values

    async def _run_node(self, nid: str) -> None:
        rt = self.rt
        class_type = self.prompt[nid]["class_type"]
        entry = rt.cache.get(self.sigs[nid])
        if entry is not None:  # served from the cache: replay the UI, no `executing`
            if entry.ui is not None:
                self._ui_report(nid, entry.ui)
            self.progress_finish(nid)
            return
        self.progress_start(nid)
        rt.current_node = nid
        if self.client_id is not None:
            rt.hub.emit("executing", {"node": nid, "display_node": nid, "prompt_id": self.item.prompt_id}, self.client_id)
        rt.check_interrupt(nid)
        inputs: dict[str, Any] = {}
        impl = NODES.get(class_type)
        try:
            inputs = self._inputs(nid)
            if impl is None:
                raise NotImplementedError(f"the ComfyUI stand-in cannot execute {class_type}")
            await rt.work(impl.cost(inputs), self.item.prompt_id, nid)
            outputs, ui = await impl.run(_Context(self, nid), **inputs)
        except Interrupted:
            raise
        except Exception as ex:
            shown = dict(inputs)
            hidden = {"prompt": self.prompt, "extra_pnginfo": self.item.extra_data.get("extra_pnginfo"), "unique_id": nid}
            shown.update({name: hidden[name] for name in (impl.hidden if impl else ())})
            raise NodeFailed(nid, ex, shown) from ex
        rt.cache[self.sigs[nid]] = CacheEntry(tuple(outputs), ui)
        if ui:
            self._ui_report(nid, ui)
        self.progress_finish(nid)
        self.executed.append(nid)
