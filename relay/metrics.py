"""The relay's Prometheus metrics, served at ``GET /metrics``.

Each app has its own registry (no process-wide state: tests run several relays in one
process). Counters and histograms are updated where things happen; what is a state rather
than an event (connections, upstream sockets by state, queue depths) is a :class:`LiveState`
that the sessions report when Prometheus scrapes, so the hot paths pay nothing for it. This
module knows nothing of sessions or sockets: it only names and renders figures.

No label carries a client id or prompt id: label values come from small fixed sets (event
types, statuses, route templates) and the workflow names in ``workflows/``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from relay import __version__

__all__ = ["CONTENT_TYPE", "LiveState", "Metrics", "workflow_label"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The label of prompts submitted as a bare graph rather than through a known workflow.
CUSTOM_GRAPH = "custom"

_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PROMPT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def workflow_label(name: Any) -> str:
    return name if isinstance(name, str) and name else CUSTOM_GRAPH


@dataclass(slots=True)
class LiveState:
    """What is open and running now, as the sessions count it at a scrape."""

    connections: dict[str, int] = field(default_factory=lambda: {"relay": 0, "comfy": 0, "all": 0})
    upstreams: dict[str, int] = field(default_factory=lambda: {"connecting": 0, "connected": 0, "down": 0})
    prompts: dict[str, int] = field(default_factory=lambda: {"queued": 0, "running": 0})
    # With Redis: clients this relay holds (its ComfyUI socket, its events), or follows.
    roles: dict[str, int] = field(default_factory=lambda: {"owner": 0, "follower": 0})
    clients: int = 0
    queued_frames: int = 0
    deepest_queue: int = 0
    coalesced: int = 0
    dropped: int = 0


class Metrics:
    """Every metric of one relay, and the scrape-time view of its sessions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        Gauge("relay_info", "The relay's version", ["version"], registry=registry).labels(__version__).set(1)
        # The process's memory, open file descriptors and CPU (process_*), and the cycle
        # collector's passes (python_gc_*), for leak watching.
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        self.events = Counter(
            "relay_events_total", "Relay events published to clients, by type", ["type"], registry=registry
        )
        self.comfy_frames = Counter(
            "relay_comfyui_frames_total",
            "Frames received on upstream ComfyUI sockets, by kind",
            ["kind"],
            registry=registry,
        )
        self.comfy_text = self.comfy_frames.labels("text")
        self.comfy_binary = self.comfy_frames.labels("binary")
        self.comfy_unknown = Counter(
            "relay_comfyui_unknown_messages_total",
            "JSON messages from ComfyUI of a type the relay does not know (passed to raw subscribers)",
            registry=registry,
        )
        self.resumes = Counter(
            "relay_resumes_total",
            "Sockets that asked to resume with since=: replayed, or a gap (answered with snapshots)",
            ["result"],
            registry=registry,
        )
        self.replayed = Counter(
            "relay_replayed_events_total", "Events replayed to resuming sockets", registry=registry
        )
        self.prompts = Counter(
            "relay_prompts_total",
            "Prompts that ended, by terminal status and workflow",
            ["status", "workflow"],
            registry=registry,
        )
        self.prompt_seconds = Histogram(
            "relay_prompt_duration_seconds",
            "Time from a prompt's start to its end, by workflow",
            ["workflow"],
            buckets=_PROMPT_BUCKETS,
            registry=registry,
        )
        self.step_seconds = Histogram(
            "relay_step_duration_seconds",
            "Time each executed step took, by workflow",
            ["workflow"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        )
        self.http_requests = Counter(
            "relay_http_requests_total",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "relay_http_request_duration_seconds",
            "Time to answer HTTP requests (to the last byte), by route template",
            ["route"],
            buckets=_HTTP_BUCKETS,
            registry=registry,
        )
        self.http_bytes = Counter(
            "relay_http_bytes_total",
            "Body bytes through the relay's HTTP routes, by route and direction (in: from clients)",
            ["route", "direction"],
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "relay_webhook_deliveries_total",
            "Webhook tries by outcome: delivered, retried (a try failed, another follows), dead",
            ["outcome"],
            registry=registry,
        )
        self.stored_files = Counter(
            "relay_stored_files_total",
            "Output files copied to S3-compatible storage, by outcome (stored, failed) and retries",
            ["outcome"],
            registry=registry,
        )
        self.stored_bytes = Counter(
            "relay_stored_bytes_total", "Bytes of output files copied to storage", registry=registry
        )
        self.store_seconds = Histogram(
            "relay_store_duration_seconds",
            "Time from a prompt's relay.done to each of its files stored",
            buckets=_PROMPT_BUCKETS,
            registry=registry,
        )
        self.upstream_reconnects = Counter(
            "relay_upstream_reconnects_total",
            "Upstream ComfyUI sockets opened again after being lost",
            registry=registry,
        )
        self.upstream_failures = Counter(
            "relay_upstream_failures_total",
            "Upstream ComfyUI sockets lost or failed to open",
            registry=registry,
        )
        self.takeovers = Counter(
            "relay_cluster_takeovers_total",
            "Clients this relay took over with prompts in flight that another relay had followed",
            registry=registry,
        )
        self.detached = Counter(
            "relay_prompts_detached_total",
            "Prompts no longer followed live after their ComfyUI socket was lost uncleanly "
            "(ended from ComfyUI's history instead)",
            registry=registry,
        )
        self.refused = Counter(
            "relay_refused_total",
            "Requests and sockets refused by access rules or limits, by reason",
            ["reason"],
            registry=registry,
        )
        self.comfyui_up = Gauge(
            "relay_comfyui_up", "Whether ComfyUI answered the last readiness check", registry=registry
        )
        # Several backends (relay.backends): each one's state, queue and the prompts routed to it.
        self.backend_state = Gauge(
            "relay_backend_state",
            "Each ComfyUI backend's state (1 for the state it is in): up, down or draining",
            ["backend", "state"],
            registry=registry,
        )
        self.backend_queue = Gauge(
            "relay_backend_queue",
            "Prompts in each backend's queue, running included, as it last said",
            ["backend"],
            registry=registry,
        )
        self.backend_in_flight = Gauge(
            "relay_backend_in_flight",
            "Prompts this relay routed to each backend that have not ended",
            ["backend"],
            registry=registry,
        )
        self.backend_prompts = Counter(
            "relay_backend_prompts_total",
            "Prompts routed to each backend",
            ["backend"],
            registry=registry,
        )
        self.backend_lost = Counter(
            "relay_backend_lost_total",
            "Times a backend went away with prompts running on it (they were reported lost)",
            ["backend"],
            registry=registry,
        )
        self._event_children: dict[str, Any] = {}
        # What subscribers that have gone counted; live ones are added at scrape time.
        self.retired_coalesced = 0
        self.retired_dropped = 0
        self.slow_closed = 0

    def watch(self, live: Callable[[], LiveState]) -> None:
        """Report what ``live`` counts at every scrape."""
        self.registry.register(_LiveCollector(self, live))

    def event(self, event_type: str) -> None:
        child = self._event_children.get(event_type)
        if child is None:
            child = self._event_children[event_type] = self.events.labels(event_type)
        child.inc()

    def retire(self, *, coalesced: int, dropped: int, overflowed: bool) -> None:
        """A socket closed: keep what its queue counted."""
        self.retired_coalesced += coalesced
        self.retired_dropped += dropped
        self.slow_closed += overflowed

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the loop
        return 0


class _LiveCollector:
    """Gauges read from a LiveState when Prometheus scrapes."""

    def __init__(self, metrics: Metrics, live: Callable[[], LiveState]) -> None:
        self._metrics = metrics
        self._live = live

    def collect(self) -> Iterator[Metric]:
        live = self._live()
        connections = GaugeMetricFamily(
            "relay_browser_connections",
            "Open browser sockets, by the events they asked for",
            labels=["events"],
        )
        upstreams = GaugeMetricFamily(
            "relay_upstream_sockets", "Upstream ComfyUI sockets, by state", labels=["state"]
        )
        prompts = GaugeMetricFamily(
            "relay_active_prompts", "Prompts the relay is following, by phase", labels=["phase"]
        )
        for mode, count in live.connections.items():
            connections.add_metric([mode], count)
        for state, count in live.upstreams.items():
            upstreams.add_metric([state], count)
        for phase, count in live.prompts.items():
            prompts.add_metric([phase], count)
        roles = GaugeMetricFamily(
            "relay_cluster_clients",
            "With Redis: clients this relay holds (owner) or serves from another's stream (follower)",
            labels=["role"],
        )
        for role, count in live.roles.items():
            roles.add_metric([role], count)
        yield roles
        yield connections
        yield upstreams
        yield prompts
        yield GaugeMetricFamily(
            "relay_clients", "Client ids with a session on this relay", value=live.clients
        )
        yield GaugeMetricFamily(
            "relay_asyncio_tasks", "Tasks alive in the relay's event loop", value=_tasks()
        )
        yield GaugeMetricFamily(
            "relay_subscriber_queue_frames",
            "Frames waiting in all browser sockets' queues",
            value=live.queued_frames,
        )
        yield GaugeMetricFamily(
            "relay_subscriber_queue_frames_max",
            "Frames waiting in the fullest socket's queue",
            value=live.deepest_queue,
        )
        metrics = self._metrics
        yield CounterMetricFamily(
            "relay_events_coalesced",
            "Queued progress/preview frames replaced by a newer one for a slow socket",
            value=metrics.retired_coalesced + live.coalesced,
        )
        yield CounterMetricFamily(
            "relay_events_dropped",
            "Queued progress/preview frames dropped from a full socket queue",
            value=metrics.retired_dropped + live.dropped,
        )
        yield CounterMetricFamily(
            "relay_slow_sockets_closed",
            "Browser sockets closed (1013) because they fell too far behind",
            value=metrics.slow_closed,
        )
