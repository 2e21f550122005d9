"""Executable node classes (the ones the recorded workflows use, plus test-only ones).

A class listed in object_info.json but not here validates normally and then
fails at run time with NotImplementedError (the stand-in has no models).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import images as im
from .images import Batch, Frame

UI = dict[str, Any]
Result = tuple[tuple[Any, ...], UI | None]


class NodeContext(Protocol):
    node_id: str
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    output_dir: Path
    temp_dir: Path
    input_dir: Path
    temp_prefix: str

    async def progress(self, value: int, total: int, preview: Frame | None = None) -> None: ...

    def text(self, message: str) -> None: ...


class StandInNodeError(Exception):
    """An exception reported with an arbitrary type name (e.g. torch.OutOfMemoryError)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


@dataclass(frozen=True)
class NodeImpl:
    run: Callable[..., Awaitable[Result]]
    cost: Callable[[dict[str, Any]], float] = lambda inputs: 1.0  # multiples of node_time
    is_changed: Callable[[dict[str, Any], Path], Any] | None = None
    # custom VALIDATE_INPUTS: (inputs, input_dir) -> True or an error string
    validate: Callable[[dict[str, Any], Path], bool | str] | None = None
    validate_names: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()  # "prompt", "extra_pnginfo", "unique_id"


def resolve_annotated(name: str, default: Path, dirs: dict[str, Path]) -> Path:
    """`file.png [output]` picks a folder by annotation, like folder_paths does."""
    for kind in ("output", "input", "temp"):
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return dirs[kind] / name[: -len(suffix)]
    return default / name


def _never_cached(inputs: dict[str, Any], input_dir: Path) -> Any:
    return uuid.uuid4().hex


# -- image nodes ----------------------------------------------------------------------
async def empty_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1, color: int = 0) -> Result:
    return ([im.solid_rgb(width, height, color)] * batch_size,), None


async def image_invert(ctx: NodeContext, image: Batch) -> Result:
    return ([im.invert(f) for f in image],), None


async def image_blur(ctx: NodeContext, image: Batch, blur_radius: int, sigma: float) -> Result:
    return ([im.blur(f, blur_radius, sigma) for f in image],), None


async def image_scale(
    ctx: NodeContext, image: Batch, upscale_method: str, width: int, height: int, crop: str
) -> Result:
    return ([im.scale(f, width, height, upscale_method, crop) for f in image],), None


async def solid_mask(ctx: NodeContext, value: float, width: int, height: int) -> Result:
    return ([im.solid_mask(width, height, value)],), None


async def join_image_with_alpha(ctx: NodeContext, image: Batch, alpha: Batch) -> Result:
    count = min(len(image), len(alpha))
    return ([im.join_alpha(image[i], alpha[i]) for i in range(count)],), None


async def image_batch(ctx: NodeContext, image1: Batch, image2: Batch) -> Result:
    first, second = image1[0], image2[0]
    if (first.size, first.channels) != (second.size, second.channels):
        image2 = [im.scale(f, first.width, first.height, "bilinear", "center") for f in image2]
    if first.channels != second.channels:
        raise RuntimeError(
            "Sizes of tensors must match except in dimension 0. "
            f"Expected size {first.channels} but got size {second.channels} for tensor number 1 in the list."
        )
    return (list(image1) + list(image2),), None


async def get_image_size(ctx: NodeContext, image: Batch) -> Result:
    width, height, batch = image[0].width, image[0].height, len(image)
    ctx.text(f"width: {width}, height: {height}\n batch size: {batch}")
    return (width, height, batch), None


async def _save(
    ctx: NodeContext, folder_root: Path, images: Batch, prefix: str, kind: str, level: int
) -> Result:
    first = images[0]
    folder, base, counter, subfolder = im.save_target(folder_root, prefix, first.width, first.height)
    metadata = im.png_metadata(ctx.prompt, ctx.extra_data.get("extra_pnginfo"))
    results = []
    for batch_number, frame in enumerate(images):
        name = base.replace("%batch_num%", str(batch_number))
        filename = f"{name}_{counter:05}_.png"
        (folder / filename).write_bytes(im.png_bytes(frame, level, metadata))
        results.append({"filename": filename, "subfolder": subfolder, "type": kind})
        counter += 1
    return (), {"images": results}


async def save_image(ctx: NodeContext, images: Batch, filename_prefix: str = "ComfyUI") -> Result:
    return await _save(ctx, ctx.output_dir, images, filename_prefix, "output", 4)


async def preview_image(ctx: NodeContext, images: Batch) -> Result:
    return await _save(ctx, ctx.temp_dir, images, "ComfyUI" + ctx.temp_prefix, "temp", 1)


async def save_image_websocket(ctx: NodeContext, images: Batch) -> Result:
    total = len(images)
    for step, frame in enumerate(images):
        await ctx.progress(step, total, frame)
    return (), None


async def load_image(ctx: NodeContext, image: str) -> Result:
    path = resolve_annotated(image, ctx.input_dir, _dirs(ctx))
    frames, masks = im.load_image(path)
    return (frames, masks), None


def _dirs(ctx: NodeContext) -> dict[str, Path]:
    return {"output": ctx.output_dir, "input": ctx.input_dir, "temp": ctx.temp_dir}


def _load_image_changed(inputs: dict[str, Any], input_dir: Path) -> Any:
    path = input_dir / str(inputs.get("image", ""))
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _load_image_validate(inputs: dict[str, Any], input_dir: Path) -> bool | str:
    image = str(inputs.get("image", ""))
    dirs = {"input": input_dir, "output": input_dir.parent / "output", "temp": input_dir.parent / "temp"}
    if not resolve_annotated(image, input_dir, dirs).is_file():
        return f"Invalid image file: {image}"
    return True


# -- test-only nodes ----------------------------------------------------------------
async def standin_raise(
    ctx: NodeContext, exception_type: str, exception_message: str, image: Batch | None = None
) -> Result:
    raise StandInNodeError(exception_type, exception_message)


async def standin_sleep(ctx: NodeContext, seconds: float, steps: int, image: Batch | None = None) -> Result:
    for step in range(steps):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(step + 1, steps)
    return (image if image is not None else [Frame(8, 8, "RGB", (0, 0, 0))],), None


NODES: dict[str, NodeImpl] = {
    "EmptyImage": NodeImpl(empty_image),
    "ImageInvert": NodeImpl(image_invert),
    "ImageBlur": NodeImpl(image_blur, cost=lambda i: max(1.0, float(i.get("blur_radius", 1)) / 10)),
    "ImageScale": NodeImpl(image_scale),
    "SolidMask": NodeImpl(solid_mask),
    "JoinImageWithAlpha": NodeImpl(join_image_with_alpha),
    "ImageBatch": NodeImpl(image_batch),
    "GetImageSize": NodeImpl(get_image_size, hidden=("unique_id",)),
    "SaveImage": NodeImpl(save_image, hidden=("prompt", "extra_pnginfo")),
    "PreviewImage": NodeImpl(preview_image, hidden=("prompt", "extra_pnginfo")),
    "SaveImageWebsocket": NodeImpl(save_image_websocket, is_changed=_never_cached),
    "LoadImage": NodeImpl(
        load_image,
        is_changed=_load_image_changed,
        validate=_load_image_validate,
        validate_names=("image",),
    ),
    "StandInRaise": NodeImpl(standin_raise, cost=lambda i: 0.0, is_changed=_never_cached),
    "StandInSleep": NodeImpl(standin_sleep, cost=lambda i: 0.0, is_changed=_never_cached),
}
