"""ModelCatalog against real files in tmp_path (and real aiohttp servers for remote backends)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from comfyd.models import MODEL_TYPES, MemoryHashCache, ModelCatalog, fetch_remote_models
from comfyd.models import hashing
from comfyd.models.hashing import HashCancelled

FILES = {
    "checkpoints/a.safetensors": b"checkpoint a",
    "checkpoints/sdxl/base.safetensors": b"sdxl base",
    "checkpoints/sdxl/refiner/r.ckpt": b"refiner",
    "loras/style.pt": b"lora style",
    "loras/UPPER.SAFETENSORS": b"upper-case extension",
    "vae/v.sft": b"vae",
    "controlnet/cn.pth": b"controlnet",
    "t2i_adapter/ad.bin": b"t2i adapter",
    "upscale_models/4x.pth": b"upscaler",
    # not models: wrong extension, hidden file, hidden folder, folder ComfyUI lists elsewhere
    "checkpoints/readme.txt": b"text",
    "checkpoints/sdxl/config.yaml": b"yaml",
    "checkpoints/.partial.safetensors": b"hidden",
    "loras/.trash/old.safetensors": b"hidden folder",
    "embeddings/emb.pt": b"embedding",
}

EXPECTED = [
    ("checkpoints", "a.safetensors"),
    ("checkpoints", "sdxl/base.safetensors"),
    ("checkpoints", "sdxl/refiner/r.ckpt"),
    ("controlnet", "ad.bin"),
    ("controlnet", "cn.pth"),
    ("loras", "UPPER.SAFETENSORS"),
    ("loras", "style.pt"),
    ("upscale", "4x.pth"),
    ("vae", "v.sft"),
]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for rel, data in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@asynccontextmanager
async def running(catalog: ModelCatalog):
    await catalog.start()
    try:
        yield catalog
    finally:
        await catalog.stop()


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (path, thread id) of every hash the catalogue runs."""
    calls: list[tuple[str, int]] = []
    real = hashing.sha256_file

    def counting(path, *args, **kwargs):
        calls.append((path, threading.get_ident()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return calls


async def test_lists_every_type_from_comfyui_folders(models_dir: Path) -> None:
    catalog = ModelCatalog(models_dir, MemoryHashCache())
    models = await catalog.list()
    assert [(m["type"], m["name"]) for m in models] == EXPECTED
    for m in models:
        folder = {"upscale": "upscale_models"}.get(m["type"], m["type"])
        if m["name"] == "ad.bin":
            folder = "t2i_adapter"
        assert m["size"] == len(FILES[f"{folder}/{m['name']}"])
        assert m["backend"] is None
        assert isinstance(m["modifiedAt"], int)
    for type_ in MODEL_TYPES:
        only = await catalog.list(type_)
        assert [(m["type"], m["name"]) for m in only] == [e for e in EXPECTED if e[0] == type_]
    with pytest.raises(ValueError):
        await catalog.list("embeddings")


async def test_symlinks_followed_without_looping(models_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "shared.safetensors").write_bytes(b"shared lora")
    (models_dir / "loras" / "linked.safetensors").symlink_to(elsewhere / "shared.safetensors")
    (models_dir / "loras" / "pack").symlink_to(elsewhere, target_is_directory=True)
    (models_dir / "checkpoints" / "sdxl" / "loop").symlink_to(models_dir / "checkpoints", target_is_directory=True)
    (models_dir / "vae" / "broken.safetensors").symlink_to(tmp_path / "missing.safetensors")
    catalog = ModelCatalog(models_dir, MemoryHashCache())
    async with running(catalog):
        await catalog.wait_hashed(timeout=10)
        loras = {m["name"]: m for m in await catalog.list("loras")}
        checkpoints = [m["name"] for m in await catalog.list("checkpoints")]
        vae = [m["name"] for m in await catalog.list("vae")]
    assert set(loras) == {"UPPER.SAFETENSORS", "style.pt", "linked.safetensors", "pack/shared.safetensors"}
    assert loras["linked.safetensors"]["size"] == len(b"shared lora")
    assert loras["linked.safetensors"]["hash"] == sha(elsewhere / "shared.safetensors")
    assert checkpoints == ["a.safetensors", "sdxl/base.safetensors", "sdxl/refiner/r.ckpt"]
    assert vae == ["v.sft"]


async def test_hashes_computed_in_background(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = hashing.sha256_file

    def gated(path, *args, **kwargs):
        gate.wait(10)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "sha256_file", gated)
    catalog = ModelCatalog(models_dir, MemoryHashCache(), rescan_interval=0)
    async with running(catalog):
        first = await catalog.list()  # the hasher is held: the listing must not wait for it
        assert first and all(m["hash"] is None and m["autov2"] is None and m["hashing"] for m in first)
        gate.set()
        await catalog.wait_hashed(timeout=10)
        models = await catalog.list()
    for m in models:
        folder = {"upscale": "upscale_models"}.get(m["type"], m["type"])
        if m["name"] == "ad.bin":
            folder = "t2i_adapter"
        digest = sha(models_dir / folder / m["name"])
        assert m["hash"] == digest
        assert m["autov2"] == digest[:10]
        assert m["hashing"] is False


async def test_second_catalog_reuses_cache(models_dir: Path, hash_calls: list) -> None:
    cache = MemoryHashCache()
    async with running(ModelCatalog(models_dir, cache)) as first:
        await first.wait_hashed(timeout=10)
        hashed = await first.list()
    assert len(hash_calls) == len(EXPECTED) == len(cache.rows)

    second = ModelCatalog(models_dir, cache)
    listed = await second.list()  # ready at once, even before the hasher starts
    assert listed == hashed
    async with running(second):
        await second.wait_hashed(timeout=10)
    assert second.hash_count == 0
    assert len(hash_calls) == len(EXPECTED)


async def test_modified_file_rehashed_and_deleted_file_gone(models_dir: Path, hash_calls: list) -> None:
    cache = MemoryHashCache()
    catalog = ModelCatalog(models_dir, cache, rescan_interval=0)
    async with running(catalog):
        await catalog.wait_hashed(timeout=10)
        before = {m["name"]: m for m in await catalog.list("checkpoints")}
        calls = len(hash_calls)

        target = models_dir / "checkpoints" / "sdxl" / "base.safetensors"
        st = target.stat()
        target.write_bytes(b"sdxl base, retrained")
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        (models_dir / "checkpoints" / "a.safetensors").unlink()

        await catalog.list()  # notices the change (rescan_interval=0)
        await catalog.wait_hashed(timeout=10)
        after = {m["name"]: m for m in await catalog.list("checkpoints")}

    assert set(after) == {"sdxl/base.safetensors", "sdxl/refiner/r.ckpt"}
    assert after["sdxl/base.safetensors"]["hash"] == sha(target)
    assert after["sdxl/base.safetensors"]["hash"] != before["sdxl/base.safetensors"]["hash"]
    assert after["sdxl/refiner/r.ckpt"] == before["sdxl/refiner/r.ckpt"]
    assert [p for p, _ in hash_calls[calls:]] == [str(target)]
    assert cache.rows[str(target)][2] == sha(target)


async def test_large_file_hashed_off_the_event_loop(tmp_path: Path, hash_calls: list) -> None:
    big = tmp_path / "models" / "checkpoints" / "big.safetensors"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: reads as zeros

    turns = 0
    stop = asyncio.Event()

    async def probe() -> None:  # counts loop turns; stalls are measured in scripts/bench_model_hash.py
        nonlocal turns
        while not stop.is_set():
            await asyncio.sleep(0)
            turns += 1

    catalog = ModelCatalog(tmp_path / "models", MemoryHashCache())
    probe_task = asyncio.create_task(probe())
    async with running(catalog):
        await catalog.wait_hashed(timeout=50)
        models = await catalog.list()
    stop.set()
    await probe_task

    digest = hashlib.sha256(bytes(200 * 1024 * 1024)).hexdigest()
    assert models[0]["hash"] == digest
    assert [p for p, _ in hash_calls] == [str(big.resolve())]
    assert hash_calls[0][1] != threading.get_ident()  # hashed in a worker thread, not on the loop's
    assert turns > 1  # the loop kept running while the file was hashed


async def test_stop_abandons_hash_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "models" / "vae" / "big.safetensors"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(1024 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    outcome: list[BaseException | str] = []
    workers: list[threading.Thread] = []
    real = hashing.sha256_file

    def observed(path, *args, **kwargs):
        workers.append(threading.current_thread())
        loop.call_soon_threadsafe(started.set)
        try:
            real(path, *args, **kwargs)
            outcome.append("finished")
        except BaseException as exc:
            outcome.append(exc)
            raise

    monkeypatch.setattr(hashing, "sha256_file", observed)
    cache = MemoryHashCache()
    catalog = ModelCatalog(tmp_path / "models", cache, chunk_size=1 << 20)
    await catalog.start()
    await asyncio.wait_for(started.wait(), timeout=10)
    await catalog.stop()
    assert len(outcome) == 1 and isinstance(outcome[0], HashCancelled)
    assert cache.rows == {}
    await asyncio.to_thread(workers[0].join, 10)
    assert not workers[0].is_alive()
    models = await catalog.list()
    assert models[0]["hashing"] is True


async def test_unreadable_file_is_not_hashing_forever(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = hashing.sha256_file
    bad = str((models_dir / "vae" / "v.sft").resolve())

    def failing(path, *args, **kwargs):
        if path == bad:
            raise PermissionError(13, "Permission denied", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "sha256_file", failing)
    catalog = ModelCatalog(models_dir, MemoryHashCache())
    async with running(catalog):
        await catalog.wait_hashed(timeout=10)
        models = {m["name"]: m for m in await catalog.list()}
    assert models["v.sft"]["hash"] is None and models["v.sft"]["hashing"] is False
    assert models["a.safetensors"]["hash"] is not None


async def test_missing_or_absent_models_dir(tmp_path: Path) -> None:
    assert await ModelCatalog(None, MemoryHashCache()).list() == []
    catalog = ModelCatalog(tmp_path / "nowhere", MemoryHashCache())
    async with running(catalog):
        await catalog.wait_hashed(timeout=10)
        assert await catalog.list("checkpoints") == []


@asynccontextmanager
async def comfyui_server(models: dict[str, list[str]] | None, status: int = 200):
    """A stand-in for ComfyUI's GET /models/{folder} (404 for a folder it does not know, as upstream)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        seen.append(folder)
        if status != 200:
            return web.Response(status=status, text="boom")
        if models is None or folder not in {"checkpoints", "loras", "vae", "controlnet", "upscale_models"}:
            return web.Response(status=404)
        return web.json_response(models.get(folder, []))

    app = web.Application()
    app.router.add_get("/models/{folder}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/")), seen
    finally:
        await server.close()


def closed_port() -> int:
    """A loopback port nobody listens on: bound, then closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_fetch_remote_models() -> None:
    async with comfyui_server({"checkpoints": ["x.safetensors", "sub/y.ckpt"]}) as (url, _):
        async with aiohttp.ClientSession() as session:
            assert await fetch_remote_models(session, url, "checkpoints") == ["x.safetensors", "sub/y.ckpt"]
            assert await fetch_remote_models(session, url.rstrip("/"), "loras") == []
            assert await fetch_remote_models(session, url, "no_such_folder") == []
    async with comfyui_server(None, status=500) as (url, _):
        async with aiohttp.ClientSession() as session:
            assert await fetch_remote_models(session, url, "checkpoints") == []


async def test_remote_backends_merged_and_failures_ignored(models_dir: Path) -> None:
    good_models = {"checkpoints": ["remote.safetensors"], "controlnet": ["cn-remote.pth"]}
    async with comfyui_server(good_models) as (good, good_seen), comfyui_server(None, 500) as (bad, _):
        down = f"http://127.0.0.1:{closed_port()}/"
        remotes = [("gpu-remote", good), ("broken", bad), ("down", down)]
        catalog = ModelCatalog(models_dir, MemoryHashCache(), remote_timeout=5)
        async with aiohttp.ClientSession() as session:
            checkpoints = await catalog.list("checkpoints", remotes=remotes, session=session)
            everything = await catalog.list(remotes=remotes, session=session)
        own_session = await catalog.list("controlnet", remotes=[("gpu-remote", good)])
    remote = [m for m in checkpoints if m["backend"] is not None]
    assert remote == [
        {
            "name": "remote.safetensors",
            "type": "checkpoints",
            "size": None,
            "hash": None,
            "autov2": None,
            "hashing": False,
            "modifiedAt": None,
            "backend": "gpu-remote",
        }
    ]
    assert [m["name"] for m in checkpoints if m["backend"] is None] == [
        n for t, n in EXPECTED if t == "checkpoints"
    ]
    assert {(m["type"], m["name"], m["backend"]) for m in everything if m["backend"]} == {
        ("checkpoints", "remote.safetensors", "gpu-remote"),
        ("controlnet", "cn-remote.pth", "gpu-remote"),
    }
    assert [(m["type"], m["name"]) for m in everything] == sorted((m["type"], m["name"]) for m in everything)
    assert "upscale_models" in good_seen  # the API type "upscale" is ComfyUI's upscale_models folder
    assert ("controlnet", "cn-remote.pth", "gpu-remote") in {(m["type"], m["name"], m["backend"]) for m in own_session}


async def test_file_changed_between_scan_and_hash(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    hashing_started = asyncio.Event()
    loop = asyncio.get_running_loop()
    real = hashing.sha256_file

    def gated(path, *args, **kwargs):
        loop.call_soon_threadsafe(hashing_started.set)
        gate.wait(10)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "sha256_file", gated)
    target = models_dir / "vae" / "v.sft"
    stored = asyncio.Event()

    class SignallingCache(MemoryHashCache):
        async def put_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
            await super().put_hash(path, size, mtime_ns, sha256)
            if path == str(target):
                stored.set()

    catalog = ModelCatalog(models_dir, SignallingCache(), rescan_interval=3600)
    async with running(catalog):
        [before] = await catalog.list("vae")  # scanned with the old size and mtime
        await asyncio.wait_for(hashing_started.wait(), timeout=10)  # the hasher's own first scan is over too
        target.write_bytes(b"vae, second version")
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        gate.set()
        await asyncio.wait_for(stored.wait(), timeout=10)
        [after] = await catalog.list("vae")  # long rescan interval: the hasher's finding forces the rescan
    assert before["size"] == len(b"vae") and before["hashing"] is True
    assert after["size"] == len(b"vae, second version")
    assert after["hash"] == sha(target)


def test_sha256_file_cancel_and_result(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"x" * 3_000_000)
    result = hashing.sha256_file(str(p), 1 << 20)
    assert result.sha256 == sha(p) and result.size == 3_000_000 and result.mtime_ns == p.stat().st_mtime_ns
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(HashCancelled):
        hashing.sha256_file(str(p), 1 << 20, cancel)
