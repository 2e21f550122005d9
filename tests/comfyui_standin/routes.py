"""HTTP routes (each also under /api) and the Host/Origin check."""

from __future__ import annotations

import copy
import ipaddress
import json
import mimetypes
import os
import sys
import urllib.parse
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image

from .hub import SERVER_FEATURES
from .prompt_queue import QueueItem
from .runtime import Runtime
from .validation import validate_prompt

RUNTIME: web.AppKey[Runtime] = web.AppKey("standin_runtime", Runtime)

MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
    "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
]  # fmt: skip
MODEL_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def _rt(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def _empty(status: int = 200) -> web.Response:
    return web.Response(status=status)  # no body, no Content-Type (as recorded)


def _server_error() -> web.Response:
    response = web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
    response.force_close()
    return response


async def _json_body(request: web.Request) -> Any:
    return json.loads(await request.text())


# -- /prompt, /queue, /interrupt, /free ------------------------------------------------
async def post_prompt(request: web.Request) -> web.Response:
    rt = _rt(request)
    try:
        body = await _json_body(request)
    except ValueError:
        return _server_error()
    if not isinstance(body, (dict, list, str)):
        return _server_error()  # `"prompt" in 5` fails on the real server too
    original = copy.deepcopy(body)
    if not isinstance(body, dict):
        body = {}  # a JSON list/string has no "prompt" key: 400 no_prompt, counter advanced
    try:
        number = rt.queue.next_number(body)
    except (ValueError, TypeError):
        return _server_error()
    if "prompt" not in body:
        error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}
        return web.json_response({"error": error, "node_errors": {}}, status=400)
    prompt = body["prompt"]
    if not isinstance(prompt, dict):
        return _server_error()
    prompt_id = str(body.get("prompt_id", uuid.uuid4()))
    ok, error, outputs, node_errors = validate_prompt(
        rt.catalog, prompt, rt.input_dir, body.get("partial_execution_targets")
    )
    if not ok:
        return web.json_response({"error": error, "node_errors": node_errors}, status=400)
    extra_data = dict(body["extra_data"]) if isinstance(body.get("extra_data"), dict) else {}
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    rt.record.posted.append(original)
    rt.queue.put(QueueItem(number, prompt_id, prompt, extra_data, outputs))
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(_rt(request).queue.info())


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(_rt(request).queue.snapshot())


async def post_queue(request: web.Request) -> web.Response:
    rt = _rt(request)
    body = await _json_body(request)
    if body.get("clear"):
        rt.queue.wipe()
    for prompt_id in body.get("delete", []) if "delete" in body else []:
        rt.queue.delete(prompt_id)
    return _empty()


async def post_interrupt(request: web.Request) -> web.Response:
    rt = _rt(request)
    try:
        body = await _json_body(request)
    except ValueError:
        body = {}
    rt.record.interrupt_calls.append(body)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    if prompt_id:
        running = rt.queue.running_item()
        if running is not None and running.prompt_id == prompt_id:
            rt.interrupt()
    else:
        rt.interrupt()
    rt.signal.notify()
    return _empty()


async def post_free(request: web.Request) -> web.Response:
    rt = _rt(request)
    body = await _json_body(request)
    rt.record.free_calls.append(body)
    rt.signal.notify()
    return _empty()


# -- /history ------------------------------------------------------------------------
async def get_history(request: web.Request) -> web.Response:
    query = request.rel_url.query
    max_items = int(query["max_items"]) if "max_items" in query else None
    offset = int(query["offset"]) if "offset" in query else -1
    return web.json_response(_rt(request).queue.get_history(max_items, offset))


async def get_history_item(request: web.Request) -> web.Response:
    queue = _rt(request).queue
    prompt_id = request.match_info["prompt_id"]
    _rt(request).record.history_reads.append(prompt_id)
    _rt(request).signal.notify()  # tests wait on it
    entry = queue.history.get(prompt_id)
    return web.json_response({prompt_id: copy.deepcopy(entry)} if entry is not None else {})


