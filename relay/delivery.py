"""Where a prompt's results go besides its client's sockets: storage and webhooks.

At submission, :meth:`Deliveries.check` reads what the prompt asks for (``extra_data.store``,
``extra_data.webhook_url``, ``extra_data.webhook_steps``, and its workflow's ``store``),
refuses what the relay cannot or may not do, and the answer travels with the prompt's plan
(so a relay that takes the client over, with Redis, keeps it). As the session publishes, each
event passes through :meth:`Deliveries.passing`: a ``relay.done`` whose files go to storage
is given its ``storage`` announcement and the copying starts, in the background; webhooks
are scheduled. Nothing here waits.

Webhook types: ``prompt.done`` (the ``relay.done`` fields), ``prompt.stored`` (once every
file of a stored prompt has settled: each ``relay.stored``), ``prompt.step`` (a step started
or ended, when asked for). Every ``data`` carries the ``client_id``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from relay.errors import BadRequest
from relay.events import Done, Event, Step, Stored, fields
from relay.translator import Delivery, Translator
from relay.webhooks import Webhooks, host_allowed

if TYPE_CHECKING:
    from relay.config import RelayConfig
    from relay.storage import Storage

__all__ = ["Deliveries", "Publisher"]

log = structlog.get_logger("relay.delivery")

_MAX_URL = 2048


class Publisher(Protocol):
    """What a client session offers the deliveries."""

    client_id: str
    translator: Translator
    storing: int

    @property
    def owned(self) -> bool:
        """Whether this relay speaks for the client (with Redis, another may have taken over)."""

    def publish(self, events: Iterable[Event]) -> None: ...


class Deliveries:
    def __init__(
        self,
        config: RelayConfig,
        storage: Storage | None,
        webhooks: Webhooks | None,
        *,
        storing_workflows: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.storage = storage
        self.webhooks = webhooks if webhooks is not None and webhooks.enabled else None
        # Workflows whose file says "store": true.
        self.storing_workflows = storing_workflows

    def recover(self, extra_data: Any) -> Delivery | None:
        """What a prompt found in ComfyUI's queue had asked for (a relay without Redis that
        restarted forgot it): read again from its extra_data, what is no longer allowed left out."""
        extra = extra_data if isinstance(extra_data, dict) else {}
        store = extra.get("store")
        url = extra.get("webhook_url")
        if not (
            isinstance(url, str)
            and self.webhooks is not None
            and host_allowed(url, self.config.webhook_hosts)
        ):
            url = None
        asked = {"store": store if isinstance(store, bool) else None, "webhook_url": url,
                 "webhook_steps": extra.get("webhook_steps") is True}  # fmt: skip
        try:
            return self.check(asked, workflow_store=extra.get("workflow") in self.storing_workflows)
        except BadRequest:  # storage asked for, and this relay now has none
            return None

    def check(self, extra_data: Any, workflow_store: bool) -> Delivery | None:
        """What a submitted prompt asks for, once allowed; None when nothing.

        Raises:
            BadRequest: a field of the wrong type, storage asked of a relay without it, a
                webhook URL whose host is not on the allow-list.
        """
        extra = extra_data if isinstance(extra_data, dict) else {}
        store = extra.get("store")
        if store is not None and not isinstance(store, bool):
            raise BadRequest("'extra_data.store' must be true or false", "invalid_store")
        if store and self.storage is None:
            raise BadRequest(
                "this relay has no storage (RELAY_S3_BUCKET is not set)", "storage_not_configured"
            )
        wanted = store if store is not None else workflow_store or self.config.s3_store == "all"
        wanted = wanted and self.storage is not None
        url = extra.get("webhook_url")
        steps = extra.get("webhook_steps", False)
        if not isinstance(steps, bool):
            raise BadRequest("'extra_data.webhook_steps' must be true or false", "invalid_webhook")
        if url is not None:
            if not isinstance(url, str) or not url or len(url) > _MAX_URL:
                raise BadRequest(f"'extra_data.webhook_url' must be a URL of at most {_MAX_URL} characters",
                                 "invalid_webhook")  # fmt: skip
            if self.webhooks is None or not host_allowed(url, self.config.webhook_hosts):
                raise BadRequest(
                    "'extra_data.webhook_url' names a host this relay may not call "
                    "(RELAY_WEBHOOK_ALLOWED_HOSTS); http(s) only, no credentials in the URL",
                    "webhook_not_allowed",
                )
        if not wanted and url is None and not steps:
            return None
        return Delivery(store=bool(wanted), webhook_url=url, webhook_steps=steps)

    def passing(self, session: Publisher, event: Event) -> Event:
        """The event as it goes out (``relay.done`` with its storage announcement), after
        starting what it sets off."""
        if not isinstance(event, (Done, Step)):
            return event
        plan = session.translator.plan_of(event.prompt_id)
        delivery = plan.delivery if plan is not None else None
        if isinstance(event, Done):
            if delivery is not None and delivery.store and self.storage is not None:
                event = self._store(session, event, delivery)
            self._notify(session.client_id, delivery, "prompt.done", fields(event))
        elif self._steps_wanted(delivery) and (event.state != "running" or event.activity is None):
            # A step's start and end; a running step announced again for its activity is not news.
            self._notify(session.client_id, delivery, "prompt.step", fields(event))
        return event

    def _steps_wanted(self, delivery: Delivery | None) -> bool:
        return self.config.webhook_steps or (delivery is not None and delivery.webhook_steps)

    def _store(self, session: Publisher, done: Done, delivery: Delivery) -> Done:
        assert self.storage is not None
        jobs = self.storage.jobs(session.client_id, done.prompt_id, done.outputs)
        if not jobs:
            return done
        session.storing += 1

        def settled(results: list[Stored]) -> None:
            session.storing -= 1
            files = [fields(result) for result in results]
            data = {
                "prompt_id": done.prompt_id,
                "bucket": self.storage.bucket if self.storage is not None else None,
                "stored": sum(1 for r in results if r.state == "stored"),
                "failed": sum(1 for r in results if r.state != "stored"),
                "files": files,
            }
            self._notify(session.client_id, delivery, "prompt.stored", data)

        def publish(results: Iterable[Stored]) -> None:
            if session.owned:
                session.publish(results)
                return
            # With Redis, another relay took the client over meanwhile: it writes the client's
            # stream now, and an event published here would take a number it also gives.
            for result in results:
                log.warning("storage result not sent: another relay holds the client now",
                            client_id=session.client_id, prompt_id=result.prompt_id, key=result.key,
                            state=result.state, url=result.url)  # fmt: skip

        self.storage.start(session.client_id, done.prompt_id, jobs, publish, settled)
        return replace(done, storage=self.storage.announcement(jobs))

    def _notify(self, client_id: str, delivery: Delivery | None, kind: str, data: dict[str, Any]) -> None:
        if self.webhooks is None:
            return
        urls = []
        if self.config.webhook_url and (kind != "prompt.step" or self.config.webhook_steps):
            urls.append(self.config.webhook_url)
        own = delivery.webhook_url if delivery is not None else None
        if own and own not in urls and (kind != "prompt.step" or (delivery and delivery.webhook_steps)):
            urls.append(own)
        payload = {"client_id": client_id, **data}
        for url in urls:
            self.webhooks.send(url, kind, payload)
