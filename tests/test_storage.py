"""Output files to a real S3-compatible server (SeaweedFS, tests/s3_server.py).

The relay runs for real (uvicorn on port 0, in this loop, or as its own process for the memory
test) in front of the emulator; each test keeps to its own key prefix in the one bucket.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
from obstore.store import S3Store

from relay.backends import Backends
from relay.config import ConfigError, RelayConfig
from relay.emulator import RunningEmulator
from relay.emulator.config import ComfyVersion
from relay.events import Stored
from relay.metrics import Metrics
from relay.server import run_relay
from relay.storage import Storage, object_keys
from tests.conftest import relay_config
from tests.relay_client import Tab, open_tab
from tests.relay_processes import RelayProcess
from tests.s3_server import ExistingOutput, S3Server
from tests.test_emulator_cli import free_port
from tests.tracekit import load_trace

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def comfyui_version() -> ComfyVersion:
    """Storage reads only /view, the same on every version: the current one is enough."""
    return "current"


def storage_settings(s3: S3Server, prefix: str, **more: Any) -> dict[str, Any]:
    return {
        "s3_bucket": s3.bucket,
        "s3_endpoint": s3.endpoint,
        "s3_access_key_id": s3.access_key,
        "s3_secret_access_key": s3.secret_key,
        "s3_prefix": prefix,
        "s3_backoff": 0.05,
        **more,
    }


def bucket(s3: S3Server) -> S3Store:
    return S3Store(s3.bucket, endpoint=s3.endpoint, access_key_id=s3.access_key,
                   secret_access_key=s3.secret_key, region="us-east-1",
                   virtual_hosted_style_request=False, client_options={"allow_http": True})  # fmt: skip


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def submit(http: httpx.AsyncClient, client_id: str, graph: dict[str, Any], **extra: Any) -> str:
    body = {"prompt": graph, "client_id": client_id, "extra_data": extra}
    answer = await http.post("/prompt", json=body)
    assert answer.status_code == 200, answer.text
    prompt_id: str = answer.json()["prompt_id"]
    return prompt_id


async def all_stored(tab: Tab, prompt_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Every relay.stored of the prompt, once the last (remaining 0) has come."""
    await tab.wait_for(lambda e: e["type"] == "relay.stored" and e["prompt_id"] == prompt_id
                       and e["remaining"] == 0, timeout=timeout)  # fmt: skip
    return tab.of("relay.stored", prompt_id)


async def test_images_are_stored_byte_identical_with_presigned_urls(
    emulator: RunningEmulator, s3_server: S3Server, prefix: str
) -> None:
    """relay.done names the keys at once; each file then arrives in the bucket as ComfyUI
    served it, under {prefix}/{client}/{prompt}/{filename}, with its content type, and the
    presigned URL in relay.stored fetches it without credentials (a plain GET is refused)."""
    config = relay_config(emulator, **storage_settings(s3_server, prefix))
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        tab = await open_tab(relay.ws_url, "clientId=painter")
        prompt_id = await submit(http, "painter", TEXT2IMG, store=True)
        done = await tab.wait_done(prompt_id)
        stored = await all_stored(tab, prompt_id)
        await tab.close()
        assert done["status"] == "success"
        announced = done["storage"]
        assert announced["state"] == "storing"
        assert announced["bucket"] == s3_server.bucket
        files = [
            f
            for f in (f for node in done["outputs"].values() for f in node["images"])
            if f["type"] == "output"
        ]
        assert files, done["outputs"]
        expected_keys = {f"{prefix}/painter/{prompt_id}/{f['filename']}" for f in files}
        assert {f["key"] for f in announced["files"]} == expected_keys
        assert {s["key"] for s in stored} == expected_keys
        early = {f["key"]: f["url"] for f in announced["files"]}  # signed at relay.done, valid once stored
        assert done["seq"] < min(s["seq"] for s in stored)  # storing never held relay.done back
        async with httpx.AsyncClient(timeout=30) as plain:
            for event in stored:
                assert event["state"] == "stored", event
                assert event["content_type"] == "image/png"
                original = await http.get("/view", params={"filename": event["filename"], "type": "output"})
                fetched = await plain.get(event["url"])
                assert fetched.status_code == 200
                assert fetched.content == original.content
                assert event["size"] == len(original.content)
                assert fetched.headers["content-type"] == "image/png"
                assert (await plain.get(early[event["key"]])).content == original.content
                unsigned = await plain.get(f"{s3_server.endpoint}/{s3_server.bucket}/{event['key']}")
                assert unsigned.status_code == 403
                assert event["expires"] > done["ts"] + 3000  # the default expiry: an hour
        assert relay.state.metrics.stored_files.labels("stored")._value.get() == len(files)


