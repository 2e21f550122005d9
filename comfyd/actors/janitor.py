"""Background housekeeping on an interval: retention of finished jobs. Never in the way of intake."""

from __future__ import annotations

from typing import Any

import structlog

from comfyd.actors.base import Actor
from comfyd.config import RetentionConfig
from comfyd.messages import Message
from comfyd.store.db import Database
from comfyd.store.retention import prune_finished

log = structlog.get_logger("comfyd.janitor")


class Prune(Message, frozen=True):
    """Prune now (also sent by the janitor's own timer). Answer: how many jobs were removed."""


class Janitor(Actor[Message]):
    mailbox_size = 16

    def __init__(self, db: Database, retention: RetentionConfig) -> None:
        super().__init__("janitor")
        self.db = db
        self.retention = retention

    async def on_start(self) -> None:
        self.every(self.retention.interval_seconds, Prune)

    async def handle(self, message: Message) -> Any:
        match message:
            case Prune():
                removed = await prune_finished(self.db, days=self.retention.days,
                                               max_finished=self.retention.max_finished)
                if removed:
                    log.info("jobs_pruned", removed=removed, days=self.retention.days,
                             max_finished=self.retention.max_finished)
                return removed
            case _:
                raise TypeError(f"janitor cannot handle {type(message).__name__}")
