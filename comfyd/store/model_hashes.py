"""The model catalogue's hash cache, kept in SQLite by path, size and mtime."""

from __future__ import annotations

from comfyd.store.db import Database, now_ms


class SqliteHashCache:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get_hashes(self, paths: list[str]) -> dict[str, tuple[int, int, str]]:
        found: dict[str, tuple[int, int, str]] = {}
        for start in range(0, len(paths), 500):
            chunk = paths[start:start + 500]
            rows = await self.db.fetchall(
                f"SELECT path, size, mtime_ns, sha256 FROM model_hashes WHERE path IN ({','.join('?' * len(chunk))})",
                chunk)
            found.update({r["path"]: (r["size"], r["mtime_ns"], r["sha256"]) for r in rows})
        return found

    async def put_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        await self.db.write([(
            "INSERT INTO model_hashes (path, size, mtime_ns, sha256, hashed_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
            "sha256 = excluded.sha256, hashed_at = excluded.hashed_at",
            (path, size, mtime_ns, sha256, now_ms()))])
