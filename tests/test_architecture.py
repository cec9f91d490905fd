"""The dependency rules of docs/architecture.md, checked on the source: a forbidden import fails here.

Imports are read with ``ast`` from every module of the package, including imports inside
functions and ``TYPE_CHECKING`` blocks, and followed transitively: a rule on a module holds for
everything it reaches.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "relay"

# What a module doing no I/O must not reach: event loops, sockets, files, the web stack.
IO = frozenset({"asyncio", "socket", "os", "tempfile", "pathlib", "subprocess", "websockets", "httpx",
                "starlette", "uvicorn", "structlog", "redis"})  # fmt: skip


@dataclass(frozen=True)
class Rule:
    name: str
    modules: tuple[str, ...]
    forbidden: frozenset[str] = frozenset()
    # When set, everything the modules reach inside the package must be in here.
    only: frozenset[str] | None = None


RULES = (
    Rule(
        "translation knows no I/O",
        ("relay.translator", "relay.events", "relay.plans", "relay.graph", "relay.protocol"),
        forbidden=IO,
    ),
    Rule(
        "the hub does not know where events come from",
        ("relay.fanout",),
        forbidden=frozenset(
            {
                "relay.translator",
                "relay.sessions",
                "relay.upstream",
                "relay.comfy",
                "relay.protocol",
                "relay.proxy",
                "redis",
                "relay.eventlog",
                "relay.cluster",
                "relay.lease",
            }
        ),
    ),
    Rule(
        "the proxy does not import the workflows or the hub",
        ("relay.proxy", "relay.uploads"),
        forbidden=frozenset({"relay.workflows", "relay.fanout", "relay.sessions", "relay.state"}),
    ),
    Rule(
        "the workflows do not import the proxy or the hub",
        ("relay.workflows",),
        forbidden=frozenset({"relay.proxy", "relay.uploads", "relay.fanout", "relay.sessions"}),
    ),
    Rule(
        "metrics know nothing of sessions or sockets",
        ("relay.metrics",),
        forbidden=frozenset({"relay.sessions", "relay.fanout", "relay.upstream"}),
    ),
    Rule(
        "the CLI client depends only on the public event contract",
        ("relay.submit", "relay.terminal"),
        only=frozenset({"relay.submit", "relay.terminal", "relay.events"}),
    ),
    Rule(
        "results leave through events: storage and webhooks know no session, socket or hub",
        ("relay.storage", "relay.webhooks", "relay.delivery"),
        forbidden=frozenset(
            {"relay.sessions", "relay.fanout", "relay.upstream", "relay.cluster", "relay.state"}
        ),
    ),
    Rule(
        "the backends know no session, socket or hub: sessions tell them what they route",
        ("relay.backends", "relay.merged"),
        forbidden=frozenset(
            {
                "relay.sessions",
                "relay.fanout",
                "relay.upstream",
                "relay.cluster",
                "relay.state",
                "relay.translator",
            }
        ),
    ),
    Rule(
        "the product never imports the emulator",
        ("relay.app", "relay.server", "relay.state", "relay.sockets", "relay.prompts", "relay.sessions"),
        forbidden=frozenset({"relay.emulator"}),
    ),
)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from a import b`` counts as a and a.b)."""
    module = module_name(path, package)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> what it imports (package modules by name, others by top name)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imports_of(path, package):
            if imported.split(".")[0] != "relay":
                edges.add(imported.split(".")[0])
                continue
            # The longest prefix that is a module: relay.errors.BadRequest -> relay.errors.
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def reached(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """Everything ``start`` imports, directly or through other package modules."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(graph.get(module, ()))
    return seen


def _within(module: str, names: Iterable[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def violations(graph: Mapping[str, Iterable[str]], rules: Iterable[Rule] = RULES) -> list[str]:
    problems = []
    for rule in rules:
        for module in rule.modules:
            assert module in graph, f"{rule.name}: no module {module} (update the rule)"
            reach = reached(graph, module)
            bad = {m for m in reach if _within(m, rule.forbidden)}
            if rule.only is not None:
                bad |= {m for m in reach if m.startswith("relay") and m not in rule.only}
            problems += [f"{rule.name}: {module} reaches {m}" for m in sorted(bad)]
    return problems


def test_the_dependency_rules_hold() -> None:
    """Every rule of docs/architecture.md holds for the package as it is."""
    assert violations(import_graph()) == []


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """The checker sees imports inside functions and through other modules, and names the culprit."""
    package = tmp_path / "relay"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "translator.py").write_text("from relay import helper\n")
    (package / "helper.py").write_text("def later():\n    import asyncio\n    return asyncio\n")
    (package / "fanout.py").write_text("from . import sessions\n")
    (package / "sessions.py").write_text("")
    graph = import_graph(package)
    rules = (
        Rule("translation knows no I/O", ("relay.translator",), forbidden=IO),
        Rule("the hub", ("relay.fanout",), forbidden=frozenset({"relay.sessions"})),
    )
    assert violations(graph, rules) == [
        "translation knows no I/O: relay.translator reaches asyncio",
        "the hub: relay.fanout reaches relay.sessions",
    ]


def test_the_architecture_document_names_every_rule() -> None:
    """docs/architecture.md and this test state the same rules."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for rule in RULES:
        assert rule.name in text, rule.name


@pytest.mark.slow
def test_serve_does_not_load_the_emulator(tmp_path: Path) -> None:
    """`comfy-relay serve`, up and answering, has imported neither the emulator nor Pillow, nor,
    without storage configured, the S3 client."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RELAY_PORT": str(port), "RELAY_ETA_FILE": "", "RELAY_LOG_LEVEL": "warning",
           "COMFYUI_URL": "http://127.0.0.1:9"}  # fmt: skip
    log = tmp_path / "imports.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "relay", "serve"], env=env, stderr=stderr
        )
        try:
            deadline = time.monotonic() + 60
            with httpx.Client(timeout=1) as http:
                while True:  # until it answers: it does as soon as its lifespan has run
                    assert process.poll() is None, log.read_text()[-2000:]
                    try:
                        if http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "the relay did not start"
                    time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in log.read_text().splitlines() if "|" in line}
    assert "relay.app" in loaded  # the log is the real one
    assert not {m for m in loaded if m.startswith(("relay.emulator", "PIL", "obstore", "relay.storage"))}


def test_serve_command_leaves_the_emulator_out_of_sys_modules(tmp_path: Path) -> None:
    """The whole `serve` command path (options, logging, the app, the server object) run in a
    fresh interpreter, up to where the server would start listening: sys.modules then has no
    emulator and no Pillow."""
    script = (
        "import sys, relay.server\n"
        "relay.server.RelayServer.run = lambda self, sockets=None: None  # stop short of listening\n"
        "from relay.cli import main\n"
        "assert main(['serve', '--port', '0']) == 0\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "RELAY_ETA_FILE": "", "RELAY_LOG_LEVEL": "warning"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(result.stdout.split())
    assert {"relay.cli", "relay.app", "relay.state", "relay.sockets"} <= modules
    assert not {m for m in modules if m.startswith(("relay.emulator", "PIL"))}
