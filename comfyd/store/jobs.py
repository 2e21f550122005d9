"""Job rows: the SQL for workflows, and the record the rest of comfyd reads them as."""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from comfyd.messages import JobError, Output
from comfyd.store.db import Database, Statement

_json = msgspec.json.Encoder()
_outputs = msgspec.json.Decoder(list[Output])


class JobRecord(msgspec.Struct, kw_only=True):
    """A job as stored (without the workflow JSON, which is read only when it is dispatched)."""

    seq: int
    id: str
    status: str
    priority: str
    pool: str
    rank: int
    backend: str | None = None
    prompt_id: str | None = None
    progress: float = 0.0
    current_node: str | None = None
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    error: str | None = None
    error_type: str | None = None
    error_detail: dict[str, Any] | None = None
    attempts: int = 0
    timeout: float | None = None
    outputs: list[Output] = []


_COLUMNS = ("seq, id, status, priority, pool, rank, backend, prompt_id, progress, current_node, created_at, "
            "started_at, completed_at, error, error_type, error_detail, attempts, timeout, outputs")


def _record(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    data["error_detail"] = msgspec.json.decode(data["error_detail"]) if data["error_detail"] else None
    data["outputs"] = _outputs.decode(data["outputs"]) if data["outputs"] else []
    return msgspec.convert(data, JobRecord)


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes (each returns the commit future) ---------------------------------------------------------
    def insert(self, *, workflow_id: str, seq: int, priority: str, pool: str, rank: int, workflow: bytes,
               created_at: int, timeout: float | None, idempotency_key: str | None) -> Any:
        return self.db.write([(
            "INSERT INTO workflows (seq, id, status, priority, pool, rank, workflow, created_at, timeout, "
            "idempotency_key) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
            (seq, workflow_id, priority, pool, rank, workflow, created_at, timeout, idempotency_key),
        )])

    async def max_seq(self) -> int:
        row = await self.db.fetchone("SELECT COALESCE(MAX(seq), 0) FROM workflows")
        return int(row[0]) if row else 0

    def update(self, workflow_id: str, **fields: Any) -> Any:
        return self.db.write([self.update_statement(workflow_id, **fields)])

    @staticmethod
    def update_statement(workflow_id: str, **fields: Any) -> Statement:
        if "error_detail" in fields and fields["error_detail"] is not None:
            fields["error_detail"] = _json.encode(fields["error_detail"]).decode()
        if "outputs" in fields:
            fields["outputs"] = _json.encode(list(fields["outputs"])).decode()
        columns = ", ".join(f"{name} = ?" for name in fields)
        return f"UPDATE workflows SET {columns} WHERE id = ?", (*fields.values(), workflow_id)

    def finish(self, workflow_id: str, *, status: str, completed_at: int, outputs: tuple[Output, ...] = (),
               error: JobError | None = None, progress: float | None = None,
               current_node: str | None = None) -> Statement:
        fields: dict[str, Any] = {"status": status, "completed_at": completed_at, "outputs": outputs,
                                  "error": error.message if error else None,
                                  "error_type": error.error_type if error else None,
                                  "error_detail": error.detail if error else None}
        if progress is not None:
            fields["progress"] = progress
        if current_node is not None:
            fields["current_node"] = current_node
        return self.update_statement(workflow_id, **fields)

    def without_output(self, workflow_id: str, relpath: str) -> Statement | None:
        """The update that drops a deleted file from its job's stored outputs (None: the job does not list it)."""
        row = self.db.lookup("SELECT outputs FROM workflows WHERE id = ?", (workflow_id,))
        outputs = _outputs.decode(row[0]) if row and row[0] else []
        kept = [o for o in outputs if o.relpath != relpath]
        return self.update_statement(workflow_id, outputs=kept) if len(kept) < len(outputs) else None

    # -- reads -------------------------------------------------------------------------------------------
    async def get(self, workflow_id: str) -> JobRecord | None:
        row = self.db.lookup(f"SELECT {_COLUMNS} FROM workflows WHERE id = ?", (workflow_id,))
        return _record(row) if row else None

    async def workflow_json(self, workflow_id: str) -> bytes | None:
        row = self.db.lookup("SELECT workflow FROM workflows WHERE id = ?", (workflow_id,))
        return bytes(row[0]) if row else None

    async def by_idempotency_key(self, key: str) -> JobRecord | None:
        row = self.db.lookup(f"SELECT {_COLUMNS} FROM workflows WHERE idempotency_key = ?", (key,))
        return _record(row) if row else None

    async def active(self) -> list[sqlite3.Row]:
        """Queued and running jobs in dispatch order, small columns only (for recovery)."""
        return await self.db.fetchall(
            "SELECT seq, id, status, pool, rank, backend, prompt_id, attempts, timeout, started_at "
            "FROM workflows WHERE status IN ('queued', 'running') ORDER BY rank, seq")

    async def recent(self, limit: int, status: str | None = None) -> list[JobRecord]:
        where, params = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM workflows {where} ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [_record(r) for r in rows]
