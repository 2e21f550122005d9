"""``comfyd submit | status | cancel | list``: one workflow, or the recent ones."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp

from comfyd.client.api import Api, ApiError
from comfyd.client.context import Context
from comfyd.client.options import (
    EXIT_CANCELLED,
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
)
from comfyd.client.output import (
    age,
    human_duration,
    is_tty,
    local_time,
    percent,
    short_id,
)
from comfyd.client.progress import ProgressView

TERMINAL = frozenset({"workflow:completed", "workflow:error", "workflow:cancelled"})
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)  # then give up: about 35 s without comfyd


def workflow_path(workflow_id: str) -> str:
    return f"/v1/comfyui/workflow/{quote(workflow_id, safe='')}"


# -- submit --------------------------------------------------------------------------------------------------
def read_body(source: str, stdin: TextIO, args: argparse.Namespace) -> dict[str, Any]:
    """The submit body from an API-format workflow (or a file that already is a submit body), plus the flags."""
    name = "stdin" if source == "-" else source
    try:
        raw = stdin.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"{name} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise CliError(f"{name} must hold a JSON object (an API-format workflow)", EXIT_USAGE)
    inner = data.get("workflow")
    is_body = isinstance(inner, dict) and "class_type" not in inner
    body = dict(data) if is_body else {"workflow": data}
    if args.priority:
        body["priority"] = args.priority
    if args.gpu:
        body["gpu"] = args.gpu
    if args.timeout_seconds:
        body["timeout"] = args.timeout_seconds
    return body


def _accepted_line(accepted: dict[str, Any]) -> str:
    return f"{accepted['workflowId']}  {accepted.get('status', 'queued')}, position {accepted.get('queuePosition', 0)}"


async def submit(ctx: Context, args: argparse.Namespace) -> int:
    body = read_body(args.file, ctx.stdin, args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    if not args.wait:
        _, accepted = await ctx.api.call("POST", "/v1/comfyui/workflow", body=body, headers=headers)
        if ctx.settings.json:
            ctx.console.json(accepted)
        else:
            ctx.console.line(_accepted_line(accepted))
        return EXIT_OK
    # Connect first: a stream without a subscription receives every workflow's events, so nothing about
    # this workflow is missed between the 202 and the subscribe (which then replays the current state).
    ws = await ctx.api.stream()
    try:
        _, accepted = await ctx.api.call("POST", "/v1/comfyui/workflow", body=body, headers=headers)
        workflow_id = accepted["workflowId"]
        if not ctx.settings.json:
            ctx.console.line(_accepted_line(accepted))
        stderr = ctx.console.stderr
        view = ProgressView(stderr, tty=is_tty(stderr)) if not ctx.settings.json or is_tty(stderr) else None
        follower = Follower(ctx.api, workflow_id, view.update if view else None)
        try:
            end = await follower.run(ws)
        except asyncio.CancelledError:
            if view:
                view.close()
            ctx.console.note(f"stopped waiting; {workflow_id} goes on (comfyd cancel {workflow_id})")
            raise
        finally:
            ws = follower.ws or ws
    finally:
        await ws.close()
    if view:
        view.close()
    return await _report_end(ctx, end, view)


async def _report_end(ctx: Context, end: dict[str, Any], view: ProgressView | None) -> int:
    workflow_id = end["workflowId"]
    took = view.elapsed() if view else None
    code = {"workflow:completed": EXIT_OK, "workflow:error": EXIT_FAILED}.get(end["type"], EXIT_CANCELLED)
    if ctx.settings.json:  # the final status on stdout; a failure is still said on stderr
        ctx.console.json(await ctx.api.get(workflow_path(workflow_id)))
    match end["type"]:
        case "workflow:completed":
            if not ctx.settings.json:
                ctx.console.note("completed" + (f" in {human_duration(took)}" if took is not None else ""))
                for output in end.get("outputs") or []:
                    ctx.console.line(ctx.api.url(output["url"]))
        case "workflow:error":
            ctx.console.error(f"workflow {workflow_id} failed ({end.get('errorType')}): {end.get('error')}")
        case _:
            ctx.console.error(f"workflow {workflow_id} was cancelled")
    return code


class Follower:
    """Reads one workflow's events from the stream until it ends, subscribing again after a lost connection
    (the server replays the current state on subscribe, so an end during the gap is not missed)."""

    def __init__(self, api: Api, workflow_id: str, on_event: Any = None) -> None:
        self.api = api
        self.workflow_id = workflow_id
        self.on_event = on_event
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def run(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        self.ws = ws
        await ws.send_json({"type": "subscribe", "workflowId": self.workflow_id})
        attempt = 0
        while True:
            end = await self._read(self.ws)
            if end is not None:
                return end
            await self.ws.close()
            if attempt >= len(RECONNECT_DELAYS):
                raise CliError(f"lost the stream from comfyd at {self.api.base}; ask again with "
                               f"comfyd status {self.workflow_id}", EXIT_UNREACHABLE)
            await asyncio.sleep(RECONNECT_DELAYS[attempt])
            attempt += 1
            try:
                self.ws = await self.api.stream()
                await self.ws.send_json({"type": "subscribe", "workflowId": self.workflow_id})
            except CliError as exc:
                if exc.code != EXIT_UNREACHABLE:
                    raise
                continue
            except (aiohttp.ClientError, ConnectionError):
                continue
            attempt = 0

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any] | None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(message.data)
            except ValueError:
                continue
            if event.get("workflowId") != self.workflow_id:
                continue
            if event.get("type") == "error":
                raise ApiError(404, event)
            if self.on_event is not None:
                self.on_event(event)
            if event.get("type") in TERMINAL:
                return event
        return None


# -- status, cancel, list ----------------------------------------------------------------------------------
FULL_ID_LENGTH = 36  # a UUID
MIN_PREFIX = 4
PREFIX_SEARCH = 1000


async def resolve_id(ctx: Context, given: str) -> str:
    """A full workflow id, or the one recent workflow whose id starts with ``given`` (as ``list`` shows them)."""
    if len(given) >= FULL_ID_LENGTH or len(given) < MIN_PREFIX:
        return given
    reply = await ctx.api.get("/v1/comfyui/workflows", limit=PREFIX_SEARCH)
    matches = [j["workflowId"] for j in reply["workflows"] if j["workflowId"].startswith(given)]
    if len(matches) > 1:
        raise CliError(f"{given!r} matches {len(matches)} workflows; give more of the id", EXIT_USAGE)
    return matches[0] if matches else given


async def status(ctx: Context, args: argparse.Namespace) -> int:
    job = await ctx.api.get(workflow_path(await resolve_id(ctx, args.id)))
    if ctx.settings.json:
        ctx.console.json(job)
        return EXIT_OK
    started, completed = job.get("startTime"), job.get("completionTime")
    duration = human_duration((completed - started) / 1000) if started and completed else None
    ctx.console.fields([
        ("workflowId", job["workflowId"]),
        ("status", job["status"]),
        ("queuePosition", job.get("queuePosition")),
        ("priority", job.get("priority")),
        ("gpu", job.get("gpu")),
        ("backend", job.get("backend")),
        ("progress", percent(job.get("progress"))),
        ("currentNode", job.get("currentNode")),
        ("created", local_time(job.get("createdAt"))),
        ("started", local_time(started) if started else None),
        ("completed", local_time(completed) if completed else None),
        ("duration", duration),
        ("attempts", job.get("attempts")),
        ("error", job.get("error")),
        ("errorType", job.get("errorType")),
    ])
    for output in job.get("outputs") or []:
        ctx.console.line(f"output  {ctx.api.url(output['url'])}")
    return EXIT_OK


async def cancel(ctx: Context, args: argparse.Namespace) -> int:
    workflow_id = await resolve_id(ctx, args.id)
    try:
        status_code, reply = await ctx.api.call("DELETE", workflow_path(workflow_id))
    except ApiError as exc:
        if exc.status != 409:
            raise
        current = exc.body.get("currentStatus")
        if ctx.settings.json:
            ctx.console.json(exc.body)
        ctx.console.error(f"{exc.message}: it is {current}" if current else exc.message)
        return EXIT_CONFLICT
    if ctx.settings.json:
        ctx.console.json(reply)
    elif status_code == 202:
        ctx.console.line(f"{workflow_id}  cancelling ({reply.get('message', 'not confirmed yet')})")
    else:
        ctx.console.line(f"{workflow_id}  cancelled")
    return EXIT_OK


async def list_jobs(ctx: Context, args: argparse.Namespace) -> int:
    reply = await ctx.api.get("/v1/comfyui/workflows", status=args.status, limit=args.limit)
    if ctx.settings.json:
        ctx.console.json(reply)
        return EXIT_OK
    rows = [(short_id(j["workflowId"]), j["status"], j.get("priority"), j.get("gpu"), percent(j.get("progress")),
             j.get("currentNode"), age(j.get("createdAt"))) for j in reply["workflows"]]
    ctx.console.table(("ID", "STATUS", "PRIORITY", "GPU", "PROGRESS", "NODE", "AGE"), rows)
    return EXIT_OK
