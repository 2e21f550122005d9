"""Where model hashes outlive the process: a protocol the store implements, and an in-memory stand-in."""

from __future__ import annotations

from typing import Protocol

# Migration snippet for the store (numbered migrations are the store's business).
MODEL_HASHES_DDL = (
    "CREATE TABLE IF NOT EXISTS model_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
    "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, hashed_at INTEGER NOT NULL)"
)

# put_hash: parameters (path, size, mtime_ns, sha256, hashed_at epoch ms).
MODEL_HASHES_UPSERT = (
    "INSERT INTO model_hashes (path, size, mtime_ns, sha256, hashed_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
    "sha256 = excluded.sha256, hashed_at = excluded.hashed_at"
)

# The catalogue asks for at most this many paths per get_hashes call (well under SQLite's variable limit).
GET_HASHES_BATCH = 500


def model_hashes_select(n: int) -> str:
    """get_hashes: ``SELECT`` for ``n`` paths (parameters: the paths); rows are (path, size, mtime_ns, sha256)."""
    if n < 1:
        raise ValueError("need at least one path")
    return "SELECT path, size, mtime_ns, sha256 FROM model_hashes WHERE path IN (" + ",".join("?" * n) + ")"


class HashCache(Protocol):
    async def get_hashes(self, paths: list[str]) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, sha256) for the paths that have a stored hash (any size/mtime)."""
        ...

    async def put_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        """Store (replace) the hash of ``path`` as it was at ``size``/``mtime_ns``."""
        ...


class MemoryHashCache:
    """Dict-backed HashCache for tests and for running without a database."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, int, str]] = {}

    async def get_hashes(self, paths: list[str]) -> dict[str, tuple[int, int, str]]:
        return {p: self.rows[p] for p in paths if p in self.rows}

    async def put_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        self.rows[path] = (size, mtime_ns, sha256)
