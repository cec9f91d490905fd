"""``POST /prompt`` and the workflow library's routes: submitting a prompt so nothing is missed.

A prompt is registered with its client's translator, under the routing id of an upstream
socket just confirmed open, before ComfyUI sees it: no event of it can arrive unannounced.
ComfyUI's refusal passes back unchanged and leaves no trace; its acceptance is published as
``relay.queued`` with the steps the prompt will run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from relay.backends import affinity_of, input_names
from relay.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RelayError,
    UpstreamUnavailable,
    UpstreamUnreached,
)
from relay.events import Queued
from relay.i18n import Localized
from relay.metrics import workflow_label
from relay.plans import build_plan, failed_outputs
from relay.routing import CLIENT_ID, canonical_uuid, routed_prompt
from relay.sessions import ClientSession
from relay.state import Lifespan, RelayState
from relay.translator import Delivery
from relay.workflows import Workflow

# Longest POST /prompt waits, with Redis, for Redis to have the prompt before answering.
_DURABLE_WAIT = 2.0

__all__ = [
    "cancel_prompt",
    "get_workflow",
    "list_workflows",
    "post_prompt",
    "post_workflow_prompt",
]


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _workflow(request: Request[Lifespan]) -> Workflow:
    name = request.path_params["name"]
    workflow = request.state["relay"].workflows.get(name)
    if workflow is None:
        raise NotFound(f"no workflow named {name!r}")
    return workflow


async def _read_body(request: Request[Lifespan], limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_object(request: Request[Lifespan], limit: int) -> dict[str, Any]:
    raw = await _read_body(request, limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", "invalid_body")
    return body


def _client_id_of(request: Request[Lifespan], body: dict[str, Any]) -> str:
    """The client id from the body, else X-Client-Id, else ?clientId=; a new one if none."""
    for candidate in (
        body.get("client_id"),
        request.headers.get("x-client-id"),
        request.query_params.get("clientId"),
    ):
        if candidate is None or candidate == "":
            continue
        if not isinstance(candidate, str) or not CLIENT_ID.fullmatch(candidate):
            raise BadRequest("client_id must be 1-64 characters of A-Z, a-z, 0-9, _ and -", "bad_client_id")
        return candidate
    return uuid.uuid4().hex


def _prompt_id_of(body: dict[str, Any]) -> str:
    """The caller's prompt id, which must be a canonical UUID (ComfyUI 0.38 refuses others, and
    the relay matches ids exactly); a new one when none is given."""
    given = body.get("prompt_id")
    if given is None or given == "":
        return str(uuid.uuid4())
    if not canonical_uuid(given):
        raise BadRequest(
            "prompt_id must be a UUID in canonical lowercase hyphenated form; leave it out for one",
            "invalid_prompt_id",
        )
    return str(given)


async def cancel_prompt(request: Request[Lifespan]) -> Response:
    """POST /prompt/{prompt_id}/cancel: dequeue it if it waits, interrupt it if it runs.

    ``{"prompt_id", "cancelled"}``; ``cancelled`` is false when it had already ended or ComfyUI
    does not know it. A prompt taken out of the queue ends with ``relay.done`` ``cancelled``.
    """
    prompt_id = request.path_params["prompt_id"]
    if not canonical_uuid(prompt_id):
        raise BadRequest("the prompt id must be a canonical lowercase UUID", "invalid_prompt_id")
    state = request.state["relay"]
    backends = state.backends
    known = await backends.locate(prompt_id)
    cancelled = False
    # Where it was sent; a prompt this relay did not route is looked for on every backend up.
    for backend in (
        [known] if known is not None else (backends.up() if backends.pooled else [backends.first()])
    ):
        cancelled = await backend.comfy.cancel(prompt_id)
        if cancelled:
            break
    await state.sessions.settle_removed()
    return _json({"prompt_id": prompt_id, "cancelled": cancelled})


def _check_submission(body: dict[str, Any]) -> None:
    """Refuse what ComfyUI would answer with a bare 500 (it converts or indexes these fields
    without checking them): ``number`` must be a number, ``extra_data`` an object and
    ``partial_execution_targets`` a list of node ids.

    Raises:
        BadRequest: naming the field.
    """
    number = body.get("number")
    if "number" in body and (isinstance(number, bool) or not isinstance(number, (int, float))):
        raise BadRequest("'number' must be a number (the place in ComfyUI's queue)", "invalid_number")
    extra = body.get("extra_data")
    if extra is not None and not isinstance(extra, dict):  # null: none, as the relay always allowed
        raise BadRequest("'extra_data' must be an object", "invalid_extra_data")
    targets = body.get("partial_execution_targets")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise BadRequest("'partial_execution_targets' must be a list of node ids", "invalid_targets")


async def post_prompt(request: Request[Lifespan]) -> Response:
    state = request.state["relay"]
    body = await _json_object(request, state.config.max_prompt_bytes)
    if "prompt" not in body:
        raise BadRequest("no prompt: the body needs a 'prompt' object (an API-format graph)", "no_prompt")
    graph = body["prompt"]
    if not isinstance(graph, dict) or not all(isinstance(node, dict) for node in graph.values()):
        raise BadRequest("'prompt' must be an object of nodes (an API-format graph)", "invalid_prompt")
    workflow = state.workflows.recognise(graph, body.get("extra_data"))
    return await _submit(request, body, graph, workflow)


async def post_workflow_prompt(request: Request[Lifespan]) -> Response:
    """Fill a workflow's template with ``params`` and submit it as POST /prompt does."""
    state = request.state["relay"]
    workflow = _workflow(request)
    body = await _json_object(request, state.config.max_prompt_bytes)
    params = body.pop("params", {})
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object of parameter values", "bad_parameter")
    if "prompt" in body:
        raise BadRequest("the workflow is the graph: send 'params', not 'prompt'", "invalid_body")
    graph = workflow.fill(params)
    extra = body.get("extra_data")
    body["extra_data"] = {**(extra if isinstance(extra, dict) else {}), "workflow": workflow.name}
    body["prompt"] = graph
    return await _submit(request, body, graph, workflow)


