"""Numbered schema migrations. Append only: a released migration is never edited."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: jobs, outputs, services, model hashes
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE workflows (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        priority TEXT NOT NULL,
        pool TEXT NOT NULL,
        rank INTEGER NOT NULL,
        workflow BLOB NOT NULL,
        backend TEXT,
        prompt_id TEXT,
        progress REAL NOT NULL DEFAULT 0,
        current_node TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        completed_at INTEGER,
        error TEXT,
        error_type TEXT,
        error_detail TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        timeout REAL,
        idempotency_key TEXT UNIQUE,
        outputs TEXT
    );
    CREATE INDEX workflows_active ON workflows (status) WHERE status IN ('queued', 'running');
    CREATE INDEX workflows_finished ON workflows (completed_at) WHERE completed_at IS NOT NULL;
    CREATE TABLE outputs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL UNIQUE,
        workflow_id TEXT NOT NULL,
        filename TEXT NOT NULL,
        subfolder TEXT NOT NULL,
        folder_type TEXT NOT NULL,
        kind TEXT NOT NULL,
        format TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT,
        width INTEGER,
        height INTEGER,
        node_id TEXT,
        backend TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX outputs_newest ON outputs (created_at DESC, id DESC);
    CREATE INDEX outputs_by_workflow ON outputs (workflow_id, created_at DESC, id DESC);
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        endpoints TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        pool TEXT NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE model_hashes (
        path TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        hashed_at INTEGER NOT NULL
    );
    """,
    # 2: dispatches counts every hand-over to ComfyUI (the prompt_id suffix, unique per post); attempts counts
    #    only the runs that count against max_attempts (a job taken back before it ran gives its attempt back)
    """
    ALTER TABLE workflows ADD COLUMN dispatches INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: listing outputs of one kind without scanning the whole index
    """
    CREATE INDEX outputs_by_kind ON outputs (kind, created_at DESC, id DESC);
    """,
]
