"""A real S3-compatible server for a test run: SeaweedFS (``weed mini``) on free ports.

Installed by ``scripts/install-s3.sh`` (``make s3``) into build/tools/seaweedfs. It is started
once per test session, with its data in a temporary folder, one bucket and one access key
(anonymous requests are refused, so a presigned URL that works proves its signature), and
stopped at the end. Tests keep apart by key prefix. Without the binary the tests that need it
skip, saying why; under CI (``CI`` set) they fail instead, since CI installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from relay.emulator.nodes import Input, Node, NodeResult, RunContext

__all__ = ["WEED", "ExistingOutput", "S3Server", "s3_server", "start_s3"]

WEED = Path(__file__).parents[1] / "build" / "tools" / "seaweedfs" / "bin" / "weed"
BUCKET = "results"
ACCESS_KEY = "relay-test-key"
SECRET_KEY = "relay-test-secret-0123456789abcdef"


class ExistingOutput(Node):
    """Test-only output node: reports a file already in the output folder as its result (a
    file of any size for the storage tests and bench/storage.py)."""

    class_type = "TestExistingOutput"
    display_name = "Existing output (test)"
    category = "test"
    python_module = "custom_nodes.test"
    output_node = True
    required: ClassVar[Mapping[str, Input]] = {"filename": Input.string("huge.bin")}

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeResult:
        return NodeResult(
            (), {"files": [{"filename": inputs["filename"], "subfolder": "", "type": "output"}]}
        )


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, none of them another's +10000 (weed's gRPC default)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
            port = probe.getsockname()[1]
            if port + 10000 < 65536 and port not in ports:
                ports.append(port)
    finally:
        for probe in sockets:
            probe.close()
    return ports


def start_s3(folder: Path) -> S3Server:
    """Start ``weed mini`` in ``folder`` and wait until its S3 API stores and reads an object."""
    folder.mkdir(parents=True, exist_ok=True)
    credentials = [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    identities = {"identities": [{"name": "relay", "credentials": credentials, "actions": actions}]}
    config = folder / "s3.json"
    config.write_text(json.dumps(identities))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
             "admin.port.grpc"]  # fmt: skip
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    data = folder / "data"
    data.mkdir(exist_ok=True)
    command = [str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               *(f"-{name}={port}" for name, port in ports.items()),
               "-webdav=false", "-admin.ui=false", f"-s3.config={config}", f"-bucket={BUCKET}",
               "-master.volumeSizeLimitMB=1024", "-volume.max=4"]  # fmt: skip
    log = folder / "weed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", BUCKET, ACCESS_KEY, SECRET_KEY, process, log)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server) -> None:
    """Until a signed PUT and GET of a probe object work (the bucket exists, the volume is up)."""
    import obstore  # noqa: PLC0415
    from obstore.store import S3Store  # noqa: PLC0415

    store = S3Store(server.bucket, endpoint=server.endpoint, access_key_id=server.access_key,
                    secret_access_key=server.secret_key, region="us-east-1",
                    virtual_hosted_style_request=False, client_options={"allow_http": True},
                    retry_config={"max_retries": 0})  # fmt: skip
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited at start: {server.log.read_text()[-2000:]}")
        try:
            httpx.get(server.endpoint, timeout=1)
            obstore.put(store, "probe/ready", b"ready")
            if bytes(obstore.get(store, "probe/ready").bytes()) == b"ready":
                return
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"the S3 server did not come up in 60 s: {last}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if not WEED.exists():
        message = "no S3-compatible server installed (make s3)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI installs it, so this is a failure there")
        pytest.skip(message)
    server = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
