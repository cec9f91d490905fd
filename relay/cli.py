"""The ``comfy-relay`` command: ``serve``, ``demo``, ``submit``, ``workflows``, ``emulator``.

Only ``demo`` and ``emulator`` load the ComfyUI emulator (and Pillow with it); ``serve``, the
product, never imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from relay import __version__
from relay.app import create_app as create_relay_app
from relay.config import DESCRIPTIONS, ENV_NAMES, ENV_ONLY, ConfigError, RelayConfig
from relay.i18n import LANGUAGES
from relay.logs import configure_logging
from relay.server import RelayServer, run_relay, tune_gc
from relay.server import uvicorn_config as relay_uvicorn_config
from relay.submit import EXIT_STOPPED, SubmitOptions, cancel_prompt, list_workflows, run_submit
from relay.workflows import WorkflowError

__all__ = ["main"]

_EXAMPLE = Path(__file__).parent / "emulator" / "examples" / "text2img.json"


def _comfyui_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--comfyui-version",
        choices=("current", "0.3.64"),
        default="current",
        help="which ComfyUI the emulator behaves as: the current release or the recorded 0.3.64 "
        "(default: %(default)s)",
    )


def _emulator_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "emulator",
        help="run the built-in ComfyUI emulator",
        description="Serve an emulated ComfyUI (HTTP API and WebSocket) with simulated nodes.",
    )
    _comfyui_version_argument(parser)
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
    # Imported here, not at the top: `serve` must not load the emulator (nor Pillow).
    from relay.emulator import EmulatorConfig, create_app  # noqa: PLC0415
    from relay.emulator.harness import uvicorn_config  # noqa: PLC0415

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
        comfyui_version=args.comfyui_version,
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
    print(f"  version: ComfyUI {config.version} ({config.comfyui_version} profile)")
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
        if name in ENV_ONLY:
            continue
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
    _comfyui_version_argument(parser)
    parser.add_argument("--log-format", choices=("console", "json"), default="console")


async def _demo(args: argparse.Namespace) -> None:
    from relay.emulator import EmulatorConfig, run_emulator  # noqa: PLC0415 - see _run_emulator

    emulator_config = EmulatorConfig(
        host=args.host, port=args.comfyui_port, speed=args.speed, comfyui_version=args.comfyui_version
    )
    async with run_emulator(emulator_config) as emulator:
        config = RelayConfig.from_env(comfyui_url=emulator.url, host=args.host, port=args.port)
        async with run_relay(config) as relay:
            example = '{\\"client_id\\": \\"demo\\", \\"prompt\\": '
            version = emulator_config.version
            workflows = "\n".join(
                f"  {w.name:<14} {len(w.steps):>2} steps  {w.title['en']}" for w in relay.state.workflows
            )
            print(
                f"\ncomfy-relay demo\n"
                f"  page:      {relay.url}/  (open it in a browser)\n"
                f"  relay:     {relay.url}  (WebSocket {relay.ws_url})\n"
                f"  ComfyUI:   {emulator.url}  (emulated {version}, speed x{args.speed:g})\n\n"
                f"Workflows:\n{workflows}\n\n"
                f"Run one and watch its steps (in another terminal):\n"
                f"  {_command_path()} submit portrait_mode --watch --relay {relay.url}\n"
                f"Watch a client's events:\n"
                f"  {_wscat_command()} -c '{relay.ws_url}?clientId=demo'\n"
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


def _command_path() -> str:
    """How to run this command from the current folder (the virtualenv's script when it has one)."""
    script = Path(sys.executable).parent / "comfy-relay"
    if not script.exists():
        return "comfy-relay"
    with contextlib.suppress(ValueError):
        return str(script.relative_to(Path.cwd()))
    return str(script)


def _wscat_command() -> str:
    """wscat as `make tools` installs it in this checkout, else from the path."""
    local = Path("build/tools/node_modules/.bin/wscat")
    return str(local) if local.exists() else "wscat"


def _relay_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("COMFY_RELAY_URL", "http://127.0.0.1:8190")
    parser.add_argument(
        "--relay", default=default, metavar="URL", help="the relay's URL [env COMFY_RELAY_URL, %(default)s]"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("COMFY_RELAY_TOKEN") or None,
        metavar="TOKEN",
        help="the relay's token, when it requires one [env COMFY_RELAY_TOKEN, preferred: flags show in ps]",
    )


def _submit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "submit",
        help="submit a workflow through a relay and watch its progress",
        description=(
            "Submit a workflow the relay knows (see 'comfy-relay workflows') or an API-format graph file, "
            "and with --watch follow it step by step until it ends. Exit status: 0 success, 1 the run "
            "failed or was interrupted, 2 the request was refused, 3 the relay could not be reached."
        ),
    )
    parser.add_argument(
        "workflow", metavar="WORKFLOW", help="a workflow name, or a path to a graph .json file"
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a workflow parameter (repeatable); an image parameter given as @PATH uploads that file",
    )
    _relay_argument(parser)
    parser.add_argument(
        "--client-id", metavar="ID", help="the client id to submit under (default: a new one)"
    )
    parser.add_argument("--lang", choices=LANGUAGES, help="language of step names (default: the relay's)")
    parser.add_argument("-w", "--watch", action="store_true", help="show live progress until the run ends")
    parser.add_argument(
        "--store",
        action="store_true",
        help="keep the output files in the relay's S3-compatible storage; --watch prints their URLs",
    )
    parser.add_argument(
        "--webhook-url",
        metavar="URL",
        help="have the relay POST to this URL (on its allow-list) when the run ends",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "live", "plain"),
        default="auto",
        help="live bars redrawn in place, or plain lines; auto: live on a terminal (default)",
    )
    parser.add_argument(
        "--reconnect-for",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to keep trying when the relay connection drops (default: %(default)s)",
    )