async def test_animatediff_mp4_is_stored_byte_identical(
    emulator: RunningEmulator, s3_server: S3Server, prefix: str
) -> None:
    """The AnimateDiff workflow's h264 mp4 (asked for by the workflow call) lands in the bucket as
    video/mp4, byte for byte; the step webhooks are not involved."""
    config = relay_config(emulator, **storage_settings(s3_server, prefix))
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=60) as http:
        tab = await open_tab(relay.ws_url, "clientId=animator")
        answer = await http.post("/workflows/animatediff/prompt", json={
            "client_id": "animator", "params": {"frames": 6}, "extra_data": {"store": True}})  # fmt: skip
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        done = await tab.wait_done(prompt_id, timeout=60)
        stored = await all_stored(tab, prompt_id)
        await tab.close()
        assert done["status"] == "success", done
        (event,) = stored
        assert event["filename"].endswith(".mp4"), event
        assert event["kind"] == "gifs"  # VideoHelperSuite reports videos under "gifs"
        assert event["content_type"] == "video/mp4"
        original = await http.get("/view", params={"filename": event["filename"], "type": "output"})
        assert original.content[4:8] == b"ftyp"  # a real MP4 container
        kept = await obstore.get_async(bucket(s3_server), event["key"])
        assert bytes(await kept.bytes_async()) == original.content
        assert kept.attributes.get("Content-Type") == "video/mp4"


