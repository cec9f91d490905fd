"""Client ids, the routing ids the relay's sockets register under at ComfyUI, and answers mapped back.

ComfyUI keeps one socket per clientId and sends a prompt's events to the socket registered
under the prompt's ``client_id``. When a socket it still holds open finally closes, its cleanup
unregisters whatever socket holds that id by then (PROTOCOL.md §2). A relay that reconnected
under the same id while ComfyUI still held the old socket (a silent network drop: ComfyUI sends
no heartbeats and notices late) is left open but deaf.

So a relay socket never registers under the client's own id. Each one registers under a
routing id made of the client's id and a random part, and a new routing id is taken whenever
the relay cannot be sure ComfyUI has let go of the last socket (see ``relay.upstream``). Prompts
are submitted with the routing id of the socket open at the time, and the client's own id is
kept beside it in ``extra_data``, from where it is put back in the relay's answers from
``/queue`` and ``/history``: a front end sees the client id it used.
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Any

__all__ = ["CLIENT_ID", "CLIENT_KEY", "canonical_uuid", "restore_client_ids", "routed_prompt", "routing_id"]

# What a client id may be (a socket's ?clientId=, a prompt's client_id).
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Where the client's own id travels in a prompt's extra_data.
CLIENT_KEY = "relay_client_id"


def canonical_uuid(value: Any) -> bool:
    """A UUID as current ComfyUI wants prompt and job ids: lowercase and hyphenated. The relay
    matches ids exactly, so it holds every id to this too."""
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def routing_id(client_id: str) -> str:
    """A fresh ComfyUI clientId for one of ``client_id``'s sockets (never used before)."""
    # Client ids are [A-Za-z0-9_-], so the dot keeps the two parts apart for a reader of logs.
    return f"{client_id}.{secrets.token_hex(6)}"


def routed_prompt(body: dict[str, Any], client_id: str, sid: str) -> dict[str, Any]:
    """A POST /prompt body that ComfyUI routes to the socket registered as ``sid``."""
    extra = body.get("extra_data")
    extra_data = {**(extra if isinstance(extra, dict) else {}), CLIENT_KEY: client_id}
    return {**body, "client_id": sid, "extra_data": extra_data}


def _restore(extra: Any) -> None:
    if isinstance(extra, dict) and isinstance(extra.get(CLIENT_KEY), str):
        extra["client_id"] = extra.pop(CLIENT_KEY)


def restore_client_ids(answer: Any, *, shape: str) -> Any:
    """Put clients' own ids back into a ``/queue``, ``/history`` or ``/api/jobs/{id}`` answer,
    in place.

    ``shape`` is ``queue`` (``{"queue_running": [item], "queue_pending": [item]}``),
    ``history`` (``{prompt_id: {"prompt": item, ...}}``) or ``job`` (``{"workflow":
    {"extra_data": ...}, ...}``); an item is ComfyUI's ``[number, prompt_id, graph,
    extra_data, outputs]``. Anything else is left as it is.
    """
    if not isinstance(answer, dict):
        return answer
    if shape == "job":
        workflow = answer.get("workflow")
        if isinstance(workflow, dict):
            _restore(workflow.get("extra_data"))
        return answer
    if shape == "queue":
        items = [item for key in ("queue_running", "queue_pending") for item in answer.get(key) or []]
    else:
        items = [entry.get("prompt") for entry in answer.values() if isinstance(entry, dict)]
    for item in items:
        if isinstance(item, list) and len(item) > 3:
            _restore(item[3])
    return answer
