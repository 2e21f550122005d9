#!/usr/bin/env python3
"""Benchmark: comfyd against a bare client, on a REAL ComfyUI — what does comfyd cost per job?

Starts a real ComfyUI on a free loopback port (``/work/comfyui-real/start.sh PORT``; stopped again with
``stop.sh PORT`` at the end), and runs N quick jobs (tests/workflows/quick.json; input "1".color different for
every job of the whole run so ComfyUI's cache never answers; every job saves under its own subfolder, as
comfyd's ``<workflowId>/`` prefix does) three ways per round:

  comfyd    through ``comfyd serve`` (subprocess; COMFYUI_API_URL = that ComfyUI, COMFYUI_OUTPUTS = its output
            folder): submit all N over REST (8 in flight), wait until the stream has delivered N
            ``workflow:completed``;
  all       straight into ComfyUI, all N posted at once (POST /prompt), wait for the last
            ``executing {node: null}`` on its WebSocket;
  bare1+1   a bare client that keeps one prompt running and one waiting inside ComfyUI (POST /prompt + one
            WebSocket; the next is posted when one ends) — comfyd's own dispatch policy, without comfyd.

Printed per mode: total seconds, jobs/s (median of rounds, min–max), comfyd/bare1+1 (target ≤ 1.05) and
comfyd/all. From ComfyUI's own timestamps (``GET /history``: status.messages ``execution_start`` and
``execution_success``, epoch ms) the idle gap between one prompt's success and the next one's start, median
and p95, per mode, and the execution time per prompt.

    .venv/bin/python scripts/bench_vs_bare.py [--jobs 200] [--rounds 5] [--comfyui /work/comfyui-real]

The outputs it made (its own subfolders of ComfyUI's output folder) are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    API_KEY,
    QUICK,
    VENV_BIN,
    ComfydServe,
    cpu_seconds,
    free_port,
    install_cleanup,
    median,
    percentile,
    print_breakdown,
    print_machine,
    spread,
)

VS_BARE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("logging (structlog → stdlib → JSON → stdout)", ("structlog/", "logging/__init__")),
    ("SQLite (aiosqlite hand-offs, group commit, reads)", ("aiosqlite/", "comfyd/store/")),
    ("outputs: collect, stat, hash (comfyd/outputs)", ("comfyd/outputs/",)),
    ("executor: ComfyUI frames, tracker, outcome", ("comfyd/actors/executor", "comfyd/comfy/")),
    ("scheduler: transitions, dispatch, gauges", ("comfyd/actors/scheduler.py", "comfyd/actors/pending.py")),
    ("broadcaster + stream to the client", ("comfyd/actors/broadcaster.py", "comfyd/web/stream.py")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("REST intake (submit handler, middlewares)", ("comfyd/web/",)),
    ("aiohttp client (HTTP to ComfyUI, WebSocket reader)", ("aiohttp/client", "aiohttp/_websocket", "aiohttp/connector",
                                                           "aiohttp/streams")),
    ("actor runtime", ("comfyd/actors/base.py",)),
    ("epoll wait", ("EpollSelector.select",)),
]

TERMINAL = {"workflow:completed", "workflow:error", "workflow:cancelled"}


class Run:
    """Job graphs with a color never used before in this run, each saving under its own subfolder."""

    def __init__(self, run_id: str, seed: int, size: int | None = None) -> None:
        self.base = json.loads(QUICK.read_text())
        if size:  # a longer job: a bigger image to make, invert and save as PNG
            self.base["1"]["inputs"]["width"] = self.base["1"]["inputs"]["height"] = size
        self.run_id = run_id
        self.color = random.Random(seed).randrange(0, 0x7FFFFF)
        self.n = 0

    def graph(self, mode: str, *, own_prefix: bool) -> dict[str, Any]:
        self.n += 1
        graph = json.loads(json.dumps(self.base))
        graph["1"]["inputs"]["color"] = (self.color + self.n) % 0xFFFFFF
        if own_prefix:  # comfyd puts <workflowId>/ in front by itself
            graph["3"]["inputs"]["filename_prefix"] = f"comfyd-bench-vs-bare/{self.run_id}/{mode}-{self.n}/peer_quick"
        return graph


# -- straight into ComfyUI ------------------------------------------------------------------------------------
LAST_RUN: dict[str, float] = {}  # wall-clock ms of the last run's start and end (ComfyUI's history is in epoch ms)


async def bare(comfy: str, run: Run, jobs: int, *, window: int | None) -> tuple[float, list[str]]:
    """window=None: post all at once; window=k: keep k prompts inside ComfyUI (1 running + k-1 waiting)."""
    import aiohttp

    client_id = f"bench-{uuid.uuid4().hex[:8]}"
    mode = "all" if window is None else "bare1+1"
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{comfy}/ws?clientId={client_id}",
                                                                  max_msg_size=0) as ws:
            ours: set[str] = set()
            order: list[str] = []
            done = 0
            posted = 0
            pending_posts: set[asyncio.Task[None]] = set()

            async def post() -> None:
                body = {"prompt": run.graph(mode, own_prefix=True), "client_id": client_id}
                async with http.post(f"{comfy}/prompt", json=body) as response:
                    data = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"ComfyUI refused a prompt: {data}")
                    ours.add(data["prompt_id"])
                    order.append(data["prompt_id"])

            def launch() -> None:
                nonlocal posted
                posted += 1
                task = asyncio.create_task(post())
                pending_posts.add(task)
                task.add_done_callback(pending_posts.discard)

            t0, LAST_RUN["t0_ms"] = time.perf_counter(), time.time() * 1000
            for _ in range(jobs if window is None else min(window, jobs)):
                launch()
            finished: set[str] = set()
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                if event["type"] == "executing" and event["data"].get("node") is None:
                    prompt_id = event["data"].get("prompt_id")
                    if prompt_id in finished:
                        continue
                    if prompt_id not in ours:  # the POST's answer may come after the end: wait for it
                        await asyncio.gather(*pending_posts)
                        if prompt_id not in ours:
                            continue
                    finished.add(prompt_id)
                    done += 1
                    if done == jobs:
                        break
                    if window is not None and posted < jobs:
                        launch()
            elapsed, LAST_RUN["t1_ms"] = time.perf_counter() - t0, time.time() * 1000
    return elapsed, order


# -- through comfyd -------------------------------------------------------------------------------------------
async def via_comfyd(url: str, run: Run, jobs: int, concurrency: int) -> tuple[float, list[str], int]:
    import aiohttp

    headers = {"X-API-Key": API_KEY}
    async with aiohttp.ClientSession(headers=headers) as http, http.ws_connect(url + "/v1/comfyui/stream",
                                                                               max_msg_size=0) as ws:
            ids: set[str] = set()
            ended: dict[str, str] = {}  # every terminal event seen (an end may come before its 202 is read)
            all_done = asyncio.Event()
            submitted = False

            def check() -> None:
                if submitted and ids <= ended.keys():
                    all_done.set()

            slots = asyncio.Semaphore(concurrency)

            async def submit() -> None:
                async with slots, http.post(url + "/v1/comfyui/workflow", json={"workflow": run.graph("comfyd",
                                                                                             own_prefix=False)}) as r:
                    data = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"comfyd refused: {data}")
                    ids.add(data["workflowId"])

            async def read() -> None:
                async for message in ws:
                    event = json.loads(message.data)
                    if event.get("type") in TERMINAL:
                        ended[event["workflowId"]] = event["type"]
                        check()

            reader = asyncio.create_task(read())
            t0, LAST_RUN["t0_ms"] = time.perf_counter(), time.time() * 1000
            await asyncio.gather(*(submit() for _ in range(jobs)))
            submitted = True
            check()
            await all_done.wait()
            elapsed, LAST_RUN["t1_ms"] = time.perf_counter() - t0, time.time() * 1000
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    failed = sum(1 for i in ids if ended[i] != "workflow:completed")
    return elapsed, sorted(ids), failed


# -- ComfyUI's own timestamps -----------------------------------------------------------------------------------
async def history_gaps(comfy: str, prompt_ids: list[str], *, prefix_match: bool) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(50):  # /history lags the socket a little
            async with http.get(f"{comfy}/history", params={"max_items": str(len(prompt_ids) + 50)}) as r:
                history = await r.json()
            spans = []
            for prompt_id, entry in history.items():
                key = prompt_id.rsplit("-", 1)[0] if prefix_match else prompt_id
                if key not in prompt_ids:
                    continue
                messages = {m[0]: m[1] for m in entry["status"]["messages"]}
                if "execution_start" in messages and "execution_success" in messages:
                    spans.append((messages["execution_start"]["timestamp"], messages["execution_success"]["timestamp"]))
            if len(spans) >= len(prompt_ids):
                break
            await asyncio.sleep(0.1)
    spans.sort()
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    runs = [end - start for start, end in spans]
    return {"n": len(spans), "gap_p50": percentile(gaps, 50), "gap_p95": percentile(gaps, 95),
            "gap_max": max(gaps) if gaps else float("nan"), "gap_sum_s": sum(gaps) / 1000,
            "exec_p50": percentile(runs, 50), "busy_s": (spans[-1][1] - spans[0][0]) / 1000 if spans else 0,
            "lead_ms": spans[0][0] - LAST_RUN["t0_ms"] if spans else float("nan"),
            "tail_ms": LAST_RUN["t1_ms"] - spans[-1][1] if spans else float("nan")}


def _iso_ms(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp() * 1000


async def timeline(comfy: str, serve: ComfydServe, ids: list[str]) -> dict[str, float]:
    """Per job, from comfyd's log (µs) and ComfyUI's history (ms), same clock:
    end→completed: ComfyUI's execution_success → comfyd logs workflow_completed (history read, outputs
    collected and hashed, final state committed); turnaround: execution_success of job k-1 → comfyd dispatches
    job k+1 (the slot k-1 held is refilled; ComfyUI idles when this outlasts job k's own run)."""
    import aiohttp

    wanted = set(ids)
    dispatched: dict[str, float] = {}
    completed: dict[str, float] = {}
    queued: list[float] = []
    for line in serve.log_lines(since_start=False):
        workflow_id = line.get("workflow_id")
        if workflow_id not in wanted:
            continue
        if line.get("event") == "workflow_queued":
            queued.append(_iso_ms(line["timestamp"]))
        elif line.get("event") == "workflow_dispatched":
            dispatched.setdefault(workflow_id, _iso_ms(line["timestamp"]))
        elif line.get("event") == "workflow_completed":
            completed[workflow_id] = _iso_ms(line["timestamp"])
    async with aiohttp.ClientSession() as http, http.get(f"{comfy}/history",
                                                          params={"max_items": str(len(ids) + 50)}) as r:
        history = await r.json()
    spans: list[tuple[float, float, str]] = []
    for prompt_id, entry in history.items():
        workflow_id = prompt_id.rsplit("-", 1)[0]
        if workflow_id in wanted:
            messages = {m[0]: m[1] for m in entry["status"]["messages"]}
            if "execution_start" in messages and "execution_success" in messages:
                spans.append((messages["execution_start"]["timestamp"], messages["execution_success"]["timestamp"],
                              workflow_id))
    spans.sort()
    end_to_completed = [completed[w] - end for _, end, w in spans if w in completed]
    turnaround = [dispatched[spans[k + 1][2]] - spans[k - 1][1] for k in range(1, len(spans) - 1)
                  if spans[k + 1][2] in dispatched and dispatched[spans[k + 1][2]] > spans[k - 1][1]]
    first_queued = min(queued, default=float("nan"))
    return {"first_queued_ms": first_queued - LAST_RUN["t0_ms"],
            "first_dispatched_ms": min(dispatched.values(), default=float("nan")) - LAST_RUN["t0_ms"],
            "all_queued_ms": max(queued, default=float("nan")) - LAST_RUN["t0_ms"],
            "end_to_completed_p50": percentile(end_to_completed, 50),
            "end_to_completed_p95": percentile(end_to_completed, 95),
            "turnaround_p50": percentile(turnaround, 50), "turnaround_p95": percentile(turnaround, 95)}


# -- the real ComfyUI --------------------------------------------------------------------------------------------
class RealComfyUI:
    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> Path:
        return self.home / "base" / "output"

    def start(self) -> None:
        out = subprocess.run([str(self.home / "start.sh"), str(self.port)], capture_output=True, text=True, timeout=180,
                             check=False)
        print(f"  {out.stdout.strip()}", flush=True)
        if out.returncode != 0:
            raise RuntimeError(f"ComfyUI did not start: {out.stdout}{out.stderr}")
        self.started = True

    def stop(self) -> None:
        if self.started:
            out = subprocess.run([str(self.home / "stop.sh"), str(self.port)], capture_output=True, text=True,
                                 timeout=60, check=False)
            print(f"  {out.stdout.strip()}")
            self.started = False


def start_comfyd(serve: ComfydServe) -> None:
    """Start comfyd and wait until it has connected to ComfyUI (and read its node catalogue)."""
    import urllib.request

    serve.start()
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(serve.url + "/health") as response:
            health = json.loads(response.read())
        if health["backendsUp"] == 1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"comfyd never saw the backend up: {health}")
        time.sleep(0.1)


