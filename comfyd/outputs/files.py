"""Facts about output files (size, sha256, kind, image size) and the one safe way from a name to a path."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path, PurePosixPath

from comfyd.errors import BadRequest, NotFound

KINDS = {
    "image": {"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "avif"},
    "video": {"mp4", "webm", "mov", "mkv", "avi", "m4v"},
    "audio": {"wav", "mp3", "flac", "ogg", "opus", "m4a", "aac"},
}


def kind_of(filename: str) -> tuple[str, str]:
    """(kind, format) from a file name: ("image", "png"), ("other", "json")."""
    fmt = PurePosixPath(filename).suffix.lower().lstrip(".")
    for kind, formats in KINDS.items():
        if fmt in formats:
            return kind, fmt
    return "other", fmt


def describe(path: Path) -> dict[str, object]:
    """Size, sha256 and (for PNG) width/height. Blocking: run a large file in a thread."""
    digest = hashlib.sha256()
    size = 0
    head = b""
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            if not head:
                head = chunk[:32]
            digest.update(chunk)
            size += len(chunk)
    kind, fmt = kind_of(path.name)
    width = height = None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
    return {"size": size, "sha256": digest.hexdigest(), "kind": kind, "format": fmt, "width": width,
            "height": height}


def safe_relpath(relpath: str) -> str:
    """Normalise a client- or backend-supplied relative path, refusing anything that could leave the root."""
    if not relpath or "\x00" in relpath or "\\" in relpath:
        raise BadRequest("invalid output path", field="filename")
    parts = PurePosixPath(relpath).parts
    if PurePosixPath(relpath).is_absolute() or any(p in ("..", ".") for p in parts) or not parts:
        raise BadRequest("output paths are relative to the outputs folder and may not contain '..'",
                         field="filename")
    return "/".join(parts)


def resolve_inside(root: Path, relpath: str) -> Path:
    """The real path of ``root/relpath``; NotFound unless it is a regular file inside ``root`` (symlinks
    that lead out are refused)."""
    clean = safe_relpath(relpath)
    real_root = root.resolve()
    candidate = (real_root / clean).resolve()
    if not candidate.is_relative_to(real_root) or os.path.commonpath([real_root, candidate]) != str(real_root):
        raise NotFound(f"output {relpath} not found")
    if not candidate.is_file():
        raise NotFound(f"output {relpath} not found")
    return candidate