def _step_names(workflow: Workflow | None, language: str) -> dict[str, Localized] | None:
    if workflow is None:
        return None
    return {node: Localized(texts, language) for node, texts in workflow.steps.items()}


async def _submit(
    request: Request[Lifespan], body: dict[str, Any], graph: dict[str, Any], workflow: Workflow | None
) -> Response:
    state = request.state["relay"]
    _check_submission(body)
    delivery = state.deliveries.check(
        body.get("extra_data"), workflow.store if workflow is not None else False
    )
    client_id = _client_id_of(request, body)
    prompt_id = _prompt_id_of(body)
    workflow_name = workflow.name if workflow is not None else None
    session = state.sessions.get(client_id)
    session.registering += 1
    try:
        await session.ready()
        cluster = state.sessions.cluster
        if cluster is not None and not session.owned:
            # Another relay holds this client's socket to ComfyUI: it submits.
            whole = orjson.dumps({**body, "client_id": client_id, "prompt_id": prompt_id})
            forwarded = await cluster.forward(request, session, path="/prompt", body=whole)
            if forwarded is not None:
                return forwarded
        sent = await _send(
            state,
            session,
            body=body,
            graph=graph,
            prompt_id=prompt_id,
            client_id=client_id,
            workflow=workflow,
            delivery=delivery,
        )
        if isinstance(sent, Response):
            return sent
        accepted = sent
        if session.backlog is not None:
            # With Redis, answer once Redis has the prompt: a relay that dies right after
            # leaves it to the next one (found by tests/faults: a prompt accepted a moment
            # before a SIGKILL was never reported). Redis slow or away: answer anyway.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DURABLE_WAIT):
                    await session.backlog.flushed(session.channel.assigned)
        answer_body = {**accepted, "client_id": client_id}
        if workflow_name is not None:
            answer_body["workflow"] = workflow_name
        return _json(answer_body)
    finally:
        session.registering -= 1


