"""Output files to S3-compatible storage, as soon as a prompt ends, with presigned URLs.

When a prompt that asked for storage ends with output files, its ``relay.done`` goes out at
once, naming the keys its files will have (``{prefix}/{client_id}/{prompt_id}/{filename}``);
then each file is streamed from ComfyUI's ``/view`` straight into the bucket (a multipart
upload in ``s3_part_size`` parts, two in flight: memory stays about two parts per file in
transfer, whatever its size), its content type kept, and told by a ``relay.stored`` event
with a presigned GET URL, or with the error once ``s3_attempts`` tries have failed.

Only ``output`` files are stored: ComfyUI's ``temp`` files (previews) are not results. The
S3 client is obstore (Rust's object_store): of the async clients measured it streamed a
100 MB file fastest in the least memory (see docs/storage.md).
"""

from __future__ import annotations

import asyncio
import mimetypes
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import obstore
import structlog
from obstore.store import S3Store

from relay.errors import RelayError
from relay.events import Stored, file_refs
from relay.streaming import BodyCutShort
from relay.tasks import wind_down

if TYPE_CHECKING:
    from relay.backends import Backends
    from relay.config import RelayConfig
    from relay.metrics import Metrics

__all__ = ["FileJob", "Storage", "object_keys"]

log = structlog.get_logger("relay.storage")

# Seconds a stopping relay gives files in transfer before reporting them failed.
_CLOSE_GRACE = 5.0
# Longest delay between two tries of one file.
_LONGEST_DELAY = 60.0


@dataclass(frozen=True, slots=True)
class FileJob:
    """One output file of a prompt, and the key it goes to."""

    node: str
    filename: str
    subfolder: str
    type: str
    kind: str
    key: str

    def announced(self) -> dict[str, str]:
        return {"node": self.node, "filename": self.filename, "kind": self.kind, "key": self.key}


class _Permanent(Exception):
    """A failure no retry mends (ComfyUI has no such file)."""


def object_keys(prefix: str, client_id: str, prompt_id: str, outputs: Any) -> list[FileJob]:
    """The output files of a prompt's outputs, each with its key. File names are taken as base
    names (no folder can be named through them); a name two nodes share gets the node id before
    it on the second and later files."""
    base = "/".join(part for part in (prefix.strip("/"), client_id, prompt_id) if part)
    jobs: list[FileJob] = []
    taken: set[str] = set()
    for node, output in (outputs or {}).items() if isinstance(outputs, dict) else ():
        for kind, ref in file_refs(output):
            if ref["type"] != "output":
                continue
            name = PurePosixPath(ref["filename"].replace("\\", "/")).name
            if name in ("", ".", ".."):
                continue
            leaf = name if name not in taken else f"{node}-{name}"
            taken.add(leaf)
            jobs.append(
                FileJob(str(node), ref["filename"], ref["subfolder"], ref["type"], kind, f"{base}/{leaf}")
            )
    return jobs


