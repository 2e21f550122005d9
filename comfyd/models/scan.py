"""Walk the local models folder the way ComfyUI names its models.

Pure, blocking filesystem code: run it in a worker thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

import structlog

log = structlog.get_logger(__name__)

# API type -> ComfyUI folder names under the models directory. The first folder is the one ComfyUI's
# ``GET /models/{folder}`` knows the type by (it already merges the others, e.g. ``t2i_adapter`` into
# ``controlnet``).
MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "upscale": ("upscale_models",),
}

# ComfyUI's folder_paths.supported_pt_extensions (compared lower-cased, as ComfyUI does).
MODEL_EXTENSIONS: frozenset[str] = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
)


class ModelFile(NamedTuple):
    type: str  # API type (key of MODEL_TYPES)
    name: str  # path relative to the type folder, "/"-separated, as ComfyUI names it
    path: str  # resolved absolute path of the file: the hash cache key
    size: int
    mtime_ns: int


def is_model_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS


def _walk(root: str, type_: str, out: dict[str, ModelFile]) -> None:
    """Depth-first scandir walk of one type folder, following symlinks without ever looping."""
    try:
        root_stat = os.stat(root)
    except OSError:
        return  # folder absent: nothing of this type here
    if not stat.S_ISDIR(root_stat.st_mode):
        return
    visited: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    # (directory as found, its resolved path, name prefix relative to the type folder)
    stack: list[tuple[str, str, str]] = [(root, os.path.realpath(root), "")]
    while stack:
        found, real, prefix = stack.pop()
        try:
            with os.scandir(found) as it:
                entries = list(it)
        except OSError as exc:
            log.warning("models_scan_dir_failed", path=found, error=str(exc))
            continue
        subdirs: list[tuple[str, str, str]] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden file or folder
            try:
                if entry.is_dir():  # follows symlinks
                    st = entry.stat()
                    key = (st.st_dev, st.st_ino)
                    if key in visited:
                        continue  # a symlink back up the tree, or a second way to the same folder
                    visited.add(key)
                    sub_real = (
                        os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                    )
                    subdirs.append((entry.path, sub_real, f"{prefix}{entry.name}/"))
                    continue
                if not entry.is_file() or not is_model_name(entry.name):
                    continue  # broken symlink, socket, ..., or not a model file
                name = prefix + entry.name
                if name in out:
                    continue  # same name in an earlier folder of this type: ComfyUI keeps one
                st = entry.stat()  # follows a symlink to its target
                path = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                out[name] = ModelFile(type_, name, path, st.st_size, st.st_mtime_ns)
            except OSError:
                continue  # vanished or unreadable while we looked
        # Visit subfolders in name order so the first-seen path for a duplicated folder is stable.
        subdirs.sort(key=lambda d: d[2], reverse=True)
        stack.extend(subdirs)


def scan_models(models_dir: Path | str | None, types: tuple[str, ...] | None = None) -> list[ModelFile]:
    """Every model file under ``models_dir`` for ``types`` (default: all), sorted by type then name."""
    if models_dir is None:
        return []
    base = os.fspath(models_dir)
    result: list[ModelFile] = []
    for type_ in types or tuple(MODEL_TYPES):
        found: dict[str, ModelFile] = {}
        for folder in MODEL_TYPES[type_]:
            _walk(os.path.join(base, folder), type_, found)
        result.extend(found[name] for name in sorted(found))
    result.sort(key=lambda m: (m.type, m.name))
    return result
