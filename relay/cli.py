"""The ``comfy-relay`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from relay import __version__
from relay.app import create_app as create_relay_app
from relay.config import DESCRIPTIONS, ENV_NAMES, ConfigError, RelayConfig
from relay.emulator import EmulatorConfig, create_app, run_emulator
from relay.emulator.harness import uvicorn_config
from relay.logs import configure_logging
from relay.server import RelayServer, run_relay, tune_gc
from relay.server import uvicorn_config as relay_uvicorn_config
from relay.workflows import WorkflowError

__all__ = ["main"]

_EXAMPLE = Path(__file__).parent / "emulator" / "examples" / "text2img.json"


def _emulator_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "emulator",
        help="run the built-in ComfyUI emulator",
        description="Serve an emulated ComfyUI 0.3.64 (HTTP API and WebSocket) with simulated nodes.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8188, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="divide every simulated duration by FACTOR (default: %(default)s)",
    )
    parser.add_argument("--output-dir", type=Path, help="where saved images go (default: a temporary folder)")
    parser.add_argument("--input-dir", type=Path, help="where uploads go (default: a temporary folder)")
    parser.add_argument("--temp-dir", type=Path, help="where previews go (default: a temporary folder)")
    parser.add_argument(
        "--max-upload-size",
        type=float,
        default=None,
        metavar="MB",
        help="request body limit in MB (default: 100)",
    )
    parser.add_argument(
        "--enable-cors-header",
        nargs="?",
        const="*",
        default=None,
        metavar="ORIGIN",
        help="send CORS headers (default origin '*') instead of checking Origin",
    )
    parser.add_argument(
        "--enable-compress-response-body", action="store_true", help="compress JSON and text responses"
    )
    parser.add_argument(
        "--no-duplicate-client-quirk",
        action="store_true",
        help="do not reproduce ComfyUI's orphaning of sockets that share a clientId",
    )
    parser.add_argument(
        "--output-order",
        choices=("stable", "random"),
        default="stable",
        help="order of independent outputs: stable (highest id first) or random, like a fresh ComfyUI",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _run_emulator(args: argparse.Namespace) -> int:
    config = EmulatorConfig(
        host=args.host,
        port=args.port,
        speed=args.speed,
        output_dir=args.output_dir,
        input_dir=args.input_dir,
        temp_dir=args.temp_dir,
        cors_origin=args.enable_cors_header,
        compress_responses=args.enable_compress_response_body,
        duplicate_client_quirk=not args.no_duplicate_client_quirk,
        output_order=args.output_order,
        **({"max_upload_size_mb": args.max_upload_size} if args.max_upload_size is not None else {}),
    )
    if config.speed <= 0:
        print("comfy-relay emulator: --speed must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(config)
    state = app.state.emulator
    print(
        f"ComfyUI emulator on http://{config.host}:{config.port} (WebSocket ws://{config.host}:{config.port}/ws)"
    )
    print(f"  output: {state.folders.output}\n  input:  {state.folders.input}\n  speed:  x{config.speed:g}")
    # uvicorn re-raises Ctrl-C after its graceful shutdown; it is the normal way to stop.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(uvicorn_config(app, config, log_level=args.log_level)).run()
    return 0


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the relay in front of a ComfyUI server",
        description="Relay ComfyUI's progress to browsers. Every option can also be set in the environment.",
    )
    defaults = RelayConfig()
    for name, env in ENV_NAMES.items():
        default = getattr(defaults, name)
        kind = type(default) if isinstance(default, (int, float)) else str
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{DESCRIPTIONS[name]} [env {env}, default {default!r}]",
        )


def _run_relay(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in ENV_NAMES and v is not None}
    try:
        config = RelayConfig.from_env(**overrides)
    except ConfigError as exc:
        print(f"comfy-relay serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    tune_gc()
    try:
        app = create_relay_app(config)
    except WorkflowError as exc:
        print(f"comfy-relay serve: workflow file: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        RelayServer(relay_uvicorn_config(app, config)).run()
    return 0


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the relay and the built-in ComfyUI emulator together",
        description="The embedded default: an emulated ComfyUI and the relay in front of it, on localhost.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address for both servers (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8190, help="the relay's port (default: %(default)s)")
    parser.add_argument(
        "--comfyui-port", type=int, default=8188, help="the emulator's port (default: %(default)s)"
    )
    parser.add_argument("--speed", type=float, default=1.0, metavar="FACTOR", help="emulator speed factor")
    parser.add_argument("--log-format", choices=("console", "json"), default="console")


async def _demo(args: argparse.Namespace) -> None:
    emulator_config = EmulatorConfig(host=args.host, port=args.comfyui_port, speed=args.speed)
    async with run_emulator(emulator_config) as emulator:
        config = RelayConfig.from_env(comfyui_url=emulator.url, host=args.host, port=args.port)
        async with run_relay(config) as relay:
            example = '{\\"client_id\\": \\"demo\\", \\"prompt\\": '
            print(
                f"\ncomfy-relay demo\n"
                f"  relay:     {relay.url}  (WebSocket {relay.ws_url})\n"
                f"  ComfyUI:   {emulator.url}  (emulated, speed x{args.speed:g})\n\n"
                f"Watch a client's events:\n"
                f"  wscat -c '{relay.ws_url}?clientId=demo'\n"
                f"Submit the example text-to-image graph:\n"
                f"  curl -s -X POST {relay.url}/prompt -H 'Content-Type: application/json' \\\n"
                f'       -d "{example}$(cat {_EXAMPLE})}}"\n\n'
                f"Ctrl-C stops both.\n",
                flush=True,
            )
            await asyncio.Event().wait()


def _run_demo(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, "info")
    tune_gc()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-relay", description="A WebSocket event relay in front of ComfyUI."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _demo_parser(sub)
    _emulator_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "emulator":
        return _run_emulator(args)
    if args.command == "serve":
        return _run_relay(args)
    if args.command == "demo":
        return _run_demo(args)
    parser.print_help()
    return 2
