"""Storage: how long after relay.done a 100 MB output file is in the bucket, against the same
copy made directly with the same S3 client.

Three server processes on 127.0.0.1: SeaweedFS (``make s3``), the emulated ComfyUI (with a
test node that reports a file of its output folder as its result) and the relay, storing to
SeaweedFS. Each round, alternating:

* relay: a prompt asking for storage; the time from its ``relay.done`` to its ``relay.stored``,
  read from the two events' own timestamps (the relay's clock);
* direct: this process streams the same file from the emulator's ``/view`` into the bucket
  with obstore, as the relay does (same part size, two parts in flight), timed end to end;
* upload: this process uploads the file from its disk with obstore (the same settings): the
  floor, what storing costs with ComfyUI out of the way.

It reports the median of ``--repeat`` rounds of each and the relay's ratio to both.

    .venv/bin/python bench/storage.py
    .venv/bin/python bench/storage.py --megabytes 500 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import obstore
import websockets
from _common import free_port, server_process, wait_until_up
from obstore.store import S3Store

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3_server import WEED, S3Server, start_s3  # noqa: E402 - after the path is set

PART = 8 * 1024 * 1024

# The emulator, with the test node that reports an existing file as its output.
COMFY = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
import uvicorn
from relay.emulator.config import EmulatorConfig
from relay.emulator.harness import uvicorn_config
from relay.emulator.nodes import default_catalogue
from relay.emulator.server import create_app
from tests.s3_server import ExistingOutput
catalogue = default_catalogue()
catalogue.register(ExistingOutput)
config = EmulatorConfig(port={port}, output_dir=Path({output!r}), input_dir=Path({folder!r}) / "input",
                        temp_dir=Path({folder!r}) / "temp")
uvicorn.Server(uvicorn_config(create_app(config, catalogue=catalogue), config)).run()
"""


def _bucket(s3: S3Server) -> S3Store:
    return S3Store(s3.bucket, endpoint=s3.endpoint, access_key_id=s3.access_key,
                   secret_access_key=s3.secret_key, region="us-east-1",
                   virtual_hosted_style_request=False, client_options={"allow_http": True})  # fmt: skip


async def _relay_round(relay: str, client_id: str) -> float:
    """Seconds from relay.done to relay.stored, by the relay's own clock."""
    async with websockets.connect(f"ws://{relay.removeprefix('http://')}/ws?clientId={client_id}") as socket:
        await socket.recv()  # relay.hello
        body = {"prompt": {"1": {"class_type": "TestExistingOutput", "inputs": {"filename": "big.bin"}}},
                "client_id": client_id, "extra_data": {"store": True}}  # fmt: skip
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{relay}/prompt", json=body)
            answer.raise_for_status()
        prompt_id = answer.json()["prompt_id"]
        done: dict[str, Any] | None = None
        async with asyncio.timeout(600):
            async for frame in socket:
                event = json.loads(frame)
                if event.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "relay.done":
                    done = event
                elif event["type"] == "relay.stored":
                    assert done is not None, "relay.stored before relay.done"
                    assert event["state"] == "stored", event
                    return float(event["ts"]) - float(done["ts"])
    raise RuntimeError("the relay closed the socket before the file was stored")


async def _put(store: S3Store, key: str, body: AsyncIterator[bytes]) -> None:
    """As the relay puts a file of unknown length: multipart, PART-sized, two parts in flight."""
    kind = {"Content-Type": "application/octet-stream"}
    await obstore.put_async(store, key, body, attributes=kind, chunk_size=PART, max_concurrency=2)


async def _direct_round(comfy: str, store: S3Store, key: str) -> float:
    """Seconds to stream big.bin from /view into the bucket with obstore, as the relay does."""
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        params = {"filename": "big.bin", "subfolder": "", "type": "output"}
        async with http.stream("GET", f"{comfy}/view", params=params) as response:
            response.raise_for_status()

            async def body() -> AsyncIterator[bytes]:
                async for chunk in response.aiter_raw():
                    yield chunk

            await _put(store, key, body())
    return time.perf_counter() - started


async def _upload_round(path: Path, store: S3Store, key: str) -> float:
    """Seconds to upload the file from disk with obstore."""
    started = time.perf_counter()

    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, 1024 * 1024):
                yield chunk

    await _put(store, key, body())
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> None:
    if not WEED.exists():
        raise SystemExit("no S3-compatible server: run make s3 first")
    size = args.megabytes * 1024 * 1024
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        output = folder / "output"
        output.mkdir()
        (output / "big.bin").write_bytes(os.urandom(size))
        s3 = await asyncio.to_thread(start_s3, folder / "s3")
        try:
            comfy_port, relay_port = free_port(), free_port()
            comfy, relay = f"http://127.0.0.1:{comfy_port}", f"http://127.0.0.1:{relay_port}"
            script = COMFY.format(root=str(ROOT), port=comfy_port, output=str(output), folder=scratch)
            prefix = f"bench-{uuid.uuid4().hex[:8]}"
            env = {**os.environ, "COMFYUI_URL": comfy, "RELAY_PORT": str(relay_port),
                   "RELAY_LOG_LEVEL": "warning", "RELAY_ETA_FILE": ""}  # fmt: skip
            env |= {"RELAY_S3_BUCKET": s3.bucket, "RELAY_S3_ENDPOINT": s3.endpoint,
                    "RELAY_S3_ACCESS_KEY_ID": s3.access_key, "RELAY_S3_SECRET_ACCESS_KEY": s3.secret_key,
                    "RELAY_S3_PREFIX": prefix, "RELAY_S3_PART_SIZE": str(PART)}  # fmt: skip
            async with (
                server_process(sys.executable, "-c", script),
                server_process(sys.executable, "-m", "relay", "serve", env=env),
            ):
                await wait_until_up(f"{comfy}/system_stats")
                await wait_until_up(f"{relay}/healthz")
                store = _bucket(s3)
                await _direct_round(comfy, store, f"{prefix}/warm")  # warm both paths first
                await _relay_round(relay, "bench-warm")
                relayed, direct, uploaded = [], [], []
                for number in range(args.repeat):
                    relayed.append(await _relay_round(relay, f"bench-{number}"))
                    direct.append(await _direct_round(comfy, store, f"{prefix}/direct-{number}"))
                    uploaded.append(
                        await _upload_round(output / "big.bin", store, f"{prefix}/upload-{number}")
                    )
        finally:
            await asyncio.to_thread(s3.stop)
    mb = size / 1e6
    through, straight, floor = (statistics.median(x) for x in (relayed, direct, uploaded))
    print(f"{args.megabytes} MB file, median of {args.repeat} rounds each")
    print(f"relay.done -> relay.stored    {through:7.3f} s  ({mb / through:6.1f} MB/s)")
    print(f"direct /view -> bucket        {straight:7.3f} s  ({mb / straight:6.1f} MB/s)")
    print(f"upload from disk              {floor:7.3f} s  ({mb / floor:6.1f} MB/s)")
    print(f"ratio relay / direct /view    {through / straight:7.2f}")
    print(f"ratio relay / upload          {through / floor:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=100, help="file size (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each (default: %(default)s)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
