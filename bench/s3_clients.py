"""Which async S3 client: each streams the same file from an async iterator of 1 MiB chunks (as
the relay reads ComfyUI's /view) into SeaweedFS in 8 MiB parts, in a process of its own, and
reports its time and the process's peak RSS; then its presigned URL is fetched back.

obstore is the relay's dependency; the others are measured when installed (they are not the
project's: ``pip install aiobotocore miniopy-async`` in a scratch virtualenv to compare):

    .venv/bin/python bench/s3_clients.py
    .venv/bin/python bench/s3_clients.py --megabytes 500 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3_server import WEED, S3Server, start_s3  # noqa: E402 - after the path is set

PART = 8 * 1024 * 1024
CHUNK = 1024 * 1024
CLIENTS = {"obstore": "obstore", "aiobotocore": "aiobotocore", "miniopy-async": "miniopy_async"}


async def _source(size: int) -> AsyncIterator[bytes]:
    block = os.urandom(CHUNK)
    for _ in range(size // CHUNK):
        yield block


async def _with_obstore(s3: dict[str, str], key: str, size: int) -> str:
    import obstore  # noqa: PLC0415
    from obstore.store import S3Store  # noqa: PLC0415

    store = S3Store(s3["bucket"], endpoint=s3["endpoint"], access_key_id=s3["access_key"],
                    secret_access_key=s3["secret_key"], region="us-east-1",
                    virtual_hosted_style_request=False, client_options={"allow_http": True})  # fmt: skip
    await obstore.put_async(store, key, _source(size), attributes={"Content-Type": "video/mp4"},
                            chunk_size=PART, max_concurrency=2)  # fmt: skip
    return await obstore.sign_async(store, "GET", key, timedelta(minutes=10))


async def _with_aiobotocore(s3: dict[str, str], key: str, size: int) -> str:
    from aiobotocore.session import get_session  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=s3["endpoint"], aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"], region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    ) as client:  # fmt: skip
        bucket = s3["bucket"]
        upload = await client.create_multipart_upload(Bucket=bucket, Key=key, ContentType="video/mp4")
        parts: list[dict[str, Any]] = []
        buffer = bytearray()

        async def send() -> None:
            number = len(parts) + 1
            answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                              PartNumber=number, Body=bytes(buffer))  # fmt: skip
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            buffer.clear()

        async for chunk in _source(size):
            buffer += chunk
            if len(buffer) >= PART:
                await send()
        if buffer:
            await send()
        await client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                               MultipartUpload={"Parts": parts})  # fmt: skip
        url: str = await client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600
        )
        return url


async def _with_miniopy_async(s3: dict[str, str], key: str, size: int) -> str:
    from miniopy_async import Minio  # noqa: PLC0415

    class Reader:
        def __init__(self) -> None:
            self.chunks = _source(size).__aiter__()
            self.buffer = b""

        async def read(self, wanted: int = -1) -> bytes:
            while len(self.buffer) < wanted:
                try:
                    self.buffer += await self.chunks.__anext__()
                except StopAsyncIteration:
                    break
            out, self.buffer = self.buffer[:wanted], self.buffer[wanted:]
            return out

    client = Minio(s3["endpoint"].removeprefix("http://"), access_key=s3["access_key"],
                   secret_key=s3["secret_key"], secure=False, region="us-east-1")  # fmt: skip
    await client.put_object(s3["bucket"], key, Reader(), length=-1, part_size=PART, content_type="video/mp4")
    url: str = await client.presigned_get_object(s3["bucket"], key, expires=timedelta(minutes=10))
    return url


async def _one(name: str, s3: dict[str, str], size: int) -> dict[str, Any]:
    """In the child process: one upload with ``name``; its time, peak RSS and the URL's check."""
    upload = {
        "obstore": _with_obstore,
        "aiobotocore": _with_aiobotocore,
        "miniopy-async": _with_miniopy_async,
    }
    started = time.perf_counter()
    url = await upload[name](s3, f"clients/{name}-{os.getpid()}", size)
    seconds = time.perf_counter() - started
    fetched = 0
    async with httpx.AsyncClient(timeout=120) as http, http.stream("GET", url) as response:
        async for chunk in response.aiter_raw():
            fetched += len(chunk)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "fetched_ok": fetched == size}


def _child(name: str, s3: S3Server, size: int) -> dict[str, Any]:
    settings = {"endpoint": s3.endpoint, "bucket": s3.bucket, "access_key": s3.access_key,
                "secret_key": s3.secret_key}  # fmt: skip
    command = [sys.executable, __file__, "--child", name, "--s3", json.dumps(settings), "--bytes", str(size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def run(args: argparse.Namespace) -> None:
    if not WEED.exists():
        raise SystemExit("no S3-compatible server: run make s3 first")
    size = args.megabytes * 1024 * 1024
    present = [name for name, module in CLIENTS.items() if importlib.util.find_spec(module) is not None]
    with tempfile.TemporaryDirectory() as scratch:
        s3 = start_s3(Path(scratch))
        try:
            rows = {name: [_child(name, s3, size) for _ in range(args.repeat)] for name in present}
        finally:
            s3.stop()
    print(f"{args.megabytes} MB from an async iterator, {PART >> 20} MiB parts, {args.repeat} runs each")
    for name, runs in rows.items():
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        peak = max(r["peak_rss_mb"] for r in runs)
        ok = all(r["fetched_ok"] for r in runs)
        print(f"{name:14s} {times} s   peak RSS {peak:6.0f} MB   presigned URL fetched whole: {ok}")
    missing = sorted(set(CLIENTS) - set(present))
    if missing:
        print(f"not installed here, not measured: {', '.join(missing)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=100, help="file size (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client (default: %(default)s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--s3", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_one(args.child, json.loads(args.s3), args.bytes))))
        return
    run(args)


if __name__ == "__main__":
    main()
