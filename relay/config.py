"""The relay's settings: one frozen value read once from flags and the environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from relay.i18n import LANGUAGES

__all__ = ["DESCRIPTIONS", "ENV_NAMES", "ENV_ONLY", "SECRETS", "ConfigError", "RelayConfig"]

LogFormat = Literal["console", "json"]

# A token travels in headers, URLs and WebSocket subprotocols: it must be plain in all three.
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")


class ConfigError(ValueError):
    """A setting with a value the relay cannot use."""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything the relay can be told. Each field also reads from the environment (ENV_NAMES)."""

    comfyui_url: str = "http://127.0.0.1:8188"
    # Several ComfyUI backends: a comma-separated list of base URLs; an entry written
    # dns+http://name:port is a name (a headless Service) whose addresses are each a backend,
    # looked up again every backend_resolve_interval seconds. Set, it replaces comfyui_url.
    comfyui_urls: str = ""
    # How each prompt picks its backend: least-loaded (by queue, keeping a workflow where it
    # ran last) or round-robin.
    routing: str = "least-loaded"
    # Seconds between checks of each backend's health and queue (with several backends).
    backend_check_interval: float = 2.0
    # Seconds a backend may stay unreachable (not refusing: a refusal is final) before the
    # prompts it was running are reported lost.
    backend_lost_after: float = 10.0
    backend_resolve_interval: float = 10.0
    host: str = "127.0.0.1"
    port: int = 8190
    log_format: LogFormat = "console"
    log_level: str = "info"
    # Upstream sockets
    # Seconds an upstream socket stays open once no tab and no prompt needs it.
    upstream_grace: float = 30.0
    # Reconnect backoff: first delay, cap, and the share of random jitter.
    reconnect_initial: float = 0.25
    reconnect_max: float = 10.0
    reconnect_jitter: float = 0.3
    # How long POST /prompt waits for the upstream socket before answering 502.
    upstream_connect_timeout: float = 10.0
    # How long POST /prompt waits for a quiet upstream socket to answer a ping before it is
    # given up as silently dropped (and a new one opened).
    upstream_check_timeout: float = 3.0
    # While prompts are active and the upstream is silent this long, check /history.
    stall_check_interval: float = 15.0
    # While prompts are detached (their socket was lost uncleanly, relay.routing), how often
    # ComfyUI is asked whether they ended, besides at every queue change it announces.
    detached_poll_interval: float = 2.0
    # HTTP client to ComfyUI
    http_connect_timeout: float = 5.0
    http_read_timeout: float = 60.0
    http_max_connections: int = 100
    # Limits
    # Events kept per client for resuming with ?since=.
    ring_size: int = 2048
    # Seconds an idle client's session (its events, for resuming) is kept after its last tab
    # left and its last prompt ended.
    session_ttl: float = 600.0
    # Seconds between full passes of Python's cycle collector (0: leave it to the collector).
    gc_interval: float = 60.0
    # Shared state: each client's events also go to a Redis Stream, so a tab can resume after
    # the relay restarts ('': in memory only).
    redis_url: str = ""
    # How long a client's stream in Redis outlives its last event, seconds.
    redis_event_ttl: float = 3600.0
    # With Redis, one relay holds each client's ComfyUI socket under a lease of this many
    # seconds, renewed a few times per period; another takes over within about this long.
    lease_ttl: float = 5.0
    # Where the other relays reach this one (for requests about clients it holds); '' for
    # http://<this host's address>:<port>.
    advertise_url: str = ""
    # Frames a subscriber may have queued before progress coalesces and, at worst, it is closed.
    subscriber_queue: int = 512
    max_prompt_bytes: int = 16 * 1024 * 1024
    # ComfyUI's own default limit is 100 MB.
    max_upload_bytes: int = 100 * 1024 * 1024
    max_client_frame: int = 64 * 1024
    # Seconds between keepalive pings to each browser socket (0 turns them off). Dead tabs
    # behind proxies are only noticed through these.
    ws_ping_interval: float = 20.0
    # Latest previews kept per client for GET /previews/...
    preview_slots: int = 16
    # Public path prefix under which file URLs in events are served.
    public_prefix: str = ""
    # Workflows: the folder of workflow files ("" for the project's workflows/), and the
    # language of step names (a tab may ask for another with ?lang=).
    workflows_dir: str = ""
    language: str = "ko"
    # Where learned step durations (for eta) are kept: "default" for the user's state folder
    # (~/.local/state/comfy-relay/durations.json), "" to keep them in memory only.
    eta_file: str = "default"
    # Access control (off by default)
    # A shared secret every request and socket must carry ("" for none); /healthz, /readyz,
    # /metrics and the page's static files stay open.
    token: str = ""
    # Browser origins allowed to open /ws, send state-changing requests and read answers
    # (CORS), comma-separated; "*" for any. Empty: only the relay's own origin.
    allowed_origins: str = ""
    # Limits on connections
    # Browser sockets in total, and per client id (tabs sharing one id); over either: 4429.
    max_connections: int = 10_000
    max_connections_per_client: int = 64
    # HTTP requests in progress at once; over it: 429 (probes and metrics are not counted).
    max_http_requests: int = 1_000
    # Operations
    # Seconds /readyz waits for ComfyUI before calling it unreachable.
    ready_timeout: float = 2.0
    # Seconds open requests and sockets get to finish on shutdown (SIGTERM) before being cut.
    shutdown_grace: int = 10
    # Results in S3-compatible storage (relay.storage); off while s3_bucket is empty.
    s3_bucket: str = ""
    # The S3 API the relay writes to ('' for AWS at s3_region), and the one presigned URLs
    # name, for browsers that reach the storage under another address ('': s3_endpoint).
    s3_endpoint: str = ""
    s3_public_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # Keys are {prefix}/{client_id}/{prompt_id}/{filename}.
    s3_prefix: str = "comfy-relay"
    # Bucket in the path (RustFS, MinIO, SeaweedFS, Garage), not in the host name.
    s3_path_style: bool = True
    # Which prompts' outputs are stored: "request" (those that ask, through extra_data.store
    # or their workflow's "store") or "all".
    s3_store: str = "request"
    s3_url_expiry: int = 3600
    # Multipart part size, bytes; the memory a file in transfer takes is about twice it.
    s3_part_size: int = 8 * 1024 * 1024
    # Tries per file, the first delay between them (doubling, with jitter), and files at once.
    s3_attempts: int = 5
    s3_backoff: float = 1.0
    s3_concurrency: int = 4
    # Webhooks (relay.webhooks): the Standard Webhooks signing secret ("whsec_" and base64),
    # a URL told of every prompt, and the hosts a prompt may name in extra_data.webhook_url.
    webhook_secret: str = ""
    webhook_url: str = ""
    webhook_allowed_hosts: str = ""
    # Also send each step's start and end (prompt.step), not only prompt.done and prompt.stored.
    webhook_steps: bool = False
    webhook_attempts: int = 8
    webhook_backoff: float = 2.0
    webhook_timeout: float = 10.0
    # A JSON Lines file that keeps each delivery given up on, payload included ('': log only).
    webhook_dead_letter: str = ""

    def __post_init__(self) -> None:
        if not self.comfyui_url.startswith(("http://", "https://")):
            raise ConfigError(f"COMFYUI_URL must be an http(s) URL, not {self.comfyui_url!r}")
        self._check_backends()
        if self.log_format not in ("console", "json"):
            raise ConfigError(f"RELAY_LOG_FORMAT must be console or json, not {self.log_format!r}")
        for name in (
            "upstream_grace",
            "reconnect_initial",
            "reconnect_max",
            "upstream_connect_timeout",
            "session_ttl",
            "gc_interval",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.detached_poll_interval <= 0 or self.upstream_check_timeout <= 0:
            raise ConfigError("detached_poll_interval and upstream_check_timeout must be positive")
        if self.language not in LANGUAGES:
            raise ConfigError(f"RELAY_LANGUAGE must be one of {', '.join(LANGUAGES)}, not {self.language!r}")
        if self.ring_size < 1 or self.subscriber_queue < 8:
            raise ConfigError("ring_size must be at least 1 and subscriber_queue at least 8")
        if self.token and not _TOKEN.fullmatch(self.token):
            raise ConfigError(
                "RELAY_TOKEN must be at least 16 characters of A-Z, a-z, 0-9, '.', '_', '~' and '-' "
                "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        for origin in self.origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/?#\s]+", origin):
                raise ConfigError(
                    f"RELAY_ALLOWED_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path)"
                )
        for name in ("max_connections", "max_connections_per_client", "max_http_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.redis_url and not re.match(r"(rediss?|unix)://", self.redis_url):
            raise ConfigError("RELAY_REDIS_URL must be a redis://, rediss:// or unix:// URL")
        if self.redis_event_ttl <= 0:
            raise ConfigError("redis_event_ttl must be positive")
        if not 0.2 <= self.lease_ttl <= 300:
            raise ConfigError("lease_ttl must be between 0.2 and 300 seconds")
        if self.advertise_url and not re.fullmatch(r"https?://[^/?#\s]+", self.advertise_url):
            raise ConfigError("RELAY_ADVERTISE_URL must be scheme://host[:port], no path")
        if self.ready_timeout <= 0 or self.shutdown_grace < 0:
            raise ConfigError("ready_timeout must be positive and shutdown_grace not negative")
        self._check_storage()
        self._check_webhooks()

    def _check_backends(self) -> None:
        for entry in self.backend_entries:
            if not re.fullmatch(r"(dns\+)?https?://([A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?", entry):
                raise ConfigError(
                    f"RELAY_COMFYUI_URLS: {entry!r} is not scheme://host:port (or dns+http://name:port)"
                )
        if self.comfyui_urls and not self.backend_entries:
            raise ConfigError("RELAY_COMFYUI_URLS names no backend")
        if self.routing not in ("least-loaded", "round-robin"):
            raise ConfigError(f"RELAY_ROUTING must be least-loaded or round-robin, not {self.routing!r}")
        if (
            min(self.backend_check_interval, self.backend_resolve_interval) <= 0
            or self.backend_lost_after < 0
        ):
            raise ConfigError("backend_check_interval and backend_resolve_interval must be positive, "
                              "backend_lost_after not negative")  # fmt: skip

    @property
    def backend_entries(self) -> tuple[str, ...]:
        """The ComfyUI backends as configured: RELAY_COMFYUI_URLS, else COMFYUI_URL alone."""
        if not self.comfyui_urls:
            return (self.comfyui_url.rstrip("/"),)
        return tuple(item.strip().rstrip("/") for item in self.comfyui_urls.split(",") if item.strip())

    @property
    def pooled(self) -> bool:
        """Whether prompts are routed among backends (more than one, or a name to look up)."""
        entries = self.backend_entries
        return len(entries) > 1 or any(entry.startswith("dns+") for entry in entries)

    def _check_storage(self) -> None:
        for name in ("s3_endpoint", "s3_public_endpoint"):
            value = getattr(self, name)
            if value and not re.fullmatch(r"https?://[^/?#\s]+/?", value):
                raise ConfigError(f"RELAY_{name.upper()} must be scheme://host[:port], no path")
        if self.s3_store not in ("request", "all"):
            raise ConfigError(f"RELAY_S3_STORE must be request or all, not {self.s3_store!r}")
        if self.s3_bucket and bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ConfigError("RELAY_S3_ACCESS_KEY_ID and RELAY_S3_SECRET_ACCESS_KEY go together")
        if not 1 <= self.s3_url_expiry <= 7 * 24 * 3600:
            raise ConfigError("s3_url_expiry must be between 1 second and 7 days (S3's limit)")
        if not 5 * 1024 * 1024 <= self.s3_part_size <= 512 * 1024 * 1024:
            raise ConfigError("s3_part_size must be between 5 MiB (S3's smallest part) and 512 MiB")
        if self.s3_attempts < 1 or self.s3_concurrency < 1 or self.s3_backoff < 0:
            raise ConfigError("s3_attempts and s3_concurrency must be at least 1, s3_backoff not negative")
        prefix = self.s3_prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ConfigError("RELAY_S3_PREFIX must not hold empty, '.' or '..' segments")

    def _check_webhooks(self) -> None:
        wanted = self.webhook_url or self.webhook_allowed_hosts
        if wanted and not self.webhook_secret:
            raise ConfigError(
                "webhooks need RELAY_WEBHOOK_SECRET (whsec_ and a base64 key of 24 bytes or more)"
            )
        if self.webhook_secret:
            from relay.webhooks import SecretError, signing_key  # noqa: PLC0415 - config is imported first

            try:
                signing_key(self.webhook_secret)
            except SecretError as exc:
                raise ConfigError(f"RELAY_WEBHOOK_SECRET: {exc}") from None
        if self.webhook_url and not re.fullmatch(r"https?://[^\s#]+", self.webhook_url):
            raise ConfigError("RELAY_WEBHOOK_URL must be an http(s) URL")
        if self.webhook_attempts < 1 or self.webhook_backoff < 0 or self.webhook_timeout <= 0:
            raise ConfigError("webhook_attempts must be at least 1, webhook_backoff not negative, "
                              "webhook_timeout positive")  # fmt: skip

    @property
    def webhook_hosts(self) -> tuple[str, ...]:
        """The hosts a prompt's webhook_url may name, lower-cased."""
        return tuple(item.strip().lower() for item in self.webhook_allowed_hosts.split(",") if item.strip())

    @property
    def origins(self) -> tuple[str, ...]:
        """The allowed browser origins, lower-cased, without trailing slashes."""
        return tuple(
            item.strip().rstrip("/").lower() for item in self.allowed_origins.split(",") if item.strip()
        )

    @property
    def comfyui_ws_url(self) -> str:
        base = self.comfyui_url.rstrip("/")
        return "ws" + base.removeprefix("http") + "/ws"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RelayConfig:
        """Defaults, then the environment, then explicit overrides (command-line flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            env_name = ENV_NAMES.get(f.name)
            if env_name is None or env_name not in environ:
                continue
            raw = environ[env_name]
            default = f.default
            try:
                if isinstance(default, bool):
                    values[f.name] = raw.lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ConfigError(f"{env_name}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# One line per setting, for `comfy-relay serve --help` and docs/deploy.md.
DESCRIPTIONS: dict[str, str] = {
    "comfyui_url": "base URL of the ComfyUI server",
    "comfyui_urls": "several ComfyUI servers, comma-separated; dns+http://name:port: each address of a name",
    "routing": "how a prompt picks its backend: least-loaded or round-robin",
    "backend_check_interval": "seconds between health and queue checks of each backend",
    "backend_lost_after": "seconds a backend may be unreachable before its running prompts count as lost",
    "backend_resolve_interval": "seconds between lookups of a dns+ backend name",
    "host": "address to listen on",
    "port": "port to listen on",
    "log_format": "console (for people) or json (one object per line)",
    "log_level": "debug, info, warning or error",
    "upstream_grace": "seconds an unused upstream socket stays open",
    "reconnect_initial": "first reconnect delay in seconds (doubles each attempt)",
    "reconnect_max": "longest reconnect delay in seconds",
    "reconnect_jitter": "random share added to or taken from each delay (0-1)",
    "upstream_connect_timeout": "seconds POST /prompt waits for the upstream socket before 502",
    "upstream_check_timeout": "seconds POST /prompt waits for a quiet upstream socket to answer a ping",
    "stall_check_interval": "seconds of upstream silence, while prompts run, before checking /history",
    "detached_poll_interval": "seconds between checks on prompts whose socket was lost uncleanly",
    "http_connect_timeout": "connect timeout for HTTP requests to ComfyUI, seconds",
    "http_read_timeout": "read timeout for HTTP requests to ComfyUI, seconds",
    "http_max_connections": "most HTTP connections to ComfyUI at once",
    "ring_size": "events kept per client for resuming with ?since=",
    "session_ttl": "seconds an idle client's events are kept for resuming after its last tab left",
    "gc_interval": "seconds between full passes of the cycle collector (0: leave it to Python)",
    "redis_url": "Redis for shared state: several replicas, resumes across restarts ('': memory only)",
    "redis_event_ttl": "seconds a client's event stream stays in Redis after its last event",
    "lease_ttl": "seconds a relay holds a client's ComfyUI socket without renewing (with Redis)",
    "advertise_url": "where the other relays reach this one ('': http://<host address>:<port>)",
    "subscriber_queue": "frames a tab may have waiting before it counts as too slow",
    "max_prompt_bytes": "largest POST /prompt body, bytes",
    "max_upload_bytes": "largest upload (/upload/image, /upload/mask), bytes",
    "max_client_frame": "largest WebSocket frame a browser may send, bytes",
    "ws_ping_interval": "seconds between keepalive pings to browser sockets (0: none)",
    "preview_slots": "live preview images kept per client",
    "public_prefix": "path prefix of the relay's own URLs in events (behind a path-routing ingress)",
    "workflows_dir": "folder of workflow files (default: the project's workflows/)",
    "language": "language of step names: ko or en (a tab may ask for another with ?lang=)",
    "eta_file": "file keeping learned step durations ('default': the user's state folder; '': none)",
    "token": "shared secret required on every request and socket ('': no token)",
    "allowed_origins": "browser origins allowed for /ws and CORS, comma-separated ('*': any, '': own)",
    "max_connections": "most browser sockets in total",
    "max_connections_per_client": "most browser sockets per client id",
    "max_http_requests": "most HTTP requests in progress at once (more get 429)",
    "ready_timeout": "seconds /readyz waits for ComfyUI",
    "shutdown_grace": "seconds requests and sockets get to finish on shutdown",
    "s3_bucket": "bucket that prompts' output files are copied to ('': no storage)",
    "s3_endpoint": "S3 API the relay writes to, scheme://host:port ('': AWS in s3_region)",
    "s3_public_endpoint": "S3 API that presigned URLs name, for browsers ('': s3_endpoint)",
    "s3_region": "region of the bucket (signing)",
    "s3_access_key_id": "access key id for the bucket (from a Secret)",
    "s3_secret_access_key": "secret access key for the bucket (from a Secret)",
    "s3_prefix": "key prefix: {prefix}/{client_id}/{prompt_id}/{filename}",
    "s3_path_style": "bucket in the URL path (RustFS, MinIO, SeaweedFS), not the host name",
    "s3_store": "which prompts are stored: request (extra_data.store or the workflow's store) or all",
    "s3_url_expiry": "seconds a presigned URL in relay.stored stays valid",
    "s3_part_size": "multipart part size in bytes (memory per file in transfer is about twice it)",
    "s3_attempts": "tries per file before it is reported failed",
    "s3_backoff": "first delay between tries, seconds (doubles each try, with jitter)",
    "s3_concurrency": "files copied to storage at once",
    "webhook_secret": "Standard Webhooks signing secret, whsec_<base64> (from a Secret)",
    "webhook_url": "URL told of every prompt's end ('': none)",
    "webhook_allowed_hosts": "hosts extra_data.webhook_url may name, comma-separated (*.x.com: subdomains)",
    "webhook_steps": "send prompt.step for each step's start and end too",
    "webhook_attempts": "tries per delivery before it goes to the dead-letter log",
    "webhook_backoff": "first delay between tries, seconds (doubles each try, with jitter)",
    "webhook_timeout": "seconds a receiver has to answer one try",
    "webhook_dead_letter": "JSON Lines file of deliveries given up on ('': the log only)",
}

ENV_NAMES: dict[str, str] = {
    "comfyui_url": "COMFYUI_URL",
    "comfyui_urls": "RELAY_COMFYUI_URLS",
    "routing": "RELAY_ROUTING",
    "backend_check_interval": "RELAY_BACKEND_CHECK_INTERVAL",
    "backend_lost_after": "RELAY_BACKEND_LOST_AFTER",
    "backend_resolve_interval": "RELAY_BACKEND_RESOLVE_INTERVAL",
    "host": "RELAY_HOST",
    "port": "RELAY_PORT",
    "log_format": "RELAY_LOG_FORMAT",
    "log_level": "RELAY_LOG_LEVEL",
    "upstream_grace": "RELAY_UPSTREAM_GRACE",
    "reconnect_initial": "RELAY_RECONNECT_INITIAL",
    "reconnect_max": "RELAY_RECONNECT_MAX",
    "reconnect_jitter": "RELAY_RECONNECT_JITTER",
    "upstream_connect_timeout": "RELAY_UPSTREAM_CONNECT_TIMEOUT",
    "upstream_check_timeout": "RELAY_UPSTREAM_CHECK_TIMEOUT",
    "stall_check_interval": "RELAY_STALL_CHECK_INTERVAL",
    "detached_poll_interval": "RELAY_DETACHED_POLL_INTERVAL",
    "http_connect_timeout": "RELAY_HTTP_CONNECT_TIMEOUT",
    "http_read_timeout": "RELAY_HTTP_READ_TIMEOUT",
    "http_max_connections": "RELAY_HTTP_MAX_CONNECTIONS",
    "ring_size": "RELAY_RING_SIZE",
    "session_ttl": "RELAY_SESSION_TTL",
    "gc_interval": "RELAY_GC_INTERVAL",
    "redis_url": "RELAY_REDIS_URL",
    "redis_event_ttl": "RELAY_REDIS_EVENT_TTL",
    "lease_ttl": "RELAY_LEASE_TTL",
    "advertise_url": "RELAY_ADVERTISE_URL",
    "subscriber_queue": "RELAY_SUBSCRIBER_QUEUE",
    "max_prompt_bytes": "RELAY_MAX_PROMPT_BYTES",
    "max_upload_bytes": "RELAY_MAX_UPLOAD_BYTES",
    "max_client_frame": "RELAY_MAX_CLIENT_FRAME",
    "ws_ping_interval": "RELAY_WS_PING_INTERVAL",
    "preview_slots": "RELAY_PREVIEW_SLOTS",
    "public_prefix": "RELAY_PUBLIC_PREFIX",
    "workflows_dir": "RELAY_WORKFLOWS_DIR",
    "language": "RELAY_LANGUAGE",
    "eta_file": "RELAY_ETA_FILE",
    "token": "RELAY_TOKEN",
    "allowed_origins": "RELAY_ALLOWED_ORIGINS",
    "max_connections": "RELAY_MAX_CONNECTIONS",
    "max_connections_per_client": "RELAY_MAX_CONNECTIONS_PER_CLIENT",
    "max_http_requests": "RELAY_MAX_HTTP_REQUESTS",
    "ready_timeout": "RELAY_READY_TIMEOUT",
    "shutdown_grace": "RELAY_SHUTDOWN_GRACE",
    **{name: f"RELAY_{name.upper()}" for name in DESCRIPTIONS if name.startswith(("s3_", "webhook_"))},
}

# Settings read from the environment only (a Kubernetes Secret), never a command-line flag that
# any process on the host can read; the token keeps its flag from before this rule.
SECRETS = frozenset({"token", "s3_access_key_id", "s3_secret_access_key", "webhook_secret"})
ENV_ONLY = SECRETS - {"token"}
