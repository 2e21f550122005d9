"""SHA-256 of model files, read in chunks. Blocking: call from a worker thread only."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import NamedTuple

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: hashlib and readinto release the GIL for each chunk


HASHER_NICENESS = 10  # the hasher yields the CPU to the event loop and to ComfyUI itself


def lower_thread_priority(niceness: int = HASHER_NICENESS) -> None:
    """Make the calling thread nicer (Linux: nice is per thread). Used as the hash executor's initializer."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: run at normal priority


class HashCancelled(Exception):
    """The catalogue is stopping; the hash was abandoned between two chunks."""


class FileChanged(Exception):
    """The file changed (size or mtime) while it was read; its hash would describe no real version of it."""


class FileHash(NamedTuple):
    size: int
    mtime_ns: int
    sha256: str


def sha256_file(
    path: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cancel: threading.Event | None = None,
) -> FileHash:
    """Hash ``path``; the result carries the size and mtime the file had while it was read.

    Raises ``HashCancelled`` if ``cancel`` is set (checked before every chunk), ``FileChanged`` if the file was
    modified during the read, and ``OSError`` if it cannot be read.
    """
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        before = os.fstat(fd)
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        while True:
            if cancel is not None and cancel.is_set():
                raise HashCancelled(path)
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
        after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FileChanged(path)
    return FileHash(before.st_size, before.st_mtime_ns, digest.hexdigest())
