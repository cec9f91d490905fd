"""Webhooks: a back end hears how its prompts end without holding a socket open.

Deliveries follow the Standard Webhooks spec: a JSON body ``{"type", "timestamp", "data"}``
POSTed with ``webhook-id`` (the same on every try of one delivery, for the receiver to drop
duplicates), ``webhook-timestamp`` (Unix seconds of this try) and ``webhook-signature``
(``v1,`` then the base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` under the secret's key).

Nothing here blocks the relay: :meth:`Webhooks.send` only schedules. Each delivery is its own
task; a try that fails (no answer in ``webhook_timeout``, a status other than 2xx) is tried
again after a doubling, jittered delay, up to ``webhook_attempts`` tries, then written to the
dead-letter log (an error line, and the JSON Lines file ``webhook_dead_letter`` when set).
Redirects are not followed: a prompt's URL is checked against the allow-list, and a redirect
would take the request somewhere the list never said.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson
import structlog

from relay import __version__
from relay.tasks import wind_down

if TYPE_CHECKING:
    from relay.config import RelayConfig
    from relay.metrics import Metrics

__all__ = ["SecretError", "Webhooks", "host_allowed", "sign", "signing_key"]

log = structlog.get_logger("relay.webhooks")

# Deliveries waiting or under way at once; past it a new one goes straight to the dead letters.
MAX_PENDING = 10_000
# Tries at once, over every receiver.
_CONCURRENT = 32
# Longest delay between two tries, whatever the backoff doubles to (and a Retry-After asks).
_LONGEST_DELAY = 600.0
# Seconds a stopping relay gives deliveries under way before writing them off.
_CLOSE_GRACE = 5.0
_PREFIX = "whsec_"


class SecretError(ValueError):
    """A signing secret the relay cannot use."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after an optional ``whsec_``.

    Raises:
        SecretError: not base64, or a key shorter than 24 bytes (the spec asks for 24-64).
    """
    encoded = secret.removeprefix(_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("not base64 after 'whsec_'") from None
    if len(key) < 24:
        make = "import base64, secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())"
        raise SecretError(f'the key is under 24 bytes (make one: python3 -c "{make}")')
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one try."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def host_allowed(url: str, hosts: tuple[str, ...]) -> bool:
    """Whether ``url`` is http(s), carries no credentials, and names a host of the allow-list.

    An entry is a host name (``hooks.example.com``, any port), a host and port
    (``hooks.example.com:8443``), or ``*.example.com`` for its subdomains (not itself).
    """
    # Parsed by the client that will make the call, so the host checked is the host called; no
    # whitespace or control characters, which parsers disagree on (tests/fuzz).
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        return False
    try:
        parts = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    host = parts.host.lower().rstrip(".")
    if parts.scheme not in ("http", "https") or not host or parts.userinfo:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not 0 < port < 65536:
        return False
    for entry in hosts:
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Webhooks:
    """Signs and delivers webhook messages in the background, with retries and dead letters."""

    def __init__(
        self, config: RelayConfig, metrics: Metrics, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._key = signing_key(config.webhook_secret) if config.webhook_secret else None
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.webhook_timeout),
            follow_redirects=False,
            transport=transport,
            limits=httpx.Limits(max_connections=_CONCURRENT, max_keepalive_connections=8),
            headers={"user-agent": f"comfy-relay/{__version__}"},
        )
        self._slots = asyncio.Semaphore(_CONCURRENT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._dead_letter = Path(config.webhook_dead_letter) if config.webhook_dead_letter else None
        self._writing = asyncio.Lock()
        self.closed = False

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def send(self, url: str, kind: str, data: Mapping[str, Any]) -> str | None:
        """Schedule one message (``kind`` as its ``type``) to ``url``; its id, None when off."""
        if self._key is None:
            return None
        message_id = "msg_" + uuid.uuid4().hex
        body = orjson.dumps({"type": kind, "timestamp": _now_iso(), "data": data}, default=str)
        if self.closed or len(self._tasks) >= MAX_PENDING:
            reason = "relay stopping" if self.closed else f"over {MAX_PENDING} deliveries waiting"
            self._give_up(message_id, url, kind, body, attempts=0, reason=reason)
            return message_id
        task = asyncio.create_task(self._deliver(message_id, url, kind, body), name=f"webhook-{message_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return message_id

    async def _deliver(self, message_id: str, url: str, kind: str, body: bytes) -> None:
        attempts = self.config.webhook_attempts
        reason = ""
        attempt = 0
        try:
            for attempt in range(1, attempts + 1):
                retry_after: float | None = None
                async with self._slots:
                    outcome, retry_after = await self._try(message_id, url, body)
                if outcome is None:
                    self.metrics.webhook_deliveries.labels("delivered").inc()
                    log.debug("webhook delivered", webhook_id=message_id, url=_safe(url), type=kind,
                              attempt=attempt)  # fmt: skip
                    return
                reason = outcome
                if attempt == attempts:
                    break
                self.metrics.webhook_deliveries.labels("retried").inc()
                delay = self.config.webhook_backoff * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                log.info("webhook try failed; trying again", webhook_id=message_id, url=_safe(url),
                         type=kind, attempt=attempt, error=reason, retry_in=round(delay, 2))  # fmt: skip
                await asyncio.sleep(min(delay, _LONGEST_DELAY))
        except asyncio.CancelledError:
            self._give_up(
                message_id, url, kind, body, attempts=attempt, reason="relay stopped before it was delivered"
            )
            raise
        self._give_up(message_id, url, kind, body, attempts=attempt, reason=reason)

    async def _try(self, message_id: str, url: str, body: bytes) -> tuple[str | None, float | None]:
        """One POST; (None, None) on 2xx, else (what went wrong, seconds a Retry-After asked)."""
        assert self._key is not None
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, message_id, timestamp, body),
        }
        try:
            # The whole try, not each read, is bounded; the answer's body is never read (only its
            # status matters, and a receiver could send anything).
            async with (
                asyncio.timeout(self.config.webhook_timeout),
                self._client.stream("POST", url, content=body, headers=headers) as response,
            ):
                status, retry_after = response.status_code, response.headers.get("retry-after", "")
        except (httpx.TimeoutException, TimeoutError):
            return f"no answer within {self.config.webhook_timeout:g} s", None
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
        if 200 <= status < 300:
            return None, None
        wait = float(retry_after) if retry_after.isdigit() else None
        return f"HTTP {status}", wait

    def _give_up(
        self, message_id: str, url: str, kind: str, body: bytes, *, attempts: int, reason: str
    ) -> None:
        self.metrics.webhook_deliveries.labels("dead").inc()
        log.error("webhook not delivered: dead letter", webhook_id=message_id, url=_safe(url), type=kind,
                  attempts=attempts, error=reason)  # fmt: skip
        if self._dead_letter is not None:
            record = {"webhook_id": message_id, "url": url, "type": kind, "attempts": attempts}
            record |= {"error": reason, "at": _now_iso(), "body": orjson.Fragment(body)}
            line = orjson.dumps(record) + b"\n"
            task = asyncio.get_running_loop().create_task(self._append(line))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _append(self, line: bytes) -> None:
        assert self._dead_letter is not None
        path = self._dead_letter
        async with self._writing:
            try:
                await asyncio.to_thread(_append_line, path, line)
            except OSError as exc:
                log.error("dead-letter file not written", path=str(path), error=str(exc))  # noqa: TRY400 - no trace needed

    async def close(self) -> None:
        """Let deliveries under way finish for a moment, then write the rest off; close the client."""
        self.closed = True
        await wind_down(self._tasks, _CLOSE_GRACE)
        while self._tasks:  # dead letters written by the cancelled ones
            await asyncio.wait(set(self._tasks))
        await self._client.aclose()


def _append_line(path: Path, line: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(line)


def _safe(url: str) -> str:
    """The URL for a log line: without its query, which may carry a receiver's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
