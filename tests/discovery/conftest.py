"""Fixtures for discovery tests: a real `openhydra-dht` server process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import httpx
import pytest

from openhydra.testing.wait import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dht_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # A file, not a pipe: nobody reads the pipe while tests run, and a full pipe would block the server.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the process object, closed in stop_process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openhydra.discovery.http_dht_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"openhydra-dht exited: {_log_tail(proc)}")
        return httpx.get(f"{url}/health", timeout=2).status_code == 200

    try:
        wait_until(healthy, 60, 0.1, f"openhydra-dht to answer {url}/health", ignore=httpx.HTTPError)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def _log_tail(proc: subprocess.Popen) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def dht_server() -> Iterator[str]:
    proc, url = start_dht_server("--max-records", "50", "--max-ttl-s", "600", "--allow-unsigned-names")
    yield url
    stop_process(proc)