async def post_history(request: web.Request) -> web.Response:
    queue = _rt(request).queue
    body = await _json_body(request)
    if body.get("clear"):
        queue.wipe_history()
    for prompt_id in body.get("delete", []) if "delete" in body else []:
        queue.delete_history(prompt_id)
    return _empty()


# -- files ---------------------------------------------------------------------------
def _dirs(rt: Runtime) -> dict[str, str]:
    return {"output": str(rt.output_dir), "input": str(rt.input_dir), "temp": str(rt.temp_dir)}


async def view(request: web.Request) -> web.StreamResponse:
    rt, query = _rt(request), request.rel_url.query
    if "filename" not in query:
        return _empty(404)
    filename, folder = query["filename"], None
    for kind, path in _dirs(rt).items():
        if filename.endswith(f" [{kind}]"):
            filename, folder = filename[: -len(kind) - 3], path
    if not filename:
        return _empty(400)
    if filename[0] == "/" or ".." in filename:
        return _empty(400)
    if folder is None:
        folder = _dirs(rt).get(query.get("type", "output"))
    if folder is None:
        return _empty(400)
    folder = os.path.abspath(folder)
    if "subfolder" in query:
        full = os.path.abspath(os.path.join(folder, query["subfolder"]))
        if os.path.commonpath((full, folder)) != folder:
            return _empty(403)
        folder = full
    filename = os.path.basename(filename)
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        return _empty(404)
    disposition = {"Content-Disposition": f'filename="{filename}"'}
    channel = query.get("channel", "rgba")
    if "preview" in query:
        info = query["preview"].split(";")
        fmt = info[0] if info[0] in ("webp", "jpeg") and "a" not in query.get("channel", "") else "webp"
        quality = int(info[-1]) if info[-1].isdigit() else 90
        with Image.open(path) as img:
            buffer = BytesIO()
            img.convert("RGB").save(buffer, format=fmt, quality=quality)
        return web.Response(body=buffer.getvalue(), content_type=f"image/{fmt}", headers=disposition)
    if channel in ("rgb", "a"):
        with Image.open(path) as img:
            if channel == "rgb":
                out = img.convert("RGB")
            else:
                alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                out = Image.new("RGBA", img.size)
                out.putalpha(alpha)
            buffer = BytesIO()
            out.save(buffer, format="PNG")
        return web.Response(body=buffer.getvalue(), content_type="image/png", headers=disposition)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
        content_type = "application/octet-stream"
    return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})


async def upload_image(request: web.Request) -> web.Response:
    rt = _rt(request)
    form = await request.post()
    image = form.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return _empty(400)
    folder = _dirs(rt).get(str(form.get("type", "input")) or "input", str(rt.input_dir))
    folder = os.path.abspath(folder)
    subfolder = str(form.get("subfolder", ""))
    full = os.path.abspath(os.path.join(folder, os.path.normpath(subfolder)))
    if os.path.commonpath((folder, full)) != folder:
        return _empty(400)
    os.makedirs(full, exist_ok=True)
    data = image.file.read()
    name = os.path.basename(image.filename)
    path = os.path.join(full, name)
    overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
    if not overwrite:
        stem, ext = os.path.splitext(name)
        index = 1
        while os.path.exists(path) and Path(path).read_bytes() != data:
            name = f"{stem} ({index}){ext}"
            path = os.path.join(full, name)
            index += 1
    Path(path).write_bytes(data)
    return web.json_response({"name": name, "subfolder": subfolder, "type": str(form.get("type", "input")) or "input"})


# -- read-only info ------------------------------------------------------------------
def _ram() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 17179869184, 8589934592


