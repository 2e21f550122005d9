"""The model catalogue behind ``GET /v1/comfyui/models``.

Listings come from a scandir walk of the models folder, done in a worker thread and reused for
``rescan_interval`` seconds. SHA-256 hashes are computed in the background, one file at a time on a single
dedicated thread, once per (path, size, mtime_ns), and kept in a HashCache so that a restart does not re-hash.
A listing never waits for hashing: a file whose hash is not ready yet says ``"hash": null, "hashing": true``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import structlog

from comfyd.models import hashing
from comfyd.models.cache import GET_HASHES_BATCH, HashCache
from comfyd.models.hashing import (
    DEFAULT_CHUNK_SIZE,
    FileChanged,
    FileHash,
    HashCancelled,
)
from comfyd.models.remote import DEFAULT_REMOTE_TIMEOUT, remote_model_entries
from comfyd.models.scan import MODEL_TYPES, ModelFile, scan_models

log = structlog.get_logger(__name__)

Stat = tuple[int, int]  # (size, mtime_ns)


def _hash_job(path: str, chunk_size: int, cancel: threading.Event) -> FileHash:
    # Looked up at call time so tests can wrap/count hashing.sha256_file.
    return hashing.sha256_file(path, chunk_size, cancel)


class ModelCatalog:
    def __init__(
        self,
        models_dir: Path | None,
        cache: HashCache,
        *,
        rescan_interval: float = 5.0,
        background_rescan: float = 60.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        remote_timeout: float = DEFAULT_REMOTE_TIMEOUT,
    ) -> None:
        self._dir = Path(models_dir) if models_dir is not None else None
        self._cache = cache
        self._rescan_interval = rescan_interval
        self._background_rescan = background_rescan  # idle hasher rescans this often, so new files get hashed
        self._chunk_size = chunk_size
        self._remote_timeout = remote_timeout
        self._files: list[ModelFile] = []
        self._scanned_at: float | None = None  # loop time the last scan started
        self._stale = True  # the hasher saw a file change since that scan started: rescan on next use
        self._scan_lock = asyncio.Lock()
        self._hashes: dict[str, FileHash] = {}  # path -> hash of the file as it was at (size, mtime_ns)
        self._failed: dict[str, Stat] = {}  # unreadable at this stat; retried only once it changes
        self._pending: dict[str, Stat] = {}  # to hash, in order (smallest new files first)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set by the hasher when nothing is pending
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._cancel = threading.Event()
        self._inflight: concurrent.futures.Future[FileHash] | None = None
        self.hash_count = 0  # files hashed by this catalogue (not taken from the cache)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the background hasher (it scans the models folder at once)."""
        if self._task is not None:
            return
        self._cancel = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="comfyd-model-hash", initializer=hashing.lower_thread_priority
        )
        self._idle.clear()
        self._task = asyncio.create_task(self._run(), name="model-catalog-hasher")

    async def stop(self) -> None:
        """Stop hashing: the file being hashed is abandoned after its current chunk, its thread ends."""
        task, self._task = self._task, None
        if task is None:
            return
        self._cancel.set()
        inflight = self._inflight
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            log.exception("model_hasher_crashed")
        if inflight is not None and not inflight.done():
            try:
                await asyncio.wait_for(asyncio.wrap_future(inflight), timeout=10)
            except Exception:
                pass  # HashCancelled, as asked; or the thread is stuck in a read (TimeoutError): leave it
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ queries
    async def list(
        self,
        type: str | None = None,
        *,
        remotes: Iterable[tuple[str, str]] = (),
        session: aiohttp.ClientSession | None = None,
    ) -> list[dict]:
        """Models of ``type`` (an API type, see MODEL_TYPES) or of every type, sorted by type then name.

        ``remotes`` are (backend name, url) of remote ComfyUI backends without a shared disk; their files are
        listed with ``size``/``hash`` null and ``backend`` set. A failing backend contributes nothing.
        """
        if type is not None and type not in MODEL_TYPES:
            raise ValueError(f"unknown model type {type!r}; expected one of {', '.join(MODEL_TYPES)}")
        types = (type,) if type is not None else tuple(MODEL_TYPES)
        await self._refresh()
        out = [self._entry(f) for f in self._files if f.type in types]
        remotes = tuple(remotes)
        if remotes:
            if session is not None:
                out += await remote_model_entries(session, remotes, types, timeout=self._remote_timeout)
            else:
                async with aiohttp.ClientSession() as own:
                    out += await remote_model_entries(own, remotes, types, timeout=self._remote_timeout)
        out.sort(key=lambda m: (m["type"], m["name"], m["backend"] or ""))
        return out

    async def wait_hashed(self, timeout: float) -> None:
        """Return once every known file has a hash (or cannot be read); TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._refresh()
            while True:
                if self._all_hashed():
                    return
                if self._task is None or self._task.done():
                    raise RuntimeError("model hasher is not running (call start())")
                await self._idle.wait()
                if self._all_hashed():
                    return
                # Idle yet something lacks a hash: the file changed since the last scan. Look again.
                await self._refresh(force=True)

    # ------------------------------------------------------------------ internals
    def _ready(self, f: ModelFile) -> FileHash | None:
        h = self._hashes.get(f.path)
        return h if h is not None and h.size == f.size and h.mtime_ns == f.mtime_ns else None

    def _all_hashed(self) -> bool:
        return all(self._ready(f) or self._failed.get(f.path) == (f.size, f.mtime_ns) for f in self._files)

    def _entry(self, f: ModelFile) -> dict:
        h = self._ready(f)
        failed = h is None and self._failed.get(f.path) == (f.size, f.mtime_ns)
        return {
            "name": f.name,
            "type": f.type,
            "size": f.size,
            "hash": h.sha256 if h else None,
            "autov2": h.sha256[:10] if h else None,
            "hashing": h is None and not failed,
            "modifiedAt": f.mtime_ns // 1_000_000,
            "backend": None,
        }

    async def _refresh(self, *, force: bool = False) -> None:
        async with self._scan_lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if not force and not self._stale and self._scanned_at is not None:
                if now - self._scanned_at < self._rescan_interval:
                    return
            self._stale = False
            files = await asyncio.to_thread(scan_models, self._dir)
            await self._apply(files)
            self._scanned_at = now

    async def _apply(self, files: list[ModelFile]) -> None:
        present = {f.path: f for f in files}
        for table in (self._hashes, self._failed, self._pending):
            for path in [p for p in table if p not in present]:
                del table[path]  # vanished
        # Not hashed, not already queued at this stat, not known unreadable at this stat: ask the cache.
        unknown = [
            f
            for f in present.values()
            if self._ready(f) is None
            and self._pending.get(f.path) != (f.size, f.mtime_ns)
            and self._failed.get(f.path) != (f.size, f.mtime_ns)
        ]
        stored: dict[str, tuple[int, int, str]] = {}
        for i in range(0, len(unknown), GET_HASHES_BATCH):
            try:
                stored.update(await self._cache.get_hashes([f.path for f in unknown[i : i + GET_HASHES_BATCH]]))
            except Exception:
                log.exception("model_hash_cache_read_failed")
        new: list[ModelFile] = []
        for f in unknown:
            row = stored.get(f.path)
            if row is not None and row[0] == f.size and row[1] == f.mtime_ns:
                if self._ready(f) is None:
                    self._hashes[f.path] = FileHash(*row)
            elif self._ready(f) is None:
                new.append(f)
        self._files = files
        if new:
            for f in sorted(new, key=lambda f: f.size):  # small files first: more answers sooner
                self._pending[f.path] = (f.size, f.mtime_ns)
            self._idle.clear()
            self._wakeup.set()

    def _next_pending(self) -> tuple[str, Stat] | None:
        while self._pending:
            path, stat = next(iter(self._pending.items()))
            h = self._hashes.get(path)
            if h is not None and (h.size, h.mtime_ns) == stat:
                del self._pending[path]  # already known (e.g. hashed under a newer scan)
                continue
            return path, stat
        return None

    def _done(self, path: str, stat: Stat) -> None:
        if self._pending.get(path) == stat:
            del self._pending[path]  # a rescan that saw it change meanwhile leaves it queued

    async def _run(self) -> None:
        try:
            await self._refresh(force=True)
        except Exception:
            log.exception("models_scan_failed")
        while True:
            item = self._next_pending()
            if item is None:
                self._idle.set()
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(self._background_rescan):
                        await self._wakeup.wait()
                except TimeoutError:
                    try:
                        await self._refresh(force=True)
                    except Exception:
                        log.exception("models_scan_failed")
                continue
            await self._hash_one(*item)

    async def _hash_one(self, path: str, stat: Stat) -> None:
        assert self._executor is not None
        fut = self._executor.submit(_hash_job, path, self._chunk_size, self._cancel)
        self._inflight = fut
        try:
            result = await asyncio.wrap_future(fut)
        except HashCancelled:
            return
        except FileChanged:
            log.info("model_changed_while_hashing", path=path)
            self._done(path, stat)
            self._stale = True  # look again before trusting the listing
            return
        except Exception as exc:
            log.warning("model_hash_failed", path=path, error=repr(exc))
            self._failed[path] = stat
            self._done(path, stat)
            return
        finally:
            self._inflight = None
        self.hash_count += 1
        self._hashes[path] = result
        self._done(path, stat)
        if (result.size, result.mtime_ns) != stat:
            self._stale = True  # the file changed between scan and hash: rescan to list its new stat
        log.debug("model_hashed", path=path, size=result.size, sha256=result.sha256)
        try:
            await self._cache.put_hash(path, result.size, result.mtime_ns, result.sha256)
        except Exception:
            log.exception("model_hash_cache_write_failed", path=path)
