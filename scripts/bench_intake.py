#!/usr/bin/env python3
"""Benchmark: durable intake — how many submissions per second comfyd accepts, and what 100k queued costs.

Part 1 (throughput). One load generator, ``wrk`` (POST of ``{"workflow": tests/workflows/quick.json}`` with
the X-API-Key header, from a Lua script), drives three servers in turn, each in its own process, round after
round (interleaved so that background load hits all three alike):

  (a) bare    — an aiohttp handler that only decodes the body with msgspec and answers 202;
  (b) sqlite  — (a) plus a simple group-committing writer: each body is inserted into SQLite (WAL,
                synchronous=NORMAL) by a batching writer thread before the 202 — a reference for (c);
  (c) comfyd  — the real ``comfyd serve`` (data dir in a temp dir, COMFYUI_API_URL=http://127.0.0.1:9 where
                nothing listens, so every job stays queued).

Each server gets a warm-up run, then a measured run; printed: requests/s, p50/p99 latency, the server's CPU
use during the run, and comfyd's ratio to (a) (target ≥ 0.60).

Part 2 (100k queued). A fresh comfyd: submit/status/cancel latency with an empty queue, fill the queue to
100,000 jobs over HTTP, RSS of the process (target ≤ 300 MB), the same latencies at 100k (no O(n) per
request), then restart-to-ready after SIGTERM and after SIGKILL: spawn → /health 200, and the
``scheduler_recovered`` log line with queued=100000 (target ≤ 5 s).

    .venv/bin/python scripts/bench_intake.py                 # everything (~4 min)
    .venv/bin/python scripts/bench_intake.py --skip-100k     # throughput only
    .venv/bin/python scripts/bench_intake.py --only comfyd --rounds 1 --profile /tmp/prof   # py-spy profile

Needs ``wrk`` (Debian: apt-get install -y wrk); ``--profile`` needs py-spy in the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    API_KEY,
    INTAKE_RULES,
    QUICK,
    VENV_BIN,
    ComfydServe,
    cpu_seconds,
    free_port,
    have_wrk,
    install_cleanup,
    median,
    percentile,
    print_breakdown,
    print_machine,
    python,
    rss_mb,
    run_wrk,
    spread,
    track,
    wait_http,
    write_post_lua,
)

SUBMIT = "/v1/comfyui/workflow"
NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens, jobs stay queued
COMFYD_TOML = "[scheduler]\nbackend_wait = 86400.0\n"  # never fail the waiting jobs during a benchmark


def comfyd_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.comfyd_env)


def body_bytes() -> bytes:
    return b'{"workflow": ' + QUICK.read_bytes().strip() + b"}"


# =========================================================================================================
# Reference servers (a) and (b): run as `bench_intake.py --serve bare|sqlite --port N [--db PATH]`
# =========================================================================================================
def serve_reference(kind: str, port: int, db_path: str | None) -> None:
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import msgspec
    from aiohttp import web

    decode = msgspec.json.decode
    encode = msgspec.json.encode

    class Writer:
        """A simple group commit: whatever waits is inserted in one transaction by one thread."""

        def __init__(self, path: str) -> None:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                              "workflow BLOB NOT NULL, created_at INTEGER NOT NULL)")
            self.queue: asyncio.Queue[tuple[tuple[Any, ...], asyncio.Future[None]]] = asyncio.Queue()
            self.thread = ThreadPoolExecutor(1)

        def _commit(self, rows: list[tuple[Any, ...]]) -> None:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT INTO jobs (id, workflow, created_at) VALUES (?, ?, ?)", rows)
            self.conn.execute("COMMIT")

        async def run(self) -> None:
            loop = asyncio.get_running_loop()
            while True:
                batch = [await self.queue.get()]
                while len(batch) < 512 and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                await loop.run_in_executor(self.thread, self._commit, [row for row, _ in batch])
                for _, future in batch:
                    future.set_result(None)

        def write(self, row: tuple[Any, ...]) -> asyncio.Future[None]:
            future = asyncio.get_running_loop().create_future()
            self.queue.put_nowait((row, future))
            return future

    writer: Writer | None = None

    async def submit_bare(request: web.Request) -> web.Response:
        decode(await request.read())
        return web.json_response({"status": "queued"}, status=202)

    async def submit_sqlite(request: web.Request) -> web.Response:
        body = decode(await request.read())
        workflow_id = str(uuid.uuid4())
        assert writer is not None
        await writer.write((workflow_id, encode(body["workflow"]), int(time.time() * 1000)))
        return web.json_response({"workflowId": workflow_id, "status": "queued"}, status=202)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def main() -> None:
        nonlocal writer
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/health", health)
        app.router.add_post(SUBMIT, submit_bare if kind == "bare" else submit_sqlite)
        task = None
        if kind == "sqlite":
            writer = Writer(db_path or ":memory:")
            task = asyncio.create_task(writer.run())
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        if task is not None:
            task.cancel()

    asyncio.run(main())


class ReferenceServer:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.db = workdir / f"{kind}.db"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.process = track(subprocess.Popen([python(), __file__, "--serve", self.kind, "--port", str(self.port),
                                               "--db", str(self.db)], start_new_session=True))
        wait_http(self.url + "/health", 30)

    def rows(self) -> int | None:
        if self.kind != "sqlite":
            return None
        with sqlite3.connect(self.db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class ComfydTarget:
    kind = "comfyd"

    def __init__(self, workdir: Path, index: int, args: argparse.Namespace) -> None:
        self.serve = ComfydServe(workdir / f"comfyd-{index}", NOWHERE, toml=COMFYD_TOML, env=comfyd_env(args),
                                 source=Path(args.source) if args.source else None)

    @property
    def url(self) -> str:
        return self.serve.url

    @property
    def pid(self) -> int:
        return self.serve.pid

    def start(self) -> None:
        self.serve.start(wait=True)

    def rows(self) -> int:
        with sqlite3.connect(self.serve.data_dir / "comfyd.db") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM workflows WHERE status = 'queued'").fetchone()[0])

    def stop(self) -> None:
        self.serve.stop()


# =========================================================================================================
# Part 1: throughput
# =========================================================================================================
LABELS = {"bare": "(a) bare aiohttp + msgspec decode", "sqlite": "(b) (a) + SQLite group commit",
          "comfyd": "(c) comfyd serve"}


def measure_one(target: Any, script: Path, args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    try:
        target.start()
        url = target.url + SUBMIT
        if args.warmup > 0:
            run_wrk(url, script, duration=args.warmup, connections=args.connections, threads=args.threads)
        rows_before = target.rows()
        spy = None
        if profile_dir is not None:
            spy = start_profile(target.pid, profile_dir, args.duration)
        cpu0, t0 = cpu_seconds(target.pid), time.monotonic()
        result = run_wrk(url, script, duration=args.duration, connections=args.connections, threads=args.threads)
        cpu = cpu_seconds(target.pid) - cpu0
        result["server_cpu"] = cpu / (time.monotonic() - t0)
        result["cpu_us_per_req"] = cpu / max(1, result.get("requests", 0)) * 1e6
        result["loadavg1"] = os.getloadavg()[0]
        if spy is not None:
            spy.wait(60)
            print_breakdown(profile_dir / "intake.txt", INTAKE_RULES, 250, args.duration)
        time.sleep(0.3)  # let the last batch commit
        rows_after = target.rows()
        if rows_before is not None and rows_after is not None:
            result["rows"] = rows_after - rows_before
        result["rss_mb"] = rss_mb(target.pid)
        return result
    finally:
        target.stop()


def throughput(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    script = write_post_lua(workdir, body_bytes())
    kinds = [k for k in ("bare", "sqlite", "comfyd") if k in args.only]
    results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    print(f"\n== Part 1: intake throughput — wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
          f"(+{args.warmup:g}s warm-up), {args.rounds} round(s), body {len(body_bytes())} bytes")
    for round_no in range(1, args.rounds + 1):
        for kind in kinds:
            target = (ComfydTarget(workdir, round_no, args) if kind == "comfyd" else ReferenceServer(kind, workdir))
            profile_dir = Path(args.profile) if args.profile and kind == "comfyd" and round_no == 1 else None
            r = measure_one(target, script, args, profile_dir)
            results[kind].append(r)
            extra = f" {r.get('requests', 0)} answered, {r['rows']} rows committed" if "rows" in r else ""
            print(f"  round {round_no} {kind:6s}: {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms"
                  f"  server CPU {r['server_cpu'] * 100:3.0f}% = {r['cpu_us_per_req']:4.0f} µs/req  load {r['loadavg1']:.1f}"
                  f"  non-2xx {r['non2xx']}  {r['socket_errors']}{extra}",
                  flush=True)
    print("\n  summary (median of rounds, min–max):")
    for kind in kinds:
        rs = results[kind]
        print(f"  {LABELS[kind]:38s} req/s {spread([r['rps'] for r in rs], '{:.0f}')}; "
              f"p50 {spread([r['p50'] for r in rs], '{:.2f}')} ms; p99 {spread([r['p99'] for r in rs], '{:.2f}')} ms; "
              f"server CPU {median([r['server_cpu'] for r in rs]) * 100:.0f}%; "
              f"CPU per request {spread([r['cpu_us_per_req'] for r in rs], '{:.0f}')} µs")
    if "bare" in results and "comfyd" in results:
        ratios = [c["rps"] / b["rps"] for b, c in zip(results["bare"], results["comfyd"])]
        print(f"  comfyd / bare per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {median(ratios):.2f} "
              f"(target ≥ 0.60: {'met' if median(ratios) >= 0.60 else 'MISSED'})")
        cpu = [c["cpu_us_per_req"] / b["cpu_us_per_req"] for b, c in zip(results["bare"], results["comfyd"])]
        print(f"  comfyd / bare in server CPU per request: median {median(cpu):.1f}× (the contention-proof view: "
              f"at equal CPU, comfyd would reach {1 / median(cpu):.2f} of bare)")
    if "sqlite" in results and "comfyd" in results:
        ratios = [c["rps"] / s["rps"] for s, c in zip(results["sqlite"], results["comfyd"])]
        print(f"  comfyd / sqlite reference: median {median(ratios):.2f}")
    return results


def start_profile(pid: int, directory: Path, duration: float) -> subprocess.Popen[bytes]:
    spy = VENV_BIN / "py-spy"
    if not spy.exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"  profiling comfyd pid {pid} with py-spy into {directory}/intake.txt (collapsed stacks: load it in "
          "speedscope.app or flamegraph.pl)", flush=True)
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "250",
                             "--threads", "--format", "raw", "--output", str(directory / "intake.txt"),
                             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# =========================================================================================================
# Part 2: 100k queued
# =========================================================================================================
class Client:
    """A keep-alive HTTP/1.1 connection, one request at a time (latency as one client sees it)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, float]:
        t0 = time.perf_counter()
        self.conn.request(method, path, body=body, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        elapsed = (time.perf_counter() - t0) * 1000
        return response.status, json.loads(data) if data else None, elapsed

    def close(self) -> None:
        self.conn.close()


def latency_probe(port: int, n: int, cancel_ids: list[str], status_ids: list[str]) -> dict[str, list[float]]:
    """n submits, n status reads of ``status_ids`` (or of the new jobs), n cancels of ``cancel_ids`` (or of the
    new jobs). Returns milliseconds per kind."""
    client = Client(port)
    body = body_bytes()
    out: dict[str, list[float]] = {"submit": [], "status": [], "cancel": []}
    new_ids = []
    try:
        for _ in range(n):
            code, data, ms = client.request("POST", SUBMIT, body)
            assert code == 202, (code, data)
            new_ids.append(data["workflowId"])
            out["submit"].append(ms)
        for workflow_id in (status_ids or new_ids)[:n]:
            code, data, ms = client.request("GET", f"{SUBMIT}/{workflow_id}")
            assert code == 200 and data["status"] == "queued", (code, data)
            out["status"].append(ms)
        for workflow_id in (cancel_ids or new_ids)[:n]:
            code, data, ms = client.request("DELETE", f"{SUBMIT}/{workflow_id}")
            assert code == 200 and data["status"] == "cancelled", (code, data)
            out["cancel"].append(ms)
    finally:
        client.close()
    out["_new_ids"] = new_ids  # type: ignore[assignment]
    return out


async def fill(url: str, count: int, concurrency: int) -> tuple[list[str], float]:
    import aiohttp

    body = body_bytes()
    ids: list[str] = []
    remaining = iter(range(count))
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    t0 = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in remaining:
            for attempt in range(20):
                async with session.post(url + SUBMIT, data=body, headers=headers) as response:
                    data = await response.read()
                    if response.status == 202:
                        ids.append(json.loads(data)["workflowId"])
                        break
                    if response.status != 503:
                        raise RuntimeError(f"submit answered {response.status}: {data[:200]!r}")
                await asyncio.sleep(0.05 * (attempt + 1))
            if len(ids) % 20000 == 0 and ids:
                print(f"    {len(ids)} queued ({len(ids) / (time.perf_counter() - t0):.0f}/s)", flush=True)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ids, time.perf_counter() - t0


def fmt_lat(values: list[float]) -> str:
    return f"p50 {percentile(values, 50):6.2f} ms  p99 {percentile(values, 99):6.2f} ms  (n={len(values)})"


def restart_to_ready(serve: ComfydServe, sig: int, expected: int) -> dict[str, float]:
    t_sig = time.monotonic()
    serve.signal(sig)
    code = serve.wait_exit(120)
    t_exit = time.monotonic()
    t_spawn = serve.start(wait=False)
    t_health = serve.wait_ready(120)
    recovered = None
    deadline = time.monotonic() + 10
    while recovered is None and time.monotonic() < deadline:
        recovered = serve.find_log("scheduler_recovered")
        if recovered is None:
            time.sleep(0.01)
    if recovered is None:
        raise RuntimeError("no scheduler_recovered line in the log")
    if recovered.get("queued") != expected:
        raise RuntimeError(f"recovered queued={recovered.get('queued')}, expected {expected}")
    # when it was logged, from the line's own ISO timestamp (UTC) relative to the spawn's wall clock
    started_wall = time.time() - (time.monotonic() - t_spawn)
    from datetime import datetime
    logged = datetime.fromisoformat(recovered["timestamp"]).timestamp()
    return {"stop_s": t_exit - t_sig, "exit_code": code, "ready_s": t_health - t_spawn,
            "recovered_s": logged - started_wall, "rss_mb": rss_mb(serve.pid)}


def queued_100k(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.queued
    print(f"\n== Part 2: {n:,} queued jobs in one comfyd")
    serve = ComfydServe(workdir / "comfyd-100k", NOWHERE, toml=COMFYD_TOML, env=comfyd_env(args),
                        source=Path(args.source) if args.source else None)
    serve.start()
    out: dict[str, Any] = {}
    try:
        out["rss_empty_mb"] = rss_mb(serve.pid)
        small = latency_probe(serve.port, args.latency_requests, [], [])
        print(f"  empty queue   submit {fmt_lat(small['submit'])}")
        print(f"                status {fmt_lat(small['status'])}")
        print(f"                cancel {fmt_lat(small['cancel'])}")
        out["latency_empty"] = {k: v for k, v in small.items() if not k.startswith("_")}
        print(f"  filling to {n:,} over HTTP ({args.fill_concurrency} concurrent clients)...", flush=True)
        ids, took = asyncio.run(fill(serve.url, n, args.fill_concurrency))
        out["fill_rate"] = n / took
        time.sleep(1.0)
        out["rss_100k_mb"] = rss_mb(serve.pid)
        status = json.loads(__import__("urllib.request").request.urlopen(serve.url + "/health").read())
        print(f"  filled in {took:.1f} s ({n / took:.0f}/s); /health says queued={status['queued']}; "
              f"RSS {out['rss_empty_mb']:.0f} MB empty → {out['rss_100k_mb']:.0f} MB with {n:,} queued "
              f"(target ≤ 300 MB: {'met' if out['rss_100k_mb'] <= 300 else 'MISSED'})", flush=True)
        rng = random.Random(7)
        sample = rng.sample(ids, min(len(ids), 2 * args.latency_requests))
        status_ids, cancel_ids = sample[:args.latency_requests], sample[args.latency_requests:]
        big = latency_probe(serve.port, args.latency_requests, cancel_ids, status_ids)
        print(f"  at {n // 1000}k queued  submit {fmt_lat(big['submit'])}")
        print(f"                status {fmt_lat(big['status'])}  (random jobs across the queue)")
        print(f"                cancel {fmt_lat(big['cancel'])}  (random jobs across the queue)")
        out["latency_100k"] = {k: v for k, v in big.items() if not k.startswith("_")}
        expected = n  # n - cancelled random ones + the probe's new ones
        assert len(cancel_ids) == len(big["_new_ids"])  # type: ignore[arg-type]
        restarts: dict[str, list[dict[str, float]]] = {"SIGTERM": [], "SIGKILL": []}
        for round_no in range(args.restart_rounds):
            for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL)):
                r = restart_to_ready(serve, sig, expected)
                restarts[name].append(r)
                print(f"  restart {round_no + 1} after {name}: stop {r['stop_s']:.2f} s (exit {r['exit_code']}); "
                      f"spawn → scheduler_recovered(queued={expected}) {r['recovered_s']:.2f} s, → /health 200 "
                      f"{r['ready_s']:.2f} s; RSS {r['rss_mb']:.0f} MB", flush=True)
        out["restarts"] = restarts
        for name, rs in restarts.items():
            ready = [r["ready_s"] for r in rs]
            print(f"  restart-to-ready after {name}: {spread(ready, '{:.2f}')} s "
                  f"(target ≤ 5 s: {'met' if max(ready) <= 5 else 'MISSED'}); RSS after recovery "
                  f"{spread([r['rss_mb'] for r in rs], '{:.0f}')} MB")
    finally:
        serve.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of wrk warm-up per server (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk threads (default 1: two cores are shared with the server)")
    parser.add_argument("--only", default="bare,sqlite,comfyd", help="servers to run (default bare,sqlite,comfyd)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-100k", action="store_true")
    parser.add_argument("--queued", type=int, default=100_000, help="jobs to queue in part 2 (default 100000)")
    parser.add_argument("--fill-concurrency", type=int, default=64)
    parser.add_argument("--latency-requests", type=int, default=300, help="requests per kind in the probes")
    parser.add_argument("--restart-rounds", type=int, default=3)
    parser.add_argument("--profile", metavar="DIR", help="py-spy record comfyd during round 1's measured run")
    parser.add_argument("--source", metavar="DIR",
                        help="run comfyd from this source tree instead of the installed one (to compare a patch)")
    parser.add_argument("--comfyd-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for comfyd, e.g. COMFYD_LOG_LEVEL=warning (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--serve", choices=("bare", "sqlite"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_reference(args.serve, args.port, args.db)
        return
    install_cleanup()
    args.only = {s.strip() for s in args.only.split(",")}
    if not args.skip_throughput and not have_wrk():
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    print_machine()
    workdir = Path(tempfile.mkdtemp(prefix="comfyd-bench-intake-"))
    try:
        if not args.skip_throughput:
            throughput(args, workdir)
        if not args.skip_100k:
            queued_100k(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
