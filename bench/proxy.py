"""Proxy throughput: a 100 MB /view download and a 100 MB upload, through the relay and direct.

Two server processes on 127.0.0.1, the emulated ComfyUI and the relay in front of it; this
driver downloads (and uploads) the same file straight from the emulator and through the relay,
alternating, and reports the median of ``--repeat`` rounds of each and the relay/direct ratio.

    .venv/bin/python bench/proxy.py
    .venv/bin/python bench/proxy.py --megabytes 200 --repeat 7
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import free_port, server_process, wait_until_up


async def _download(http: httpx.AsyncClient, base: str, name: str) -> float:
    started = time.perf_counter()
    size = 0
    async with http.stream("GET", f"{base}/view", params={"filename": name, "type": "output"}) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            size += len(chunk)
    return size / (time.perf_counter() - started) / 1e6


async def _upload(http: httpx.AsyncClient, base: str, path: Path, size: int, number: int) -> float:
    started = time.perf_counter()
    with path.open("rb") as handle:
        files = {"image": (f"upload-{number}.bin", handle, "application/octet-stream")}
        response = await http.post(f"{base}/upload/image", files=files, data={"overwrite": "true"})
    response.raise_for_status()
    return size / (time.perf_counter() - started) / 1e6


async def run(args: argparse.Namespace) -> None:
    comfy_port, relay_port = free_port(), free_port()
    comfy, relay = f"http://127.0.0.1:{comfy_port}", f"http://127.0.0.1:{relay_port}"
    size = args.megabytes * 1024 * 1024
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "output"
        output.mkdir()
        (output / "big.bin").write_bytes(os.urandom(size))
        source = Path(scratch) / "upload.bin"
        source.write_bytes(os.urandom(size))
        limit_mb = str(args.megabytes * 2 + 10)
        env = {
            **os.environ,
            "COMFYUI_URL": comfy,
            "RELAY_PORT": str(relay_port),
            "RELAY_LOG_LEVEL": "warning",
            "RELAY_MAX_UPLOAD_BYTES": str(int(limit_mb) * 1024 * 1024),
            "RELAY_ETA_FILE": "",
        }
        emulator_command = [
            *(
                sys.executable,
                "-m",
                "relay",
                "emulator",
                "--port",
                str(comfy_port),
                "--output-dir",
                str(output),
            ),
            *("--max-upload-size", limit_mb, "--log-level", "warning"),
        ]
        async with (
            server_process(*emulator_command),
            server_process(sys.executable, "-m", "relay", "serve", env=env),
        ):
            await wait_until_up(f"{comfy}/queue")
            await wait_until_up(f"{relay}/healthz")
            results: dict[str, list[float]] = {
                k: [] for k in ("down-direct", "down-relay", "up-direct", "up-relay")
            }
            async with httpx.AsyncClient(timeout=300) as http:
                await _download(http, relay, "big.bin")  # warm both paths once
                for number in range(args.repeat):
                    results["down-direct"].append(await _download(http, comfy, "big.bin"))
                    results["down-relay"].append(await _download(http, relay, "big.bin"))
                    results["up-direct"].append(await _upload(http, comfy, source, size, number))
                    results["up-relay"].append(await _upload(http, relay, source, size, number))
    median = {k: statistics.median(v) for k, v in results.items()}
    print(f"proxy benchmark: {args.megabytes} MiB, median of {args.repeat} rounds, {os.cpu_count()} CPUs")
    for kind in ("down", "up"):
        direct, relayed = median[f"{kind}-direct"], median[f"{kind}-relay"]
        label = "download /view" if kind == "down" else "upload /upload/image"
        ratio = relayed / direct
        print(f"{label:<22} direct {direct:8.1f} MB/s   relay {relayed:8.1f} MB/s   ratio {ratio:.2f}x")
        if args.verbose:
            print(f"  rounds direct {[round(x) for x in results[kind + '-direct']]}"
                  f" relay {[round(x) for x in results[kind + '-relay']]}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=100, help="file size in MiB (default: %(default)s)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="rounds; medians are reported (default: %(default)s)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