def _run_submit(args: argparse.Namespace) -> int:
    options = SubmitOptions(
        target=args.workflow,
        relay_url=args.relay,
        params=tuple(args.param),
        client_id=args.client_id,
        lang=args.lang,
        token=args.token,
        watch=args.watch,
        progress=args.progress,
        store=args.store,
        webhook_url=args.webhook_url,
        reconnect_for=args.reconnect_for,
    )
    try:
        return asyncio.run(run_submit(options))
    except KeyboardInterrupt:
        return EXIT_STOPPED


def _workflows_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "workflows",
        help="list the workflows a relay knows, with their parameters",
        description="List the workflows a relay knows: names, step counts and the parameters 'submit' takes.",
    )
    _relay_argument(parser)
    parser.add_argument(
        "--lang", choices=LANGUAGES, default="en", help="language of titles (default: %(default)s)"
    )


def _run_workflows(args: argparse.Namespace) -> int:
    return asyncio.run(list_workflows(args.relay, args.lang, token=args.token))


def _cancel_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "cancel",
        help="cancel a prompt: out of the queue if it waits, interrupted if it runs",
        description=(
            "Cancel a prompt through a relay. Exit status: 0 cancelled, 1 it had already ended, "
            "2 the id was refused, 3 the relay could not be reached."
        ),
    )
    parser.add_argument("prompt_id", metavar="PROMPT_ID", help="the prompt id submit printed")
    _relay_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-relay", description="A WebSocket event relay in front of ComfyUI."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _demo_parser(sub)
    _submit_parser(sub)
    _workflows_parser(sub)
    _cancel_parser(sub)
    _emulator_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(parser, args)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "emulator":
        return _run_emulator(args)
    if args.command == "serve":
        return _run_relay(args)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "submit":
        return _run_submit(args)
    if args.command == "workflows":
        return _run_workflows(args)
    if args.command == "cancel":
        return asyncio.run(cancel_prompt(args.relay, args.prompt_id, token=args.token))
    parser.print_help()
    return 2
