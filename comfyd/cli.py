"""The ``comfyd`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from comfyd import __version__
from comfyd.client import add_client_commands
from comfyd.client import main as run_client
from comfyd.client.options import EXIT_CODES_HELP, add_global_options
from comfyd.config import ConfigError, load_config
from comfyd.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyd", description="Run ComfyUI as a durable, observable service.",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"comfyd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--config", help="TOML config file (default: $COMFYD_CONFIG, else embedded defaults)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1; $COMFYD_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default 9090; $COMFYD_PORT)")
    serve.add_argument("--data-dir", help="where the database lives ($COMFYD_DATA_DIR)")
    add_global_options(parser)  # for the client commands below; also accepted after the command name
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = load_config(args.config, overrides={"host": args.host, "port": args.port,
                                                         "data_dir": args.data_dir})
        except ConfigError as exc:
            print(f"comfyd: configuration error: {exc}", file=sys.stderr)
            return 2
        configure_logging(config.logging.level, config.logging.format)
        from comfyd.server import run_server

        return asyncio.run(run_server(config))
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