async def _send(
    state: RelayState,
    session: ClientSession,
    *,
    body: dict[str, Any],
    graph: dict[str, Any],
    prompt_id: str,
    client_id: str,
    workflow: Workflow | None,
    delivery: Delivery | None,
) -> dict[str, Any] | Response:
    """Route the prompt to a backend, register it, send it: ComfyUI's acceptance, or its
    refusal to pass back. With several backends, one that cannot be reached before the prompt
    left is taken out of routing and the next one is tried."""
    backends = state.backends
    names = _step_names(workflow, state.config.language)
    workflow_name = workflow.name if workflow is not None else None
    affinity = affinity_of(graph, workflow_name)
    inputs = input_names(graph)
    tried: list[str] = []
    while True:
        backend = backends.pick(affinity, inputs, avoid=tried)
        # Counted at once: prompts arriving together must see each other's load.
        backends.assign(backend, prompt_id, affinity)
        kept = False
        link = session.link(backend)
        link.registering += 1
        try:
            try:
                await session.ensure_upstream(link)
            except UpstreamUnavailable as exc:
                if not backends.pooled:
                    raise
                backends.failed(backend, exc.message)
                tried.append(backend.name)
                continue
            classes = {str(node.get("class_type")) for node in graph.values()}
            output_classes = await backend.comfy.output_classes(classes)
            targets = body.get("partial_execution_targets")
            plan = build_plan(graph, output_classes, targets=targets, names=names, workflow=workflow_name)
            plan = replace(plan, delivery=delivery)
            session.translator.register(prompt_id, plan, time.monotonic())
            forward = routed_prompt(
                {**body, "prompt_id": prompt_id}, client_id, session.route(prompt_id, link)
            )
            try:
                answer = await backend.comfy.post_prompt(forward)
            except RelayError as exc:
                session.translator.reject(prompt_id)
                session.unroute(prompt_id)
                if isinstance(exc, UpstreamUnreached) and backends.pooled:
                    backends.failed(backend, exc.message)  # the prompt never left: try another
                    tried.append(backend.name)
                    continue
                raise
            if answer.status != 200:
                session.translator.reject(prompt_id)
                session.unroute(prompt_id)
                state.metrics.prompts.labels("rejected", workflow_label(workflow_name)).inc()
                return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
            backends.sent(backend)
            kept = True
            accepted: dict[str, Any] = answer.json()
            skip = failed_outputs(accepted.get("node_errors"))
            if skip:
                plan = build_plan(
                    graph,
                    output_classes,
                    targets=targets,
                    skip_outputs=skip,
                    names=names,
                    workflow=workflow_name,
                )
                plan = replace(plan, delivery=delivery)
            translation = session.translator.accept(prompt_id, accepted.get("number"), time.monotonic(), plan)
            if backends.pooled:
                accepted["backend"] = backend.name
                translation.events = [
                    replace(e, backend=backend.name) if isinstance(e, Queued) else e
                    for e in translation.events
                ]
            session.apply(translation)
            return accepted
        finally:
            link.registering -= 1
            if not kept:
                backends.unassign(prompt_id)


async def list_workflows(request: Request[Lifespan]) -> Response:
    state = request.state["relay"]
    return _json(
        {
            "language": state.config.language,
            # Whether extra_data.store (and a workflow's "store") can keep results in storage.
            "storage": state.storage is not None,
            "workflows": [workflow.public() for workflow in state.workflows],
        }
    )


async def get_workflow(request: Request[Lifespan]) -> Response:
    workflow = _workflow(request)
    return _json({**workflow.public(), "graph": workflow.graph})
