"""Start real node processes for tests and benchmarks, wait until ready, and kill them afterwards."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from openhydra.testing import TEST_CACHE_ROOT, forkserver


def ready_fields(proc: subprocess.Popen, timeout_s: float) -> list[str] | None:
    """The fields after ``READY`` on the first such line ``proc`` prints (text-mode stdout pipe), read with a
    deadline rather than a blocking readline; None if its stdout ends or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return line.split()[1:]
            if not line:  # stdout closed: no READY line will come
                return None
    return None


def terminate_all(procs, grace_s: float = 10.0) -> None:
    """SIGTERM every process still running, then wait for each; one that outlives ``grace_s`` is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEST_POW_BITS = 8
"""The join proof of work test nodes ask for (``privacy.pow_difficulty_bits``): an open swarm's default is 20
bits (1-2 CPU s per node start), which the many node processes of the test suite would add up to minutes;
8 bits still exercises solving, stamping and checking proofs. Pass ``pow_bits=None`` for the real default."""


class NodeProcess:
    """`openhydra-node` as a subprocess (same interpreter), logging to a file.

    Unless ``overrides`` set ``privacy.pow_difficulty_bits`` or ``pow_bits`` is None, the node asks for
    ``pow_bits`` (:data:`TEST_POW_BITS`) bits of proof of work: every test node of one swarm agrees."""

    def __init__(self, overrides: list[str], *, port: int | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None, threads: int = 1, pow_bits: int | None = TEST_POW_BITS,
                 cwd: Path | None = None) -> None:
        self.port = port or free_port()
        self.cwd = cwd  # another checkout (with PYTHONPATH in env): benchmarks against an earlier commit
        sets_pow = any(o.lstrip("+~").startswith("privacy.pow_difficulty_bits=") for o in overrides)
        pow_override = [f"privacy.pow_difficulty_bits={pow_bits}"] if pow_bits is not None and not sets_pow else []
        self.overrides = [*overrides, *pow_override, f"api.port={self.port}"]
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"openhydra-node-{self.port}.log"
        # Test nodes share the tests' model cache (the converted SmolLM2 of the session fixture), not ~/.cache,
        # and each has its own data dir (identity, ledger: a running node locks it, cli.py) unless it names one.
        names_home = any(o.startswith("node.data_dir=") for o in overrides) or "OPENHYDRA_HOME" in (env or {})
        home = {} if names_home else {"OPENHYDRA_HOME": tempfile.mkdtemp(prefix="openhydra-node-home-")}
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENHYDRA_THREADS": str(threads),
                    "TOKENIZERS_PARALLELISM": "false", "OPENHYDRA_CACHE": str(TEST_CACHE_ROOT), **home,
                    **(env or {})}
        self.proc: forkserver.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NodeProcess:
        self.proc = forkserver.spawn("openhydra.cli", self.overrides, env=self.env, log_path=self.log_path,
                                     cwd=self.cwd)
        return self

    def wait_ready(self, timeout_s: float = 180.0, port: int | None = None, scope: str = "node") -> NodeProcess:
        """Until /readyz answers 200 (on ``port``: a sweep's job other than the first, see :func:`start_sweep`).
        ``scope="node"``: this node's own span is loaded (a swarm starts node by node); ``"route"``: a request to it
        would find a chain of peers covering the model."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{port}" if port is not None else self.url
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz?scope={scope}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"node not ready after {timeout_s} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> NodeProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:  # a node that never became ready must not outlive the test
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class DhtProcess:
    """`openhydra-dht` (the HTTP DHT bootstrap server) as a subprocess on a free loopback port."""

    def __init__(self, port: int | None = None, allow_unsigned_names: bool = True) -> None:
        self.port = port or free_port()
        # Tests also run privacy=off swarms of named peers (node.peer_id=...), whose records are unsigned;
        # key-derived peer ids are checked against their key either way.
        self.allow_unsigned_names = allow_unsigned_names
        self.proc: forkserver.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DhtProcess:
        self.proc = forkserver.spawn(
            "openhydra.discovery.http_dht_server",
            ["--host", "127.0.0.1", "--port", str(self.port),
             *(["--allow-unsigned-names"] if self.allow_unsigned_names else [])],
            env=dict(os.environ))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("openhydra-dht did not start")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)


def signal_group(proc: forkserver.Process, sig: int) -> bool:
    """Send ``sig`` to the process group of ``proc`` (a session leader); False if the group is already gone. A fork
    server's child is reaped by the fork server, which reports its exit a moment later, so ``poll()`` can still say
    it runs when nothing is left to signal (a teardown's ProcessLookupError in CI): that is no error, and
    ``proc.wait()`` then returns its exit code."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def swarm_node_overrides(model_dir: Path, dht_url: str, start: int, end: int, data_dir: Path,
                         dtype: str = "float32", ttl_s: float = 6.0, interval_s: float = 2.0,
                         hardware: str = "cpu") -> list[str]:
    """Overrides for a node serving layers [start, end) of ``model_dir`` in an HTTP-DHT swarm."""
    return [
        "model=local", f"model.path={model_dir}", f"hardware={hardware}", f"hardware.dtype={dtype}",
        "shard=layers", f"shard.start={start}", f"shard.end={end}",
        "discovery=http", f"discovery.http.urls=[{dht_url}]", f"discovery.ttl_s={ttl_s}",
        f"discovery.announce_interval_s={interval_s}", "peer.port=0", f"node.data_dir={data_dir}",
        "api.rate_limit_requests=100000",
    ]


def start_all(nodes: list[NodeProcess], timeout_s: float = 240.0) -> list[NodeProcess]:
    """Start nodes in parallel and wait for every one to be ready."""
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready(timeout_s)
    return nodes


# ---------------------------------------------------------------- a `-m` sweep of nodes (openhydra/sweep.py)


def consecutive_free_ports(count: int) -> int:
    """A free loopback port P with P + 1 ... P + count - 1 free too: a sweep's job k serves its API on P + k."""
    while True:
        port = free_port()
        with contextlib.ExitStack() as held:
            try:
                for k in range(1, count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port + k))
            except OSError:
                continue
        return port


def sweep_overrides(model_dir: Path, dht_url: str, data_dir: Path, jobs: int, **kwargs) -> list[str]:
    """``-m`` and the overrides of a sweep of ``jobs`` nodes, each serving its share of ``model_dir``
    (``shard=index``) in an HTTP-DHT swarm (``kwargs`` as for :func:`swarm_node_overrides`)."""
    common = [o for o in swarm_node_overrides(model_dir, dht_url, 0, 1, data_dir, **kwargs)
              if not o.startswith("shard")]
    return ["-m", *common, "shard=index", f"shard.total={jobs}",
            "shard.index=" + ",".join(str(k) for k in range(jobs))]


def start_sweep(launcher: NodeProcess, jobs: int, timeout_s: float = 600.0) -> list[int]:
    """Start the sweep and wait until each job answers /readyz on its port (the launcher's + k); the jobs' pids in
    job order. A launcher that exits meanwhile ends the wait with its log."""
    import psutil

    launcher.start()
    for k in range(jobs):
        launcher.wait_ready(timeout_s, port=launcher.port + k)
    by_port = {conn.laddr.port: child.pid for child in psutil.Process(launcher.proc.pid).children()
               for conn in child.net_connections("tcp") if conn.status == psutil.CONN_LISTEN}
    return [by_port[launcher.port + k] for k in range(jobs)]