def start_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--duration", "4", "--rate", "500",
                             "--threads", "--format", "raw", "--output", str(output), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def main_async(args: argparse.Namespace, comfy: RealComfyUI, workdir: Path) -> None:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run = Run(run_id, args.seed, args.size)
    comfyd_ids: list[str] = []
    toml = "[scheduler]\nbackend_wait = 86400.0\n"
    if args.prefetch is not None:  # the backend from the TOML, with its prefetch
        toml += f'[[backends]]\nurl = "{comfy.url}"\nprefetch = {args.prefetch}\n'
    serve = ComfydServe(workdir / "comfyd", "" if args.prefetch is not None else comfy.url, outputs=comfy.output,
                        toml=toml)
    try:
        await asyncio.to_thread(start_comfyd, serve)
        print(f"  comfyd {serve.url} → ComfyUI {comfy.url}; warming up both with {args.warmup} jobs each", flush=True)
        await bare(comfy.url, run, args.warmup, window=None)
        _, ids, _ = await via_comfyd(serve.url, run, args.warmup, args.submit_concurrency)
        comfyd_ids += ids
        results: dict[str, list[dict[str, Any]]] = {"comfyd": [], "all": [], "bare1+1": []}
        modes = list(results)
        for round_no in range(1, args.rounds + 1):
            order = modes[round_no % 3:] + modes[:round_no % 3]  # rotate the order each round
            for mode in order:
                if mode == "comfyd":
                    spy = None
                    if args.profile and round_no == 1:
                        spy = start_spy(serve.pid, Path(args.profile) / "vs_bare_comfyd.txt")
                        await asyncio.sleep(0.5)
                    cpu0 = cpu_seconds(serve.pid)
                    elapsed, ids, failed = await via_comfyd(serve.url, run, args.jobs, args.submit_concurrency)
                    cpu_ms_per_job = (cpu_seconds(serve.pid) - cpu0) / args.jobs * 1000
                    if spy is not None:
                        await asyncio.get_running_loop().run_in_executor(None, spy.wait)
                        print_breakdown(Path(args.profile) / "vs_bare_comfyd.txt", VS_BARE_RULES, 500, 4)
                    comfyd_ids += ids
                    gaps = await history_gaps(comfy.url, ids, prefix_match=True)
                    gaps.update(await timeline(comfy.url, serve, ids))
                else:
                    elapsed, ids = await bare(comfy.url, run, args.jobs, window=None if mode == "all" else 2)
                    failed = 0
                    gaps = await history_gaps(comfy.url, ids, prefix_match=False)
                r = {"seconds": elapsed, "jobs_s": args.jobs / elapsed, "failed": failed, **gaps}
                if mode == "comfyd":
                    r["cpu_ms_per_job"] = cpu_ms_per_job
                results[mode].append(r)
                print(f"  round {round_no} {mode:8s}: {elapsed:6.2f} s  {r['jobs_s']:6.1f} jobs/s  failed {failed}  "
                      f"ComfyUI exec p50 {r['exec_p50']:.0f} ms; idle gap p50 {r['gap_p50']:.0f} ms p95 "
                      f"{r['gap_p95']:.0f} ms max {r['gap_max']:.0f} ms, idle total {r['gap_sum_s']:.2f} s of "
                      f"{r['busy_s']:.2f} s ({r['n']} prompts in history); start → first prompt {r['lead_ms']:.0f} ms, "
                      f"last prompt → done {r['tail_ms']:.0f} ms", flush=True)
                if mode == "comfyd":
                    print(f"      comfyd per job: CPU {r['cpu_ms_per_job']:.2f} ms; "
                          f"ComfyUI success → workflow_completed p50 {r['end_to_completed_p50']:.1f}"
                          f" / p95 {r['end_to_completed_p95']:.1f} ms; success of job k-1 → dispatch of job k+1 p50 "
                          f"{r['turnaround_p50']:.1f} / p95 {r['turnaround_p95']:.1f} ms; from the start: first "
                          f"queued {r['first_queued_ms']:.0f} ms, first dispatched {r['first_dispatched_ms']:.0f} ms, "
                          f"all {args.jobs} queued {r['all_queued_ms']:.0f} ms", flush=True)
            await asyncio.sleep(0.5)
        print(f"\n  summary over {args.rounds} rounds of {args.jobs} jobs (median, min–max):")
        for mode, rs in results.items():
            print(f"  {mode:8s} total {spread([r['seconds'] for r in rs], '{:.2f}')} s; "
                  f"{spread([r['jobs_s'] for r in rs], '{:.1f}')} jobs/s; idle gap p50 "
                  f"{median([r['gap_p50'] for r in rs]):.0f} ms, p95 {median([r['gap_p95'] for r in rs]):.0f} ms; "
                  f"ComfyUI exec p50 {median([r['exec_p50'] for r in rs]):.0f} ms")
        vs_bare = [c["seconds"] / b["seconds"] for c, b in zip(results["comfyd"], results["bare1+1"])]
        vs_all = [c["seconds"] / a["seconds"] for c, a in zip(results["comfyd"], results["all"])]
        print(f"  comfyd / bare1+1 total time: {spread(vs_bare, '{:.2f}')} (target ≤ 1.05: "
              f"{'met' if median(vs_bare) <= 1.05 else 'MISSED'})")
        print(f"  comfyd / all-at-once total time: {spread(vs_all, '{:.2f}')}")
        rs = results["comfyd"]
        print(f"  comfyd CPU per job: {spread([r['cpu_ms_per_job'] for r in rs], '{:.2f}')} ms "
              f"(1000 / that = the jobs/s one core of comfyd can drive)")
        print(f"  comfyd per job (median of rounds): success → completed {median([r['end_to_completed_p50'] for r in rs]):.1f}"
              f" ms; slot turnaround {median([r['turnaround_p50'] for r in rs]):.1f} ms (p95 "
              f"{median([r['turnaround_p95'] for r in rs]):.1f}) vs ComfyUI's own run of a prompt "
              f"{median([r['exec_p50'] for r in rs]):.0f} ms: ComfyUI idles when the turnaround is longer than one run")
    finally:
        serve.stop()
        if not args.keep:
            for workflow_id in comfyd_ids:
                shutil.rmtree(comfy.output / workflow_id, ignore_errors=True)
            shutil.rmtree(comfy.output / "comfyd-bench-vs-bare" / run_id, ignore_errors=True)
            try:
                (comfy.output / "comfyd-bench-vs-bare").rmdir()
            except OSError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--comfyui", default="/work/comfyui-real", help="the real ComfyUI's folder (start.sh, stop.sh)")
    parser.add_argument("--port", type=int, default=0, help="ComfyUI port (default: a free one)")
    parser.add_argument("--size", type=int, help="EmptyImage width and height (default: quick.json's 64)")
    parser.add_argument("--prefetch", type=int, help="comfyd backend prefetch (default: comfyd's own, 1)")
    parser.add_argument("--submit-concurrency", type=int, default=8,
                        help="submits in flight to comfyd at once (default 8; aiohttp's own limit is 100)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record comfyd during round 1's comfyd run")
    parser.add_argument("--keep", action="store_true", help="keep the output files this run made")
    args = parser.parse_args()
    install_cleanup()
    home = Path(args.comfyui)
    if not (home / "start.sh").exists():
        raise SystemExit(f"no real ComfyUI at {home} (start.sh missing)")
    print_machine()
    comfy = RealComfyUI(home, args.port or free_port())
    workdir = Path(tempfile.mkdtemp(prefix="comfyd-bench-vs-bare-"))
    try:
        comfy.start()
        asyncio.run(main_async(args, comfy, workdir))
    finally:
        comfy.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
