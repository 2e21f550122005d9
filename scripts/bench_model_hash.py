#!/usr/bin/env python3
"""Benchmark: hash a big model file through ModelCatalog and measure how long the event loop ever stalls.

Creates a sparse file (2 GiB by default) in a temporary models folder, starts a ModelCatalog on it, and while
the background hasher works, a probe task sleeps 5 ms at a time and records the gap between wake-ups; a
listing is also requested every 50 ms. Prints the hashing throughput and the worst loop stall (gap beyond the
5 ms asked for). Sparse files read as zeros from the page cache, so this measures the hashing path, not the disk;
pass --dense to write real bytes first (slower to set up, then limited by the disk).

    .venv/bin/python scripts/bench_model_hash.py [--size-mb 2048] [--chunk-mb 1] [--dense]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog  # noqa: E402

from comfyd.models import MemoryHashCache, ModelCatalog  # noqa: E402

SLEEP = 0.005


def make_file(path: Path, size: int, dense: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        if not dense:
            f.truncate(size)
            return
        block = os.urandom(4 << 20)
        written = 0
        while written < size:
            n = min(len(block), size - written)
            f.write(block[:n])
            written += n


async def bench(size: int, chunk: int, dense: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="comfyd-bench-") as tmp:
        models = Path(tmp) / "models"
        make_file(models / "checkpoints" / "big.safetensors", size, dense)
        catalog = ModelCatalog(models, MemoryHashCache(), chunk_size=chunk)
        loop = asyncio.get_running_loop()
        gaps: list[float] = []
        list_times: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(SLEEP)
                now = loop.time()
                gaps.append(now - last)
                last = now

        async def lister() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await catalog.list()
                list_times.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(probe()), asyncio.create_task(lister())]
        await asyncio.sleep(0.1)  # settle the probe before hashing begins
        t0 = time.perf_counter()
        await catalog.start()
        await catalog.wait_hashed(timeout=600)
        elapsed = time.perf_counter() - t0
        done.set()
        await asyncio.gather(*tasks)
        await catalog.stop()
        [entry] = await catalog.list()

        # The same probe with nothing hashing, for as long: what this machine's scheduler alone costs.
        base: list[float] = []
        last = loop.time()
        end = last + elapsed
        while loop.time() < end:
            await asyncio.sleep(SLEEP)
            now = loop.time()
            base.append(now - last)
            last = now

    stall_ms = max(0.0, (max(gaps) - SLEEP) * 1000)
    print(f"file:            {size / 2**20:.0f} MiB {'dense' if dense else 'sparse'}, chunk {chunk / 2**20:g} MiB")
    print(f"sha256:          {entry['hash']}")
    print(f"hash time:       {elapsed:.2f} s  ->  {size / 1e6 / elapsed:.0f} MB/s ({size / 2**20 / elapsed:.0f} MiB/s)")
    print(f"loop wake-ups:   {len(gaps)} (sleep {SLEEP * 1000:.0f} ms)")
    print(
        f"loop gap:        max {max(gaps) * 1000:.2f} ms, p99 {statistics.quantiles(gaps, n=100)[98] * 1000:.2f} ms, "
        f"median {statistics.median(gaps) * 1000:.2f} ms"
    )
    print(f"max loop stall:  {stall_ms:.2f} ms (beyond the requested sleep)")
    print(
        f"baseline:        max gap {max(base) * 1000:.2f} ms, p99 {statistics.quantiles(base, n=100)[98] * 1000:.2f} ms"
        " with nothing hashing (same duration): scheduler noise of this machine"
    )
    print(f"listing latency: max {max(list_times) * 1000:.2f} ms over {len(list_times)} listings while hashing")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2048, help="file size in MiB (default 2048 = 2 GiB)")
    ap.add_argument("--chunk-mb", type=float, default=1, help="read chunk in MiB (default 1)")
    ap.add_argument("--dense", action="store_true", help="write random bytes instead of a sparse file")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(bench(args.size_mb << 20, int(args.chunk_mb * (1 << 20)), args.dense))


if __name__ == "__main__":
    main()
