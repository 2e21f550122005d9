#!/usr/bin/env python3
"""Benchmark: WebSocket fan-out — 1,000 stream clients, 100 events/s, delivery latency.

Layout (three kinds of process, so the server's event loop is nobody else's):

  this process   comfyd in-process (Service + the aiohttp app on a loopback port), with two hooks on the
                 Broadcaster class: the wall-clock time each event was handed to ``Broadcaster.publish`` (the
                 moment the broadcaster got it) and when its mailbox handed it to ``handle``;
  stand-in       the test suite's stand-in ComfyUI (tests/comfyui_standin) in its own process;
  clients        N WebSocket clients (aiohttp ClientSession, TCPConnector(limit=0)), subscribed to everything,
                 in ``--client-procs`` processes; each records its own receive time per message.

Event source (``--source``):

  standin (default)  jobs of the stand-in's StandInSleep node (``seconds``/``steps``): the stand-in sends
                     progress frames, comfyd's executor folds them, the scheduler commits each progress and then
                     publishes ``workflow:progress`` — the whole pipeline, ``steps/seconds`` events per second
                     (one job runs at a time; the next one already waits inside the stand-in);
  direct             a task in comfyd's loop publishes ``workflow:progress`` events straight into the
                     broadcaster at exactly ``--rate`` per second (the fan-out alone).

Per event and client: latency = client receive time − time the broadcaster got the event (same machine, same
clock). Printed: events/s generated and delivered, p50/p99/max, deliveries missing, clients dropped as too
slow, the server's CPU, its event-loop lag, and the clients' CPU. Target: p99 ≤ 100 ms at 1,000 clients and
100 events/s.

    .venv/bin/python scripts/bench_fanout.py                       # 1,000 clients, stand-in, 20 s
    .venv/bin/python scripts/bench_fanout.py --clients 250,500,1000 --source direct
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_common import (
    API_KEY,
    install_cleanup,
    median,
    percentile,
    print_breakdown,
    print_machine,
    raise_nofile,
)


# =========================================================================================================
# Client processes
# =========================================================================================================
def client_main(conn: Any, url: str, count: int, compress: int, kind: str = "aiohttp") -> None:
    raise_nofile()
    asyncio.run(_clients(conn, url, count, compress) if kind == "aiohttp" else _raw_clients(conn, url, count))


class _RawWebSocket(asyncio.Protocol):
    """A minimal WebSocket client reader (RFC 6455 server frames: unmasked, uncompressed): a cheaper client
    than aiohttp's, so that on a small machine the clients do not eat the server's CPU. One receive time per
    read() covers every frame that came in it."""

    def __init__(self, table: dict[bytes, int], idx: array.array, times: array.array) -> None:
        self.table, self.idx, self.times = table, idx, times
        self.buffer = b""
        self.handshake = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = time.time()
        buf = self.buffer + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.handshake.set_exception(RuntimeError(buf[:200].decode(errors="replace")))
                return
            self.upgraded = True
            self.handshake.set_result(None)
            buf = buf[end + 4:]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, n = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if size - pos < head + n:
                break
            payload = buf[pos + head:pos + head + n]
            pos += head + n
            if opcode == 1:
                k = self.table.get(payload)
                if k is None:
                    k = self.table[payload] = len(self.table)
                self.idx.append(k)
                self.times.append(t)
            elif opcode == 9 and self.transport is not None:  # ping: answer with a masked pong
                mask = os.urandom(4)
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + mask
                                     + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.buffer = buf[pos:]


async def _raw_clients(conn: Any, url: str, count: int) -> None:
    import base64

    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    table: dict[bytes, int] = {}
    got_idx = [array.array("I") for _ in range(count)]
    got_t = [array.array("d") for _ in range(count)]
    gate = asyncio.Semaphore(64)

    async def connect(i: int) -> _RawWebSocket:
        async with gate:
            transport, proto = await loop.create_connection(lambda: _RawWebSocket(table, got_idx[i], got_t[i]),
                                                            host, int(port))
            key = base64.b64encode(os.urandom(16)).decode()
            transport.write((f"GET /v1/comfyui/stream HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                             f"X-API-Key: {API_KEY}\r\n\r\n").encode())
            await proto.handshake
            return proto

    protos = await asyncio.gather(*(connect(i) for i in range(count)))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(("ready", count))
    command = asyncio.Event()
    loop.add_reader(conn.fileno(), command.set)
    await command.wait()
    loop.remove_reader(conn.fileno())
    _, published = conn.recv()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for proto in protos:
        if proto.transport is not None:
            proto.transport.close()
    published_b = {text.encode(): t for text, t in published.items()}
    pub_by_idx = {k: published_b[payload] for payload, k in table.items() if payload in published_b}
    latencies = array.array("d")
    delivered = []
    for idx, times in zip(got_idx, got_t):
        n = 0
        for k, t in zip(idx, times):
            pub = pub_by_idx.get(k)
            if pub is not None:
                latencies.append((t - pub) * 1000)
                n += 1
        delivered.append(n)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    conn.send(("result", latencies.tobytes(), delivered, [p.close_code for p in protos], cpu))


async def _clients(conn: Any, url: str, count: int, compress: int) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    session = aiohttp.ClientSession(headers={"X-API-Key": API_KEY}, connector=aiohttp.TCPConnector(limit=0))
    gate = asyncio.Semaphore(64)

    async def connect() -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await session.ws_connect(url + "/v1/comfyui/stream", max_msg_size=0, compress=compress)

    sockets = await asyncio.gather(*(connect() for _ in range(count)))
    table: dict[str, int] = {}  # every client gets the same bytes per event: intern them
    got_idx = [array.array("I") for _ in sockets]
    got_t = [array.array("d") for _ in sockets]
    close_codes: list[int | None] = [None] * count

    async def reader(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        idx, times, get, now = got_idx[i], got_t[i], table.get, time.time
        while True:
            message = await ws.receive()
            t = now()
            if message.type is aiohttp.WSMsgType.TEXT:
                k = get(message.data)
                if k is None:
                    k = table[message.data] = len(table)
                idx.append(k)
                times.append(t)
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):
                close_codes[i] = ws.close_code
                return

    readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(sockets)]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(("ready", count))
    command = asyncio.Event()
    loop.add_reader(conn.fileno(), command.set)
    await command.wait()
    loop.remove_reader(conn.fileno())
    _, published = conn.recv()  # {event text: broadcaster time} for the events of the window
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    await session.close()
    pub_by_idx = {k: published[text] for text, k in table.items() if text in published}
    latencies = array.array("d")
    delivered = []
    for idx, times in zip(got_idx, got_t):
        n = 0
        for k, t in zip(idx, times):
            pub = pub_by_idx.get(k)
            if pub is not None:
                latencies.append((t - pub) * 1000)
                n += 1
        delivered.append(n)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    conn.send(("result", latencies.tobytes(), delivered, close_codes, cpu))


# =========================================================================================================
# The stand-in ComfyUI process
# =========================================================================================================
def standin_main(conn: Any, root: str) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.comfyui_standin import StandInComfyUI

    async def run() -> None:
        standin = StandInComfyUI(root, node_time=0.002)
        await standin.start()
        conn.send(standin.port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(conn.fileno(), stop.set)
        await stop.wait()
        await standin.stop()

    asyncio.run(run())


# =========================================================================================================
# comfyd in this process, with the broadcaster hooks
# =========================================================================================================
PUBLISHED: dict[bytes, float] = {}  # encoded event -> wall time Broadcaster.publish got it
HANDLED: dict[bytes, float] = {}  # encoded event -> wall time the broadcaster's loop handled it


def install_hooks() -> None:
    from comfyd import events
    from comfyd.actors import broadcaster as module

    publish, handle = module.Broadcaster.publish, module.Broadcaster.handle

    def hooked_publish(self: Any, event: Any) -> None:
        PUBLISHED.setdefault(events.encoder.encode(event), time.time())
        publish(self, event)

    async def hooked_handle(self: Any, message: Any) -> Any:
        if isinstance(message, module.Publish):
            HANDLED.setdefault(events.encoder.encode(message.event), time.time())
        return await handle(self, message)

    module.Broadcaster.publish = hooked_publish  # type: ignore[method-assign]
    module.Broadcaster.handle = hooked_handle  # type: ignore[method-assign]


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.01)
        lags.append((loop.time() - t - 0.01) * 1000)


async def run_case(args: argparse.Namespace, clients: int, workdir: Path) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from comfyd.config import BackendConfig, load_config
    from comfyd.messages import CancelJob
    from comfyd.service import Service
    from comfyd.web.app import create_app

    PUBLISHED.clear()
    HANDLED.clear()
    ctx = mp.get_context("spawn")
    case_dir = workdir / f"case-{clients}-{args.source}"
    standin_proc = None
    standin_conn = None
    if args.source == "standin":
        standin_conn, child = ctx.Pipe()
        standin_proc = ctx.Process(target=standin_main, args=(child, str(case_dir / "comfyui")), daemon=True)
        standin_proc.start()
        standin_port = standin_conn.recv()
        backend_url = f"http://127.0.0.1:{standin_port}"
    else:
        backend_url = "http://127.0.0.1:9"  # nothing runs: the events are published directly
    config = load_config(None, env={"MANAGEMENT_API_KEY": API_KEY},
                         overrides={"data_dir": str(case_dir / "data")})
    config.backends = [BackendConfig(url=backend_url, name="gpu0", gpu=0)]
    config.paths.outputs = str(case_dir / "comfyui" / "output")
    config.scheduler.backend_wait = 86400.0
    config.scheduler.progress_interval = 0.0  # every step's progress is an event: ~100 events/s from one job
    service = Service(config)
    await service.start()
    runner = web.AppRunner(create_app(service), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    procs, pipes = [], []
    result: dict[str, Any] = {"clients": clients, "source": args.source}
    try:
        if args.source == "standin":  # the backend must be up before jobs are submitted
            deadline = time.monotonic() + 30
            while not all(e.up for e in service.executors.values()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the stand-in backend never came up")
                await asyncio.sleep(0.05)
        per_proc = [clients // args.client_procs + (1 if i < clients % args.client_procs else 0)
                    for i in range(args.client_procs)]
        for n in per_proc:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(child, url, n, 15 if args.compress else 0, args.client_kind),
                               daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        loop = asyncio.get_running_loop()
        for pipe in pipes:  # wait for every client to be connected (without blocking comfyd's loop)
            await loop.run_in_executor(None, pipe.recv)
        if len(service.broadcaster.clients) != clients:
            raise RuntimeError(f"{len(service.broadcaster.clients)} clients registered, wanted {clients}")
        await asyncio.sleep(1.0)
        stop_lag = asyncio.Event()
        lags: list[float] = []
        lag_task = asyncio.create_task(loop_lag(stop_lag, lags))
        generator = None
        ids: list[str] = []
        if args.source == "standin":
            jobs = math.ceil((args.duration + 3) / args.seconds) + 1
            http = aiohttp.ClientSession(headers={"X-API-Key": API_KEY})
            steps = round(args.rate * args.seconds)
            for _ in range(jobs):
                async with http.post(url + "/v1/comfyui/workflow", json={"workflow": {
                        "1": {"class_type": "StandInSleep", "inputs": {"seconds": args.seconds, "steps": steps}}}}) as r:
                    assert r.status == 202, await r.text()
                    ids.append((await r.json())["workflowId"])
            await http.close()
            await asyncio.sleep(1.0)  # the first job is running
        else:
            generator = asyncio.create_task(direct(service, args.rate, args.duration + 3))
        spy = None
        if args.profile:
            spy = start_profile(Path(args.profile) / f"fanout-{clients}-{args.source}.txt", args.duration)
        t_start = time.time()
        cpu0 = os.times()
        await asyncio.sleep(args.duration)
        t_end = time.time()
        cpu1 = os.times()
        stop_lag.set()
        await lag_task
        if spy is not None:
            await loop.run_in_executor(None, spy.wait)
        await asyncio.sleep(args.settle)  # let deliveries of the window's last events arrive
        window = {k.decode(): t for k, t in PUBLISHED.items() if t_start <= t < t_end}
        mailbox_wait = [(HANDLED[k] - t) * 1000 for k, t in PUBLISHED.items() if t_start <= t < t_end and k in HANDLED]
        dropped_by_server = service.metrics.ws_disconnected_slow._value.get()
        for pipe in pipes:
            pipe.send(("stop", window))
        latencies = array.array("d")
        delivered: list[int] = []
        codes: list[int | None] = []
        client_cpu = 0.0
        for pipe in pipes:
            _, raw, got, close_codes, cpu = await loop.run_in_executor(None, pipe.recv)
            latencies.frombytes(raw)
            delivered += got
            codes += close_codes
            client_cpu += cpu
        if generator is not None:
            generator.cancel()
        lat = sorted(latencies)
        seconds = t_end - t_start
        expected = len(window) * clients
        result.update({
            "events": len(window), "events_per_s": len(window) / seconds,
            "deliveries": len(lat), "expected": expected, "delivered_per_s": len(lat) / seconds,
            "p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
            "max": lat[-1] if lat else float("nan"),
            "mailbox_p50": percentile(mailbox_wait, 50), "mailbox_p99": percentile(mailbox_wait, 99),
            "dropped": int(dropped_by_server), "closed_1013": sum(1 for c in codes if c == 1013),
            "server_cpu": ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / seconds,
            "client_cpu": client_cpu / seconds,
            "lag_p50": percentile(lags, 50), "lag_p99": percentile(lags, 99), "lag_max": max(lags) if lags else 0,
        })
        for workflow_id in ids:  # stop the remaining jobs so the case ends quickly
            with contextlib.suppress(Exception):  # already ended: nothing to cancel
                await service.scheduler.ask(CancelJob(workflow_id=workflow_id), 5)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        await service.broadcaster.stop(5)
        await runner.cleanup()
        await service.stop()
        if standin_proc is not None and standin_conn is not None:
            standin_conn.send("stop")
            standin_proc.join(10)
            if standin_proc.is_alive():
                standin_proc.kill()
    return result


async def direct(service: Any, rate: float, seconds: float) -> None:
    """Publish workflow:progress events into the broadcaster at ``rate`` per second, open loop: every event
    that is due is published, in a burst if the loop was busy, so a saturated server cannot slow the source."""
    from comfyd import events

    loop = asyncio.get_running_loop()
    start = loop.time()
    workflow_id = "00000000-0000-4000-8000-000000000000"
    i = 0
    while loop.time() - start < seconds:
        due = int((loop.time() - start) * rate) + 1
        while i < due:
            i += 1
            service.broadcaster.publish(events.WorkflowProgress(
                workflowId=workflow_id, timestamp=events.now_ms(), progress=round((i % 1000) / 10, 1),
                currentNode=f"step {i}"))
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))


FANOUT_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("per-client writer: backlog() check (TIOCOUTQ ioctl + buffer size)", ("StreamClient.backlog",)),
    ("per-client writer: permessage-deflate (zlib, per client)", ("zlib", "compress", "ZLibBackend")),
    ("per-client writer: aiohttp send_frame → transport.write (send syscall)", ("send_frame", "WebSocketWriter")),
    ("per-client writer: queue.get + task wake-up", ("StreamClient.write_loop", "asyncio/queues.py")),
    ("broadcaster: encode once + offer to every client queue", ("comfyd/actors/broadcaster.py",)),
    ("scheduler/executor/commit (progress pipeline)", ("comfyd/actors/scheduler.py", "comfyd/actors/executor.py",
                                                       "comfyd/store/", "aiosqlite/", "comfyd/comfy/")),
    ("logging", ("structlog/", "logging/__init__")),
    ("benchmark hooks, generator, lag probe", ("hooked_publish", "hooked_handle", "direct (", "loop_lag")),
    ("epoll wait", ("EpollSelector.select",)),
]


def start_profile(path: Path, duration: float) -> Any:
    import subprocess

    spy = ROOT / ".venv" / "bin" / "py-spy"
    if not spy.exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"  py-spy → {path}", flush=True)
    return subprocess.Popen([str(spy), "record", "--pid", str(os.getpid()), "--duration", str(int(duration)),
                             "--rate", "250", "--threads", "--format", "raw", "--output", str(path), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def show(r: dict[str, Any]) -> None:
    missing = r["expected"] - r["deliveries"]
    print(f"  {r['clients']:5d} clients, {r['source']:7s}: {r['events_per_s']:6.1f} events/s → "
          f"{r['delivered_per_s']:9.0f} deliveries/s; latency p50 {r['p50']:7.1f} ms  p90 {r['p90']:7.1f} ms  "
          f"p99 {r['p99']:7.1f} ms  max {r['max']:7.1f} ms", flush=True)
    print(f"        missing {missing} of {r['expected']} deliveries; dropped as too slow {r['dropped']} "
          f"(1013 closes seen {r['closed_1013']}); broadcaster mailbox wait p50 {r['mailbox_p50']:.2f} / p99 "
          f"{r['mailbox_p99']:.2f} ms; server CPU {r['server_cpu'] * 100:.0f}%, loop lag p50 {r['lag_p50']:.1f} / "
          f"p99 {r['lag_p99']:.1f} / max {r['lag_max']:.0f} ms; clients' CPU {r['client_cpu'] * 100:.0f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000", help="comma-separated client counts (default 1000)")
    parser.add_argument("--source", choices=("standin", "direct"), default="standin")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second (default 100)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="standin: length of one StandInSleep job (steps = rate × seconds); default 5")
    parser.add_argument("--duration", type=float, default=20.0, help="measured window in seconds (default 20)")
    parser.add_argument("--settle", type=float, default=3.0, help="wait after the window for late deliveries")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count (default 3)")
    parser.add_argument("--source-tree", metavar="DIR", help="import comfyd from this source tree (to compare a patch)")
    parser.add_argument("--client-kind", choices=("aiohttp", "raw"), default="aiohttp",
                        help="aiohttp ClientSession clients (default), or minimal raw-socket readers that cost the "
                             "machine far less CPU per message (a cross-check of the server alone)")
    parser.add_argument("--compress", action="store_true",
                        help="clients offer permessage-deflate, as browsers do (comfyd then compresses per client)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the server during each window")
    parser.add_argument("--one-case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.source_tree:  # compare a patched copy of comfyd (this process imports it; clients do not)
        sys.path.insert(0, str(Path(args.source_tree).resolve()))
    install_cleanup()
    raise_nofile()
    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger().setLevel(logging.WARNING)
    install_hooks()
    if not args.one_case:
        print_machine()
        import comfyd
        print(f"comfyd from {Path(comfyd.__file__).parent}")
        print(f"fan-out: source={args.source}, {args.rate:g} events/s, {args.duration:g} s window, "
              f"{args.client_procs} {args.client_kind} client process(es), {args.rounds} round(s), "
              f"permessage-deflate {'offered (browser-like)' if args.compress else 'not offered'}; "
              "each case runs in a fresh interpreter")
    if args.one_case:  # a child: one case, its result as JSON on the last line
        workdir = Path(tempfile.mkdtemp(prefix="comfyd-bench-fanout-"))
        try:
            result = asyncio.run(run_case(args, int(args.clients), workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results: dict[int, list[dict[str, Any]]] = {}
    for clients in (int(c) for c in args.clients.split(",")):
        for _ in range(args.rounds):
            r = one_case(clients)
            results.setdefault(clients, []).append(r)
            show(r)
            if args.profile:
                print_breakdown(Path(args.profile) / f"fanout-{clients}-{args.source}.txt", FANOUT_RULES, 250,
                                args.duration)
    print("\n  summary (median of rounds; min–max):")
    for clients, rs in results.items():
        p99 = [r["p99"] for r in rs]
        print(f"  {clients:5d} clients: p50 {median([r['p50'] for r in rs]):.1f} ms, p99 {median(p99):.1f} ms "
              f"({min(p99):.1f}–{max(p99):.1f}; rounds {', '.join(f'{x:.0f}' for x in p99)}), events/s "
              f"{median([r['events_per_s'] for r in rs]):.1f}, deliveries/s "
              f"{median([r['delivered_per_s'] for r in rs]):.0f}, dropped {sum(r['dropped'] for r in rs)}; "
              f"target p99 ≤ 100 ms: {'met' if median(p99) <= 100 and not any(r['dropped'] for r in rs) else 'MISSED'}")


def one_case(clients: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter (nothing left over from the previous case), same options."""
    import subprocess

    argv = list(sys.argv[1:])
    if "--clients" in argv:
        i = argv.index("--clients")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--clients=")]
    out = subprocess.run([sys.executable, __file__, *argv, "--clients", str(clients), "--one-case"],
                         capture_output=True, text=True, check=False, timeout=900)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the case failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


if __name__ == "__main__":
    main()
