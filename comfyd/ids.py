"""Workflow ids: UUIDv7 (RFC 9562), time-ordered so that new rows land at the end of the id index.

A random UUIDv4 inserts at a random place in the ``workflows.id`` index; as the table grows every insert
touches a different page, which made the unique index the largest part of a submit's SQLite work. A v7 id
starts with the millisecond clock, so inserts append; it is still a UUID, unguessable in its 74 random bits.
Python has ``uuid.uuid7`` only from 3.14.
"""

from __future__ import annotations

import os
import time


def uuid7() -> str:
    """A UUIDv7 string: 48 bits of Unix milliseconds, version 7, 12 random bits, variant 10, 62 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant (RFC 4122 / 9562)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
