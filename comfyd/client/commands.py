"""The client subcommands: their arguments, and running one (``run_cli`` is the in-process entry)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TextIO

from comfyd.client import doctor, files, jobs
from comfyd.client.api import Api
from comfyd.client.context import Context
from comfyd.client.options import (
    EXIT_CODES_HELP,
    EXIT_USAGE,
    CliError,
    add_global_options,
    positive_float,
    positive_int,
    resolve,
)
from comfyd.client.output import Console

Handler = Callable[[Context, argparse.Namespace], Awaitable[int]]
STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def add_client_commands(commands: Any) -> None:
    """Add submit, status, cancel, list, outputs, models, backends and doctor to ``commands`` (a subparsers
    action of the ``comfyd`` parser)."""

    def command(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_global_options(parser, suppress=True)
        parser.set_defaults(handler=handler)
        return parser

    submit = command("submit", jobs.submit, "submit an API-format workflow")
    submit.add_argument("file", metavar="FILE",
                        help="workflow JSON (ComfyUI's 'Export (API)'), or a submit body {\"workflow\": ...}; - for stdin")
    submit.add_argument("--priority", choices=("low", "normal", "high"), help="queue class (default normal)")
    submit.add_argument("--gpu", metavar="POOL", help="backend pool, e.g. local or salad (default local)")
    submit.add_argument("--timeout-seconds", type=positive_float, metavar="N",
                        help="interrupt the job after N seconds of execution")
    submit.add_argument("--idempotency-key", metavar="K",
                        help="submitting again with the same key returns the first job instead of a new one")
    submit.add_argument("--wait", action="store_true",
                        help="follow progress until the job ends; exit 0 completed, 1 failed, 3 cancelled")

    status = command("status", jobs.status, "show one workflow's status")
    status.add_argument("id", metavar="ID", help="workflow id (or a unique prefix of a recent one)")

    cancel = command("cancel", jobs.cancel, "cancel a queued or running workflow")
    cancel.add_argument("id", metavar="ID", help="workflow id (or a unique prefix of a recent one)")

    list_ = command("list", jobs.list_jobs, "list recent workflows, newest first")
    list_.add_argument("--status", choices=STATUSES, help="only workflows in this state")
    list_.add_argument("--limit", type=positive_int, default=20, metavar="N", help="at most N (default 20)")

    outputs = command("outputs", files.outputs, "list output files, newest first, and download them")
    outputs.add_argument("--workflow", metavar="ID", help="only this workflow's outputs")
    outputs.add_argument("--limit", type=positive_int, default=50, metavar="N", help="at most N (default 50)")
    outputs.add_argument("--download", metavar="DIR",
                         help="fetch each file into DIR, keeping its <workflowId>/ subfolder")

    models = command("models", files.models, "list the models comfyd knows")
    models.add_argument("--type", metavar="T", help="checkpoints, loras, vae, controlnet or upscale")

    command("backends", files.backends, "list the ComfyUI backends and their state")

    check = command("doctor", doctor.doctor, "check this host's comfyd setup and say how to fix what is wrong")
    check.add_argument("--config", metavar="FILE",
                       help="TOML config to check (default: $COMFYD_CONFIG, else /etc/comfyd/comfyd.toml if "
                            "present, else embedded defaults)")


async def run_args(args: argparse.Namespace, *, stdout: TextIO, stderr: TextIO, stdin: TextIO,
                   env: Mapping[str, str]) -> int:
    """Run a parsed client command; errors become ``comfyd: <message>`` on stderr and their exit code."""
    console = Console(stdout, stderr, json_mode=bool(getattr(args, "json", False)))
    try:
        settings = resolve(args, env)
        async with Api(settings) as api:
            context = Context(settings=settings, console=console, api=api, env=env, stdin=stdin)
            return await args.handler(context, args)
    except CliError as exc:
        console.error(exc.message)
        return exc.code


async def run_cli(argv: Sequence[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None,
                  stdin: TextIO | None = None, env: Mapping[str, str] | None = None) -> int:
    """``comfyd <argv>`` in-process for client commands: the exit status it would have."""
    from comfyd.cli import build_parser

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # argparse's help and usage
        try:
            args = build_parser().parse_args(list(argv))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "handler", None) is None:
        stderr.write(f"comfyd: {args.command} is not a client command\n")
        return EXIT_USAGE
    return await run_args(args, stdout=stdout, stderr=stderr, stdin=stdin or sys.stdin,
                          env=os.environ if env is None else env)


def main(args: argparse.Namespace) -> int:
    """The process entry for a parsed client command (from ``comfyd.cli.main``)."""
    try:
        return asyncio.run(run_args(args, stdout=sys.stdout, stderr=sys.stderr, stdin=sys.stdin, env=os.environ))
    except KeyboardInterrupt:
        sys.stderr.write("comfyd: interrupted\n")
        return 130
    except BrokenPipeError:  # stdout closed early (| head): nothing more to say, and nothing left to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
