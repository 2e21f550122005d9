"""The outputs index: newest first, keyset-paged (a cursor, never OFFSET), by workflow and kind."""

from __future__ import annotations

import base64
import sqlite3
from typing import Any
from urllib.parse import quote

from comfyd.errors import BadRequest
from comfyd.events import OUTPUT_URL_PREFIX
from comfyd.store.db import Database, Statement


def encode_cursor(created_at: int, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{created_at}:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, row_id = (int(part) for part in raw.split(":"))
        if not (0 <= created_at < 2**63 and 0 <= row_id < 2**63):
            raise ValueError("out of range")
        return created_at, row_id
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("cursor is not one this server gave out", field="cursor") from None


def view(row: sqlite3.Row) -> dict[str, Any]:
    item: dict[str, Any] = {
        "filename": row["path"],
        "workflowId": row["workflow_id"],
        "type": row["kind"],
        "format": row["format"],
        "folder": row["folder_type"],
        "size": row["size"],
        "sha256": row["sha256"],
        "createdAt": row["created_at"],
        "url": OUTPUT_URL_PREFIX + quote(row["path"]),
    }
    if row["width"] is not None:
        item["width"], item["height"] = row["width"], row["height"]
    return item


class OutputIndex:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def page(self, *, workflow_id: str | None, kind: str | None, limit: int,
                   cursor: str | None) -> dict[str, Any]:
        where, params = [], []
        if workflow_id is not None:
            where.append("workflow_id = ?")
            params.append(workflow_id)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if cursor is not None:
            created_at, row_id = decode_cursor(cursor)
            where.append("(created_at, id) < (?, ?)")
            params += [created_at, row_id]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self.db.fetchall(
            f"SELECT * FROM outputs {clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more and rows else None
        return {"outputs": [view(r) for r in rows], "nextCursor": next_cursor}

    @staticmethod
    def delete_statement(path: str) -> Statement:
        return "DELETE FROM outputs WHERE path = ?", (path,)

    @staticmethod
    def upsert_statement(*, path: str, workflow_id: str, facts: dict[str, Any], created_at: int) -> Statement:
        filename = path.rsplit("/", 1)[-1]
        subfolder = path.rsplit("/", 1)[0] if "/" in path else ""
        return (
            "INSERT INTO outputs (path, workflow_id, filename, subfolder, folder_type, kind, format, size, sha256, "
            "width, height, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(path) DO NOTHING",
            (path, workflow_id, filename, subfolder, "output", facts["kind"], facts["format"], facts["size"],
             facts["sha256"], facts["width"], facts["height"], created_at))
