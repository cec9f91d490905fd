"""The relay's ASGI app: the factory, and the lifespan that owns what the app runs on.

:func:`create_app` reads the configuration and the workflow library (a bad file stops the
start with a clear message), builds the routes and the middleware, and leaves every resource
to the lifespan (:func:`relay.state.open_relay`): nothing opens until the server starts.

In front of the routes, outermost first: request ids, access logs and HTTP metrics
(:mod:`relay.telemetry`); CORS, when origins are allowed; the token, origin and request-limit
rules (:mod:`relay.access`); the raw-send hook (:mod:`relay.asgi`). Errors become answers in
one place, :mod:`relay.errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route, WebSocketRoute

from relay import __version__
from relay.access import AccessControl
from relay.asgi import RawSend
from relay.config import RelayConfig
from relay.endpoints import get_preview, healthz, metrics, readyz
from relay.errors import exception_handlers
from relay.metrics import Metrics
from relay.page import page_routes
from relay.prompts import cancel_prompt, get_workflow, list_workflows, post_prompt, post_workflow_prompt
from relay.proxy import proxy_routes
from relay.sockets import relay_socket
from relay.state import Lifespan, open_relay
from relay.telemetry import Telemetry
from relay.uploads import upload_routes
from relay.workflows import Library, default_folder

__all__ = ["create_app", "routes"]

log = structlog.get_logger("relay.app")


def routes() -> list[BaseRoute]:
    return [
        WebSocketRoute("/ws", relay_socket),
        WebSocketRoute("/api/ws", relay_socket),
        Route("/prompt", post_prompt, methods=["POST"]),
        Route("/api/prompt", post_prompt, methods=["POST"]),
        Route("/prompt/{prompt_id}/cancel", cancel_prompt, methods=["POST"]),
        Route("/workflows", list_workflows, methods=["GET"]),
        Route("/workflows/{name}", get_workflow, methods=["GET"]),
        Route("/workflows/{name}/prompt", post_workflow_prompt, methods=["POST"]),
        Route("/previews/{client_id}/{prompt_id}/{node}", get_preview, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
        *proxy_routes(),
        *upload_routes(),
        *page_routes(),
    ]


def create_app(config: RelayConfig | None = None) -> Starlette:
    """Build the relay app. Nothing starts until the lifespan runs.

    Raises:
        WorkflowError: a workflow file in the library is unusable.
    """
    config = config or RelayConfig.from_env()
    workflows = Library.load(Path(config.workflows_dir) if config.workflows_dir else default_folder())
    # Counters exist before the lifespan: the middleware counts from the first request.
    app_metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Lifespan]:
        async with open_relay(config, app_metrics, workflows) as state:
            log.info("relay started", comfyui=list(config.backend_entries), version=__version__)
            try:
                yield state
            finally:
                log.info("relay stopping")
        log.info("relay stopped")

    route_list = routes()
    middleware = [Middleware(Telemetry, metrics=app_metrics, routes=route_list)]
    if config.origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=["*"] if "*" in config.origins else list(config.origins),
                allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Client-Id", "X-Request-ID"],
                expose_headers=["X-Request-ID"],
                max_age=600,
            )
        )
    middleware += [Middleware(AccessControl, config=config, metrics=app_metrics), Middleware(RawSend)]
    return Starlette(
        routes=route_list,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=exception_handlers(),
    )