async def system_stats(request: web.Request) -> web.Response:
    rt = _rt(request)
    total, free = _ram()
    root = str(rt.output_dir.parent)
    system = {
        "os": os.name,
        "ram_total": total,
        "ram_free": free,
        "comfyui_version": "0.3.64",
        "required_frontend_version": "1.27.10",
        "installed_templates_version": "0.1.95",
        "required_templates_version": "0.1.95",
        "python_version": sys.version,
        "pytorch_version": "2.13.0+cpu",
        "embedded_python": False,
        "argv": ["main.py", "--cpu", "--listen", "127.0.0.1", "--base-directory", root,
                 "--output-directory", str(rt.output_dir), "--disable-auto-launch"],
    }  # fmt: skip
    device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
              "torch_vram_total": total, "torch_vram_free": free}  # fmt: skip
    return web.json_response({"system": system, "devices": [device]})


async def features(request: web.Request) -> web.Response:
    return web.json_response(SERVER_FEATURES)


async def object_info(request: web.Request) -> web.Response:
    return web.json_response(_rt(request).catalog.object_info())


async def object_info_class(request: web.Request) -> web.Response:
    return web.json_response(_rt(request).catalog.object_info(request.match_info["node_class"]))


def _model_files(rt: Runtime, folder: str) -> list[str]:
    base = rt.models_dir / folder
    if not base.is_dir():
        return []
    extensions = {".yaml"} if folder == "configs" else MODEL_EXTENSIONS
    found = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    return sorted(found)


async def models(request: web.Request) -> web.Response:
    return web.json_response(MODEL_FOLDERS)


async def models_in_folder(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    if folder not in MODEL_FOLDERS:
        return _empty(404)
    return web.json_response(_model_files(_rt(request), folder))


async def embeddings(request: web.Request) -> web.Response:
    return web.json_response([os.path.splitext(f)[0] for f in _model_files(_rt(request), "embeddings")])


async def extensions(request: web.Request) -> web.Response:
    return web.json_response([])


async def experiment_models(request: web.Request) -> web.Response:
    rt = _rt(request)
    skip = {"configs", "custom_nodes"}
    folders = [{"name": f, "folders": [str(rt.models_dir / f)]} for f in MODEL_FOLDERS if f not in skip]
    return web.json_response(folders)


# -- app -----------------------------------------------------------------------------
def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def origin_check(request: web.Request, handler: Any) -> web.StreamResponse:
    """A browser on another origin must not drive a loopback server: Host != Origin -> 403."""
    if "Host" in request.headers and "Origin" in request.headers:
        host_value = request.headers["Host"].lower()
        origin = urllib.parse.urlparse(request.headers["Origin"])
        origin_value = origin.netloc.lower()
        host = urllib.parse.urlsplit("//" + host_value)
        if origin.port is None:
            host_value = host.hostname or ""
        if host.port is None:
            origin_value = origin.hostname or ""
        if _is_loopback(host.hostname) and host_value and origin_value and host_value != origin_value:
            return _empty(403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def build_app(rt: Runtime) -> web.Application:
    app = web.Application(middlewares=[origin_check], client_max_size=104857600)
    app[RUNTIME] = rt
    table = [
        ("GET", "/ws", rt.hub.handle),
        ("POST", "/prompt", post_prompt),
        ("GET", "/prompt", get_prompt),
        ("GET", "/queue", get_queue),
        ("POST", "/queue", post_queue),
        ("POST", "/interrupt", post_interrupt),
        ("POST", "/free", post_free),
        ("GET", "/history", get_history),
        ("GET", "/history/{prompt_id}", get_history_item),
        ("POST", "/history", post_history),
        ("GET", "/view", view),
        ("POST", "/upload/image", upload_image),
        ("GET", "/system_stats", system_stats),
        ("GET", "/features", features),
        ("GET", "/object_info", object_info),
        ("GET", "/object_info/{node_class}", object_info_class),
        ("GET", "/models", models),
        ("GET", "/models/{folder}", models_in_folder),
        ("GET", "/embeddings", embeddings),
        ("GET", "/extensions", extensions),
        ("GET", "/experiment/models", experiment_models),
    ]
    for method, path, handler in table:
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
    return app