class Storage:
    """Copies prompts' output files from ComfyUI to the bucket, in the background."""

    def __init__(self, config: RelayConfig, backends: Backends, metrics: Metrics) -> None:
        self.config = config
        # Each prompt's files are read from the backend that ran it.
        self.backends = backends
        self.metrics = metrics
        self.bucket = config.s3_bucket
        self._store = _s3_store(config, config.s3_endpoint)
        public = config.s3_public_endpoint
        self._signer = _s3_store(config, public) if public and public != config.s3_endpoint else self._store
        self._slots = asyncio.Semaphore(config.s3_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def jobs(self, client_id: str, prompt_id: str, outputs: Any) -> list[FileJob]:
        return object_keys(self.config.s3_prefix, client_id, prompt_id, outputs)

    def announcement(self, jobs: Sequence[FileJob]) -> dict[str, Any]:
        """``relay.done``'s ``storage``: what is on its way to the bucket, each file with the
        presigned URL it will be read at (signing needs no request: it works once the file's
        ``relay.stored`` says it is stored)."""
        expiry = self.config.s3_url_expiry
        expires = round(time.time() + expiry, 3)
        files = [
            {**job.announced(), "url": obstore.sign(self._signer, "GET", job.key, timedelta(seconds=expiry)),
             "expires": expires}
            for job in jobs
        ]  # fmt: skip
        return {"state": "storing", "bucket": self.bucket, "files": files}

    def start(
        self,
        client_id: str,
        prompt_id: str,
        jobs: Sequence[FileJob],
        publish: Callable[[Iterable[Stored]], None],
        settled: Callable[[list[Stored]], None],
    ) -> None:
        """Store the files in the background: ``publish`` each one's ``relay.stored`` as it
        settles, and hand every result to ``settled`` once all have. A stopping relay starts
        nothing: the files are reported failed at once."""
        if self.closed:
            error = "the relay was stopping when the prompt ended"
            count = len(jobs)
            failed = [
                Stored(
                    prompt_id, job.node, job.filename, job.kind, job.key, "failed", 0, count - n, error=error
                )
                for n, job in enumerate(jobs, start=1)
            ]
            self.metrics.stored_files.labels("failed").inc(count)
            keys = [job.key for job in jobs]
            log.error("files not stored", client_id=client_id, prompt_id=prompt_id, keys=keys, error=error)
            publish(failed)
            settled(failed)
            return
        task = asyncio.create_task(
            self._store_prompt(client_id, prompt_id, list(jobs), publish, settled),
            name=f"store-{client_id}-{prompt_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_prompt(
        self,
        client_id: str,
        prompt_id: str,
        jobs: list[FileJob],
        publish: Callable[[Iterable[Stored]], None],
        settled: Callable[[list[Stored]], None],
    ) -> None:
        began = time.monotonic()
        results: dict[str, Stored] = {}
        tries = dict.fromkeys((job.key for job in jobs), 0)
        bound = log.bind(client_id=client_id, prompt_id=prompt_id)

        def report(result: Stored) -> None:
            result = replace(result, remaining=len(jobs) - len(results) - 1)
            results[result.key] = result
            publish([result])

        async def one(job: FileJob) -> None:
            async with self._slots:
                result = await self._store_file(job, prompt_id, bound, tries)
            if result.state == "stored":
                self.metrics.store_seconds.observe(time.monotonic() - began)
            report(result)

        try:
            await asyncio.gather(*(one(job) for job in jobs))
        except asyncio.CancelledError:
            error = "the relay stopped before the file was stored"
            for job in jobs:
                if job.key not in results:
                    self.metrics.stored_files.labels("failed").inc()
                    bound.error("file not stored", key=job.key, attempts=tries[job.key], error=error)
                    report(Stored(prompt_id, job.node, job.filename, job.kind, job.key, "failed",
                                  tries[job.key], 0, error=error))  # fmt: skip
            raise
        finally:
            settled([results[job.key] for job in jobs if job.key in results])

    async def _store_file(self, job: FileJob, prompt_id: str, bound: Any, tries: dict[str, int]) -> Stored:
        attempts = self.config.s3_attempts
        error = ""
        for attempt in range(1, attempts + 1):
            tries[job.key] = attempt
            try:
                size, content_type = await self._copy(job, prompt_id)
                url, expires = await self._sign(job.key)
            except _Permanent as exc:
                error = str(exc)
                break
            except Exception as exc:
                error = _describe(exc)
                if attempt < attempts:
                    self.metrics.stored_files.labels("retried").inc()
                    delay = min(self.config.s3_backoff * 2 ** (attempt - 1) * random.uniform(0.8, 1.2),
                                _LONGEST_DELAY)  # fmt: skip
                    bound.info("storing a file failed; trying again", key=job.key, attempt=attempt,
                               error=error, retry_in=round(delay, 2))  # fmt: skip
                    await asyncio.sleep(delay)
                continue
            self.metrics.stored_files.labels("stored").inc()
            self.metrics.stored_bytes.inc(size)
            bound.info("file stored", key=job.key, size=size, content_type=content_type, attempts=attempt)
            return Stored(prompt_id, job.node, job.filename, job.kind, job.key, "stored", attempt, 0,
                          url=url, expires=expires, size=size, content_type=content_type)  # fmt: skip
        self.metrics.stored_files.labels("failed").inc()
        bound.error("file not stored", key=job.key, attempts=tries[job.key], error=error)
        return Stored(prompt_id, job.node, job.filename, job.kind, job.key, "failed", tries[job.key], 0,
                      error=error)  # fmt: skip

    async def _copy(self, job: FileJob, prompt_id: str) -> tuple[int, str]:
        """Stream the file from ComfyUI to the bucket; its size and content type."""
        query = urlencode({"filename": job.filename, "subfolder": job.subfolder, "type": job.type})
        try:
            answer = await self.backends.source_of(prompt_id).streams.open("GET", f"/view?{query}", [])
        except RelayError as exc:
            raise ConnectionError(f"ComfyUI: {exc.message}") from None
        try:
            if answer.status == 404:
                raise _Permanent("ComfyUI has no such file (404 from /view)")
            if answer.status != 200:
                raise ConnectionError(f"ComfyUI answered /view with {answer.status}")
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1") for name, value in answer.headers
            }
            content_type = headers.get("content-type", "").split(";")[0].strip()
            if not content_type or content_type == "application/octet-stream":
                content_type = mimetypes.guess_type(job.filename)[0] or "application/octet-stream"
            declared = headers.get("content-length")
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                while chunk := await answer.read():
                    sent += len(chunk)
                    yield chunk

            # A file that fits in one part goes in one PUT; a larger one, or one of unknown size,
            # as a multipart upload.
            small = declared is not None and declared.isdigit() and int(declared) <= self.config.s3_part_size
            await obstore.put_async(
                self._store,
                job.key,
                b"".join([chunk async for chunk in body()]) if small else body(),
                attributes={"Content-Type": content_type},
                chunk_size=self.config.s3_part_size,
                max_concurrency=2,
            )
            if declared is not None and declared.isdigit() and sent != int(declared):
                raise BodyCutShort(f"ComfyUI sent {sent} of {declared} bytes")
            return sent, content_type
        finally:
            answer.close()

    async def _sign(self, key: str) -> tuple[str, float]:
        expiry = self.config.s3_url_expiry
        expires = time.time() + expiry
        url = await obstore.sign_async(self._signer, "GET", key, timedelta(seconds=expiry))
        return url, round(expires, 3)

    async def close(self) -> None:
        """Give files in transfer a moment, then report the rest failed."""
        self.closed = True
        await wind_down(self._tasks, _CLOSE_GRACE)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}"[:500] if text else name


def _s3_store(config: RelayConfig, endpoint: str) -> S3Store:
    options: dict[str, Any] = {"connect_timeout": "5s", "timeout": "120s"}
    if endpoint.startswith("http://"):
        options["allow_http"] = True
    settings: dict[str, Any] = {
        "region": config.s3_region,
        "virtual_hosted_style_request": not config.s3_path_style,
    }
    if endpoint:
        settings["endpoint"] = endpoint.rstrip("/")
    if config.s3_access_key_id:
        settings["access_key_id"] = config.s3_access_key_id
        settings["secret_access_key"] = config.s3_secret_access_key
    # A few quick retries of one request (a part) inside the client; the relay's own tries,
    # with longer waits, are around the whole file.
    backoff = {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}
    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=20), "backoff": backoff}
    return S3Store(config.s3_bucket, config=settings, client_options=options, retry_config=retry)  # type: ignore[arg-type]