async def test_storage_down_is_retried_then_reported(emulator: RunningEmulator, prefix: str) -> None:
    """With nothing listening at the endpoint, each file is tried s3_attempts times, then
    reported failed with the error; relay.done went out first, and the relay goes on."""
    down = f"http://127.0.0.1:{free_port()}"
    settings = {"s3_bucket": "results", "s3_endpoint": down, "s3_access_key_id": "k"}
    settings |= {"s3_secret_access_key": "s", "s3_prefix": prefix, "s3_attempts": 3, "s3_backoff": 0.01}
    async with (
        run_relay(relay_config(emulator, **settings)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        tab = await open_tab(relay.ws_url, "clientId=unlucky")
        prompt_id = await submit(http, "unlucky", TEXT2IMG, store=True)
        done = await tab.wait_done(prompt_id)
        stored = await all_stored(tab, prompt_id)
        assert done["storage"]["files"]
        for event in stored:
            assert event["state"] == "failed"
            assert event["attempts"] == 3
            assert event["error"], event
            assert "url" not in event
        metrics = relay.state.metrics
        assert metrics.stored_files.labels("failed")._value.get() == len(stored)
        assert metrics.stored_files.labels("retried")._value.get() == 2 * len(stored)
        # The relay is fine: the next prompt (not stored) runs to its end.
        again = await submit(http, "unlucky", TEXT2IMG)
        assert "storage" not in await tab.wait_done(again)
        await tab.close()


class Gate:
    """A TCP forwarder to the S3 server that resets every connection until opened; ``cut()``
    resets the connections it carries and closes it again (storage lost mid-upload)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.open = False
        self.refused = 0
        self.passed = 0
        self.bytes_up = 0  # towards the S3 server
        self.server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    def cut(self) -> None:
        self.open = False
        for writer in list(self._links):
            writer.transport.abort()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            self.refused += 1
            writer.transport.abort()
            return
        self.passed += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._links |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, up: bool) -> None:
            try:
                while data := await source.read(65536):
                    if up:
                        self.bytes_up += len(data)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()
                self._links.discard(sink)

        await asyncio.gather(pipe(reader, up_writer, up=True), pipe(up_reader, writer, up=False))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def gate(s3_server: S3Server) -> AsyncIterator[Gate]:
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    opened = Gate(port)
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()


async def test_storage_that_comes_back_gets_the_file(
    emulator: RunningEmulator, s3_server: S3Server, gate: Gate, prefix: str
) -> None:
    """Storage refusing connections at first: relay.done goes out regardless, the first try
    fails and is retried; once storage is back the file is stored, the tries counted."""
    assert gate.server is not None
    gate_port = gate.server.sockets[0].getsockname()[1]
    settings = storage_settings(s3_server, prefix, s3_endpoint=f"http://127.0.0.1:{gate_port}",
                                s3_public_endpoint=s3_server.endpoint, s3_attempts=8,
                                s3_backoff=0.2)  # fmt: skip
    async with (
        run_relay(relay_config(emulator, **settings)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        tab = await open_tab(relay.ws_url, "clientId=patient")
        prompt_id = await submit(http, "patient", TEXT2IMG, store=True)
        done = await tab.wait_done(prompt_id)
        assert gate.passed == 0  # relay.done did not wait for storage
        retried = relay.state.metrics.stored_files.labels("retried")
        async with asyncio.timeout(30):
            while retried._value.get() < 1:  # a whole try failed (the client's own retries too)
                await asyncio.sleep(0.02)
        gate.open = True
        stored = await all_stored(tab, prompt_id)
        await tab.close()
        assert gate.refused > 0
        assert all(event["state"] == "stored" and event["attempts"] >= 2 for event in stored), stored
        assert done["seq"] < stored[0]["seq"]
        async with httpx.AsyncClient() as plain:  # signed for the public endpoint
            assert (await plain.get(stored[0]["url"])).status_code == 200


async def test_only_prompts_that_ask_are_stored(
    emulator: RunningEmulator, s3_server: S3Server, prefix: str
) -> None:
    """Without extra_data.store (and RELAY_S3_STORE=request), relay.done has no storage and the
    prompt's files stay out of the bucket; a workflow with "store" needs no request."""
    config = relay_config(emulator, **storage_settings(s3_server, prefix))
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url) as http:
        tab = await open_tab(relay.ws_url, "clientId=thrifty")
        plain = await submit(http, "thrifty", TEXT2IMG)
        assert "storage" not in await tab.wait_done(plain)
        wanted = await submit(http, "thrifty", TEXT2IMG, store=True)
        await tab.wait_done(wanted)
        await all_stored(tab, wanted)
        await tab.close()
        assert tab.of("relay.stored", plain) == []
        listed = await obstore.list(bucket(s3_server), prefix=f"{prefix}/thrifty/").collect_async()
        assert {item["path"].split("/")[2] for item in listed} == {wanted}


async def test_bad_storage_requests_are_refused(
    emulator: RunningEmulator, relay_http: httpx.AsyncClient
) -> None:
    """extra_data.store must be a boolean; asking a relay without storage is a clear 400."""
    body = {"prompt": TEXT2IMG, "extra_data": {"store": "yes"}}
    answer = await relay_http.post("/prompt", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_store"
    answer = await relay_http.post("/prompt", json={**body, "extra_data": {"store": True}})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "storage_not_configured"


def test_object_keys_are_base_names_and_never_collide() -> None:
    """Keys take file names as base names (no '..' or folders through them), skip temp files,
    and put the node id before a name another node already used."""
    outputs = {
        "9": {"images": [{"filename": "a.png", "subfolder": "x", "type": "output"},
                         {"filename": "p.png", "subfolder": "", "type": "temp"}]},
        "12": {"images": [{"filename": "../../a.png", "subfolder": "", "type": "output"}],
               "gifs": [{"filename": "..", "subfolder": "", "type": "output"}]},
    }  # fmt: skip
    keys = [job.key for job in object_keys("/pre/", "c", "p", outputs)]
    assert keys == ["pre/c/p/a.png", "pre/c/p/12-a.png"]
    assert next(job.key for job in object_keys("", "c", "p", outputs)) == "c/p/a.png"


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def test_storing_500_mb_keeps_relay_memory_flat(
    emulator: RunningEmulator, s3_server: S3Server, prefix: str, tmp_path: Path
) -> None:
    """A relay process stores a 500 MB output file with its memory growing by under 64 MB
    (two 8 MiB parts in flight, and the client's buffers), and the whole file arrives."""
    size = 500 * 1024 * 1024
    emulator.state.catalogue.register(ExistingOutput)
    folder = emulator.state.folders.output
    (folder / "warm.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    with (folder / "huge.bin").open("wb") as handle:
        handle.truncate(size)  # sparse: no disk, reads as zeros
    storage = {f"RELAY_{k.upper()}": str(v) for k, v in storage_settings(s3_server, prefix).items()}
    env = {
        **os.environ,
        "COMFYUI_URL": emulator.url,
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_ETA_FILE": "",
        **storage,
    }
    relay = RelayProcess("storing", env, tmp_path / "relay.log")
    await relay.start()
    assert relay.process is not None
    pid = relay.process.pid
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=60) as http:
            tab = await open_tab(relay.ws_url, "clientId=bigfile")

            def graph(name: str) -> dict[str, Any]:
                return {"1": {"class_type": "TestExistingOutput", "inputs": {"filename": name}}}

            # Warm the path (the S3 client's runtime, pools, buffers) before the baseline.
            warm = await submit(http, "bigfile", graph("warm.bin"), store=True)
            (warmed,) = await all_stored(tab, warm)
            assert warmed["state"] == "stored", warmed
            baseline = peak = rss(pid)
            prompt_id = await submit(http, "bigfile", graph("huge.bin"), store=True)
            waiting = asyncio.ensure_future(all_stored(tab, prompt_id, timeout=300))
            while not waiting.done():
                peak = max(peak, rss(pid))
                await asyncio.wait([waiting], timeout=0.02)
            (event,) = waiting.result()
            await tab.close()
        assert event["state"] == "stored", event
        assert event["size"] == size
        head = await obstore.head_async(bucket(s3_server), event["key"])
        assert head["size"] == size
        growth = peak - baseline
        print(f"relay RSS growth while storing 500 MB: {growth / 1e6:.1f} MB")
        assert growth < 64 * 1024 * 1024, f"relay RSS grew by {growth / 1e6:.1f} MB"
    finally:
        await relay.stop()
        for name in ("huge.bin", "warm.bin"):
            (folder / name).unlink(missing_ok=True)


async def test_a_restarted_relay_still_stores_what_was_asked(
    emulator: RunningEmulator, s3_server: S3Server, prefix: str
) -> None:
    """Without Redis, a relay that restarts mid-run forgets the prompt but finds it again in
    ComfyUI's queue: the request to store it is read back from its extra_data, so its file is
    stored when it ends all the same."""
    graph = load_trace("04").workflow()
    graph["2"]["inputs"].update(steps=60, delay=0.2)
    settings = storage_settings(s3_server, prefix)
    async with (
        run_relay(relay_config(emulator, **settings)) as before,
        httpx.AsyncClient(base_url=before.url) as http,
    ):
        tab = await open_tab(before.ws_url, "clientId=restarted")
        prompt_id = await submit(http, "restarted", graph, store=True)
        await tab.wait_type("relay.progress", prompt_id)
        await tab.close()
    async with run_relay(relay_config(emulator, **settings)) as after:
        back = await open_tab(after.ws_url, "clientId=restarted")
        done = await back.wait_done(prompt_id, timeout=60)
        (stored,) = await all_stored(back, prompt_id)
        await back.close()
    assert (done["status"], done["recovered"]) == ("success", True)
    assert [f["key"] for f in done["storage"]["files"]] == [stored["key"]]
    assert stored["state"] == "stored"
    assert stored["key"].startswith(f"{prefix}/restarted/{prompt_id}/")


async def test_a_stopping_relay_reports_files_failed_at_once() -> None:
    """Once storage has closed (the relay stops), a prompt that ends starts no copy: each file
    is reported failed at once, counting down, and the whole is settled."""
    config = RelayConfig(s3_bucket="results", s3_endpoint="http://127.0.0.1:9", s3_prefix="p")
    storage = Storage(config, Backends(config), Metrics())
    await storage.close()
    outputs = {
        "9": {"images": [{"filename": f"a{n}.png", "subfolder": "", "type": "output"} for n in (1, 2)]}
    }
    published: list[Stored] = []
    settled: list[list[Stored]] = []
    storage.start("c", "pid", storage.jobs("c", "pid", outputs), published.extend, settled.append)
    told = [(s.key, s.state, s.remaining) for s in published]
    assert told == [("p/c/pid/a1.png", "failed", 1), ("p/c/pid/a2.png", "failed", 0)]
    assert settled == [published]
    await storage.backends.aclose()


async def test_storage_lost_mid_upload_is_retried_to_a_whole_file(
    emulator: RunningEmulator, s3_server: S3Server, gate: Gate, prefix: str
) -> None:
    """The connections to storage are reset in the middle of a 64 MB multipart upload and
    storage refuses for a while: the try fails, a later one stores the whole file, byte for byte."""
    emulator.state.catalogue.register(ExistingOutput)
    data = os.urandom(64 * 1024 * 1024)
    path = emulator.state.folders.output / "cut.bin"
    path.write_bytes(data)
    assert gate.server is not None
    gate_port = gate.server.sockets[0].getsockname()[1]
    through_gate = {"s3_endpoint": f"http://127.0.0.1:{gate_port}", "s3_public_endpoint": s3_server.endpoint}
    settings = storage_settings(s3_server, prefix, **through_gate, s3_attempts=8, s3_backoff=0.2)
    gate.open = True
    try:
        async with run_relay(relay_config(emulator, **settings)) as relay, \
                httpx.AsyncClient(base_url=relay.url) as http:  # fmt: skip
            tab = await open_tab(relay.ws_url, "clientId=cutoff")
            graph = {"1": {"class_type": "TestExistingOutput", "inputs": {"filename": "cut.bin"}}}
            prompt_id = await submit(http, "cutoff", graph, store=True)
            async with asyncio.timeout(60):
                while gate.bytes_up < 20 * 1024 * 1024:  # two parts and more on their way
                    await asyncio.sleep(0.01)
            gate.cut()
            retried = relay.state.metrics.stored_files.labels("retried")
            async with asyncio.timeout(60):
                while retried._value.get() < 1:
                    await asyncio.sleep(0.02)
            gate.open = True
            (event,) = await all_stored(tab, prompt_id, timeout=120)
            await tab.close()
        assert event["state"] == "stored", event
        assert event["attempts"] >= 2
        assert event["size"] == len(data)
        kept = await obstore.get_async(bucket(s3_server), event["key"])
        assert bytes(await kept.bytes_async()) == data
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"s3_prefix": "a/../b"}, "RELAY_S3_PREFIX"),
        ({"s3_store": "sometimes"}, "RELAY_S3_STORE"),
        ({"s3_endpoint": "http://minio:9000/bucket"}, "no path"),
        ({"s3_bucket": "b", "s3_access_key_id": "k"}, "go together"),
        ({"s3_part_size": 1024}, "5 MiB"),
        ({"s3_url_expiry": 8 * 24 * 3600}, "7 days"),
    ],
)
def test_storage_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    """A storage setting the relay cannot use stops it at start, naming the setting."""
    with pytest.raises(ConfigError, match=message):
        RelayConfig(**settings)
