"""Several backends' answers as one: ``/queue``, ``/history`` and ``/api/jobs`` across them.

Each prompt keeps ComfyUI's shape and gains its backend's name: a queue or history item's
``extra_data.backend``, a job's ``backend``. Queue numbers are each backend's own counter, so
the run order is per backend: running prompts first, then each backend's waiting prompts in
the order that backend will run them. Pure functions over parsed JSON; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["merge_history", "merge_jobs", "merge_queue"]


def _label(item: Any, backend: str) -> None:
    """Name the backend in a queue item's extra_data (``[number, id, graph, extra_data, ...]``)."""
    if isinstance(item, list) and len(item) > 3 and isinstance(item[3], dict):
        item[3]["backend"] = backend


def _number(item: Any) -> float:
    if (
        isinstance(item, list)
        and item
        and isinstance(item[0], (int, float))
        and not isinstance(item[0], bool)
    ):
        return float(item[0])
    return float("inf")


def merge_queue(answers: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """``answers``: (backend, its state, its ``/queue`` body or None when it did not answer)."""
    running: list[Any] = []
    pending: list[Any] = []
    summary: dict[str, Any] = {}
    for name, state, body in answers:
        if not isinstance(body, dict):
            summary[name] = {"state": state, "answered": False, "queue_running": [], "queue_pending": []}
            continue
        mine_running = [i for i in body.get("queue_running") or [] if isinstance(i, list)]
        mine_pending = sorted(
            (i for i in body.get("queue_pending") or [] if isinstance(i, list)), key=_number
        )
        for item in (*mine_running, *mine_pending):
            _label(item, name)
        running += mine_running
        pending += mine_pending
        summary[name] = {
            "state": state,
            "answered": True,
            "queue_running": [str(i[1]) for i in mine_running if len(i) > 1],
            "queue_pending": [str(i[1]) for i in mine_pending if len(i) > 1],
        }
    return {"queue_running": running, "queue_pending": pending, "backends": summary}


def _started(entry: Any) -> float:
    """When a history entry's run started (its execution_start message), for ordering."""
    status = entry.get("status") if isinstance(entry, dict) else None
    messages = status.get("messages") if isinstance(status, dict) else None
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, list) and len(message) > 1 and isinstance(message[1], dict):
            stamp = message[1].get("timestamp")
            if isinstance(stamp, (int, float)):
                return float(stamp)
    return 0.0


def merge_history(answers: Sequence[tuple[str, Any]], max_items: int | None = None) -> dict[str, Any]:
    """``answers``: (backend, its ``/history`` body); oldest run first, as ComfyUI orders it,
    and the newest ``max_items`` when given."""
    entries: list[tuple[float, int, str, Any]] = []
    for rank, (name, body) in enumerate(answers):
        if not isinstance(body, dict):
            continue
        for prompt_id, entry in body.items():
            if isinstance(entry, dict):
                _label(entry.get("prompt"), name)
            entries.append((_started(entry), rank, prompt_id, entry))
    entries.sort(key=lambda item: (item[0], item[1]))
    if max_items is not None and max_items >= 0:
        entries = entries[len(entries) - max_items :] if max_items else []
    return {prompt_id: entry for _, _, prompt_id, entry in entries}


def merge_jobs(
    answers: Sequence[tuple[str, Any]], *, sort_by: str, descending: bool, offset: int, limit: int | None
) -> dict[str, Any]:
    """``answers``: (backend, its ``/api/jobs`` body, asked from offset 0 for offset + limit
    jobs); one page of them all in the order asked for."""
    jobs: list[dict[str, Any]] = []
    total = 0
    for name, body in answers:
        if not isinstance(body, dict):
            continue
        pagination = body.get("pagination")
        listed = [job for job in body.get("jobs") or [] if isinstance(job, dict)]
        counted = pagination.get("total") if isinstance(pagination, dict) else None
        total += counted if isinstance(counted, int) else len(listed)
        jobs += [{**job, "backend": name} for job in listed]

    def key(job: dict[str, Any]) -> float:
        if sort_by == "execution_duration":
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            ok = isinstance(start, (int, float)) and isinstance(end, (int, float))
            return float(end - start) if ok and start and end else 0.0
        created = job.get("create_time")
        return float(created) if isinstance(created, (int, float)) else 0.0

    jobs.sort(key=key, reverse=descending)
    page = jobs[offset:] if limit is None else jobs[offset : offset + limit]
    return {
        "jobs": page,
        "pagination": {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(page) < total,
        },
    }
