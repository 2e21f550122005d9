"""``comfyd outputs | models | backends``: the output index (and downloading it), the model catalogue, the backends."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from comfyd.client.context import Context
from comfyd.client.options import EXIT_FAILED, EXIT_OK, CliError
from comfyd.client.output import human_size, local_time, short_id

PAGE_MAX = 1000  # the server's largest page


async def fetch_outputs(ctx: Context, workflow_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` outputs, newest first, following ``nextCursor`` across pages."""
    found: list[dict[str, Any]] = []
    cursor = None
    while len(found) < limit:
        page = await ctx.api.get("/v1/comfyui/outputs", workflowId=workflow_id, cursor=cursor,
                                 limit=min(PAGE_MAX, limit - len(found)))
        found += page["outputs"]
        cursor = page.get("nextCursor")
        if not cursor or not page["outputs"]:
            break
    return found[:limit]


def target_path(root: Path, filename: str) -> Path:
    """Where ``filename`` (``<workflowId>/<name>``) goes under ``root``; never anywhere outside it."""
    relative = PurePosixPath(filename)
    if not filename or relative.is_absolute() or ".." in relative.parts or "\\" in filename:
        raise CliError(f"refusing to write {filename!r}: it would land outside {root}")
    base = root.resolve()
    target = (base / relative).resolve()  # follows symlinks already inside root
    if target == base or not target.is_relative_to(base):
        raise CliError(f"refusing to write {filename!r}: it would land outside {root}")
    return target


def _same_file(path: Path, sha256: str | None) -> bool:
    if not sha256 or not path.is_file():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == sha256


async def download_all(ctx: Context, items: list[dict[str, Any]], root: Path) -> int:
    """Fetch each output into ``root``, keeping its subfolders; sets ``path`` on each one written or present."""
    code = EXIT_OK
    for item in items:
        try:
            target = target_path(root, item["filename"])
            if _same_file(target, item.get("sha256")):
                item["path"] = str(target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            size, sha256 = await ctx.api.download(item["url"], target)
            if item.get("sha256") and sha256 != item["sha256"]:
                target.unlink(missing_ok=True)
                raise CliError(f"{item['filename']}: the download's sha256 differs from the index; removed it")
            item["path"] = str(target)
            if not ctx.settings.json:
                ctx.console.note(f"downloaded {target} ({human_size(size)})")
        except CliError as exc:
            if exc.code != EXIT_FAILED:
                raise  # unreachable, unauthorized: the rest would fail the same way
            ctx.console.error(exc.message)
            code = EXIT_FAILED
        except OSError as exc:
            ctx.console.error(f"cannot write {item['filename']} under {root}: {exc.strerror or exc}")
            code = EXIT_FAILED
    return code


async def outputs(ctx: Context, args: argparse.Namespace) -> int:
    items = await fetch_outputs(ctx, args.workflow, args.limit)
    code = EXIT_OK
    if args.download:
        root = Path(args.download)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot create {root}: {exc.strerror or exc}") from None
        code = await download_all(ctx, items, root)
    if ctx.settings.json:
        ctx.console.json({"outputs": items})
        return code
    headers = ["FILENAME", "TYPE", "SIZE", "CREATED"] + (["PATH"] if args.download else [])
    rows = [[o["filename"], o.get("type"), human_size(o.get("size")), local_time(o.get("createdAt"))]
            + ([o.get("path")] if args.download else []) for o in items]
    ctx.console.table(headers, rows)
    return code


async def models(ctx: Context, args: argparse.Namespace) -> int:
    reply = await ctx.api.get("/v1/comfyui/models", type=args.type)
    if ctx.settings.json:
        ctx.console.json(reply)
        return EXIT_OK
    rows = []
    for m in reply["models"]:
        hash_ = m.get("autov2") or ((m["hash"] or "")[:10]) or ("hashing…" if m.get("hashing") else "-")
        name = m["name"] if not m.get("backend") else f"{m['name']} ({m['backend']})"
        rows.append((name, m["type"], human_size(m.get("size")), hash_))
    ctx.console.table(("NAME", "TYPE", "SIZE", "HASH"), rows)
    return EXIT_OK


async def backends(ctx: Context, args: argparse.Namespace) -> int:
    reply = await ctx.api.get("/v1/comfyui/backends")
    if ctx.settings.json:
        ctx.console.json(reply)
        return EXIT_OK
    rows = [(b["name"], b["url"], b.get("pool"), b.get("gpu"), b.get("state"),
             ",".join(short_id(j) for j in b.get("jobs") or []) or "-", b.get("lastError"))
            for b in reply["backends"]]
    ctx.console.table(("NAME", "URL", "POOL", "GPU", "STATE", "JOBS", "LAST ERROR"), rows)
    return EXIT_OK
