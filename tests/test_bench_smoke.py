"""The benchmarks still run (tiny sizes; figures come from running them in full, never from tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_fanout_benchmark_runs(tmp_path: Path) -> None:
    """bench/fanout.py measures both paths and writes every figure it reports."""
    out = tmp_path / "fanout.json"
    sizes = ["--subscribers", "2", "--events", "5", "--rate", "50", "--repeat", "1"]
    command = [sys.executable, str(BENCH / "fanout.py"), *sizes, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "N=2" in result.stdout
    [row] = json.loads(out.read_text())
    assert row["subscribers"] == 2
    assert row["delivered_frames"] >= 10  # five progress events to each of two tabs, at least
    for key in ("relay_cpu_us_per_frame", "relay_p50_ms", "direct_p50_ms", "idle_kb_per_subscriber"):
        assert row[key] > 0


def test_proxy_benchmark_runs() -> None:
    """bench/proxy.py measures downloads and uploads both ways and prints their ratios."""
    command = [sys.executable, str(BENCH / "proxy.py"), "--megabytes", "1", "--repeat", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "download /view" in result.stdout
    assert "upload /upload/image" in result.stdout
    assert result.stdout.count("ratio") == 2


def test_eager_benchmark_runs() -> None:
    """bench/eager.py compares relay.eager with task-based sends and prints a ratio for each."""
    command = [
        sys.executable,
        str(BENCH / "eager.py"),
        "--subscribers",
        "10",
        "--events",
        "5",
        "--repeat",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "eager (relay.eager)" in result.stdout
    assert "writer tasks" in result.stdout
    assert result.stdout.count("ratio") >= 3


def test_replicas_benchmark_runs(tmp_path: Path) -> None:
    """bench/replicas.py measures memory, one and three relays on Redis, and writes each figure."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis)")
    out = tmp_path / "replicas.json"
    # Enough events for CPU time to show: /proc counts it in 10 ms ticks.
    sizes = ["--subscribers", "3", "--events", "40", "--rate", "100", "--repeat", "1"]
    command = [sys.executable, str(BENCH / "replicas.py"), *sizes, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)
    assert "redis-3 vs memory" in result.stdout
    rows = {row["setup"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"memory", "redis-1", "redis-3"}
    for row in rows.values():
        assert row["delivered_frames"] >= 120  # forty progress events to each of three tabs
        assert row["relay_cpu_us_per_frame"] > 0
    assert rows["memory"]["redis_commands_per_event"] == 0
    assert rows["redis-1"]["redis_commands_per_event"] > 1  # each event's write, counted by Redis


def test_soak_runs(tmp_path: Path) -> None:
    """bench/soak.py drives clients through two short phases and reports growth against idle."""
    out = tmp_path / "soak.json"
    sizes = ["--phase", "3", "--phases", "2", "--clients", "3", "--settle", "60"]
    command = [sys.executable, str(BENCH / "soak.py"), *sizes, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert "growth: rss over the last phase" in result.stdout, result.stdout + result.stderr
    row = json.loads(out.read_text())
    assert row["prompts"] > 0
    assert row["dones"] >= row["prompts"]  # every tab of every prompt, one at least each
    assert [quiet["clients"] for quiet in row["after_phases"]] == [0, 0]  # every session reaped
    for key in ("rss_mb", "fds", "tasks"):
        assert row["idle"][key] > 0
    assert (row["errors_5xx"], row["missing_dones"], row["foreign_events"]) == (0, 0, 0)


def test_storage_benchmark_runs(s3_server: object) -> None:
    """bench/storage.py times relay.done to relay.stored, the direct copy and the plain upload.
    (It starts its own S3 server; the fixture only skips, or fails under CI, without one.)"""
    command = [sys.executable, str(BENCH / "storage.py"), "--megabytes", "2", "--repeat", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=True)
    assert "relay.done -> relay.stored" in result.stdout
    assert result.stdout.count("ratio") == 2


def test_s3_clients_benchmark_runs(s3_server: object) -> None:
    """bench/s3_clients.py measures each installed S3 client (obstore here) and says which it
    could not."""
    command = [sys.executable, str(BENCH / "s3_clients.py"), "--megabytes", "2", "--repeat", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=True)
    assert "obstore" in result.stdout
    assert "presigned URL fetched whole: True" in result.stdout


def test_backends_benchmark_runs() -> None:
    """bench/backends.py runs a burst through each setup and reports each one's throughput and ratios."""
    command = [
        sys.executable,
        str(BENCH / "backends.py"),
        "--prompts",
        "3",
        "--rounds",
        "1",
        "--speed",
        "40",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(report["results"]) == {"single", "round-robin", "routed"}
    assert report["results"]["single"]["spread"] == {"backend 0": 3, "backend 1": 0, "backend 2": 0}
    assert report["results"]["round-robin"]["spread"] == {"backend 0": 1, "backend 1": 1, "backend 2": 1}
    for setup, row in report["results"].items():
        assert row["prompts_per_second"] > 0, setup
        assert 1 <= row["checkpoint_loads"] <= 3
    assert report["ratios"]["single"]["vs_single"] == 1.0
    assert report["ratios"]["round-robin"]["vs_round_robin"] == 1.0
