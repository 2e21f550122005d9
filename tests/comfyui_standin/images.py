"""Image batches for the stand-in nodes.

A ComfyUI IMAGE is a float tensor [batch, height, width, channels]; a MASK is
[batch, height, width]. Here a batch is a list of :class:`Frame`. A frame is
either a solid colour (kept symbolic, so a 1536x1536 blur costs nothing) or a
real Pillow image. Sizes and channel counts are exact; pixel values are close
enough (8-bit instead of float).
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Frame:
    """One image of a batch: mode "RGB" / "RGBA", or "L" for a mask."""

    width: int
    height: int
    mode: str
    solid: tuple[int, ...] | None = None
    image: Image.Image | None = None

    @property
    def channels(self) -> int:
        return len(self.mode)

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def pil(self) -> Image.Image:
        if self.image is not None:
            return self.image
        color: Any = self.solid if self.mode != "L" else self.solid[0]  # type: ignore[index]
        return Image.new(self.mode, self.size, color)

    @staticmethod
    def of(image: Image.Image) -> Frame:
        return Frame(image.width, image.height, image.mode, None, image)

    def describe(self) -> str:
        return f"tensor(shape=[{self.height}, {self.width}, {self.channels}], mode={self.mode})"


Batch = list[Frame]


def solid_rgb(width: int, height: int, color: int) -> Frame:
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return Frame(width, height, "RGB", rgb)


def solid_mask(width: int, height: int, value: float) -> Frame:
    level = max(0, min(255, round(value * 255)))
    return Frame(width, height, "L", (level,))


def invert(frame: Frame) -> Frame:
    """1.0 - image, on every channel (alpha too, as ImageInvert does)."""
    if frame.solid is not None:
        return Frame(frame.width, frame.height, frame.mode, tuple(255 - c for c in frame.solid))
    return Frame.of(frame.pil().point(lambda v: 255 - v))


def blur(frame: Frame, radius: int, sigma: float) -> Frame:
    if frame.solid is not None or radius == 0:
        return frame  # blurring a flat colour (with reflect padding) changes nothing
    return Frame.of(frame.pil().filter(ImageFilter.GaussianBlur(sigma)))


def _center_crop_box(width: int, height: int, new_w: int, new_h: int) -> tuple[int, int, int, int]:
    old_aspect = width / height
    new_aspect = new_w / new_h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((width - width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((height - height * (old_aspect / new_aspect)) / 2)
    return (x, y, width - x, height - y)


def scale(frame: Frame, width: int, height: int, method: str, crop: str) -> Frame:
    """ImageScale: 0 for one side keeps the aspect ratio; 0 for both is a no-op."""
    if width == 0 and height == 0:
        return frame
    if width == 0:
        width = max(1, round(frame.width * height / frame.height))
    elif height == 0:
        height = max(1, round(frame.height * width / frame.width))
    if frame.solid is not None:
        return Frame(width, height, frame.mode, frame.solid)
    image = frame.pil()
    if crop == "center":
        image = image.crop(_center_crop_box(image.width, image.height, width, height))
    return Frame.of(image.resize((width, height), RESAMPLE.get(method, Image.Resampling.BILINEAR)))


def resize_mask(mask: Frame, width: int, height: int) -> Frame:
    if mask.size == (width, height):
        return mask
    if mask.solid is not None:
        return Frame(width, height, "L", mask.solid)
    return Frame.of(mask.pil().resize((width, height), Image.Resampling.BILINEAR))


def join_alpha(image: Frame, mask: Frame) -> Frame:
    """RGB of `image` plus alpha = 1 - mask (JoinImageWithAlpha)."""
    mask = resize_mask(mask, image.width, image.height)
    if image.solid is not None and mask.solid is not None:
        return Frame(image.width, image.height, "RGBA", image.solid[:3] + (255 - mask.solid[0],))
    rgb = image.pil().convert("RGB")
    alpha = mask.pil().point(lambda v: 255 - v)
    rgb.putalpha(alpha)
    return Frame.of(rgb)


def png_bytes(frame: Frame, compress_level: int = 1, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    frame.pil().save(buffer, format="PNG", compress_level=compress_level, pnginfo=pnginfo)
    return buffer.getvalue()


def png_metadata(prompt: Any, extra_pnginfo: Any) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            info.add_text(key, json.dumps(value))
    return info


def expand_prefix(prefix: str, width: int, height: int) -> str:
    """The %width% %height% %year% ... tokens of SaveImage's filename_prefix."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    tokens = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02d}",
        "%day%": f"{now.tm_mday:02d}",
        "%hour%": f"{now.tm_hour:02d}",
        "%minute%": f"{now.tm_min:02d}",
        "%second%": f"{now.tm_sec:02d}",
    }
    for token, value in tokens.items():
        prefix = prefix.replace(token, value)
    return prefix


def _counter_of(name: str, base: str) -> int | None:
    """Counter of an existing file `<base>_<digits>...`, 0 if not numeric, None if other prefix."""
    head = name[: len(base) + 1]
    if os.path.normcase(head[:-1]) != os.path.normcase(base) or not head.endswith("_"):
        return None
    try:
        return int(name[len(base) + 1 :].split("_")[0])
    except ValueError:
        return 0


def save_target(root: Path, prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, base name, next counter, subfolder) for a save under `root`.

    The counter is 1 + the highest counter of files already in the folder for
    this prefix (a directory scan: it survives restarts and is not per prompt).
    """
    prefix = expand_prefix(prefix, width, height)
    normalized = os.path.normpath(prefix)
    subfolder = os.path.dirname(normalized)
    base = os.path.basename(normalized)
    folder = Path(os.path.join(root, subfolder))
    root_abs = os.path.abspath(root)
    if os.path.commonpath((root_abs, os.path.abspath(folder))) != root_abs:
        raise Exception(  # noqa: TRY002 - the real server raises a bare Exception
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}"
            f"\n         output_dir: {root_abs}"
            f"\n         commonpath: {os.path.commonpath((root_abs, os.path.abspath(folder)))}"
        )
    try:
        counters = [c for c in (_counter_of(n, base) for n in os.listdir(folder)) if c is not None]
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        counters = []
    counter = max(counters) + 1 if counters else 1
    return folder, base, counter, subfolder.replace(os.sep, "/")


def load_image(path: Path) -> tuple[Batch, Batch]:
    """LoadImage: RGB frames plus masks (1 - alpha, or 64x64 zeros without alpha)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode == "I":
            image = image.point(lambda v: v * (1 / 255))
        rgb = image.convert("RGB")
        if "A" in image.getbands():
            mask = Frame.of(image.getchannel("A").point(lambda v: 255 - v))
        else:
            mask = Frame(64, 64, "L", (0,))
        rgb.load()
    return [Frame.of(rgb)], [mask]
