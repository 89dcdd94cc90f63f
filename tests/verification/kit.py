"""An in-process swarm for verification tests: real gRPC PeerServers (some with FaultyRuntime), real
PeerChainClient and SwarmPipeline, and a Verifier with its SQLite reputation store."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.server import PeerServer
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing import forkserver
from openhydra.verification.config import FaultConfig, VerificationConfig
from openhydra.verification.referee import Referee, load_span
from openhydra.verification.reputation import ReputationStore
from openhydra.verification.verifier import Verifier

MODEL_ID = "tiny-test"
GREEDY = SamplingParams()


@dataclass
class PeerSpec:
    peer_id: str
    start: int
    end: int
    dtype: torch.dtype = torch.float32
    fault: FaultConfig | None = None
    throughput: float = 100.0  # higher = cheaper: the route prefers it
    threads: int | None = None  # set: a separate `python -m openhydra.peer.server` process
    quantization: str = "none"  # in-process peers only: runtime/quantize.py (the record says it: ShardRuntime.numerics)


def prompt_of(seed: int, n: int = 6) -> list[int]:
    return torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class PeerProcess:
    """A peer as its own process (its own dtype and thread count; a liar if ``spec.fault``). Started by the constructor;
    :meth:`wait_ready` reads its ``READY host:port`` line, so several peers can load at the same time."""

    def __init__(self, model_dir: Path, spec: PeerSpec) -> None:
        dtype = str(spec.dtype).removeprefix("torch.")
        # A peer with a fault runs the same PeerServer around a FaultyRuntime (openhydra/verification/liar_peer.py).
        entry = ["openhydra.peer.server"] if spec.fault is None else \
            ["openhydra.verification.liar_peer", "--fault", spec.fault.model_dump_json()]
        self.proc = forkserver.spawn(
            entry[0], [*entry[1:], "--model-dir", str(model_dir), "--start",
                       str(spec.start), "--end", str(spec.end), "--dtype", dtype, "--threads", str(spec.threads)],
            env={**os.environ, "OMP_NUM_THREADS": str(spec.threads)}, stdout_pipe=True, stderr_null=True)
        self.address = ""

    def wait_ready(self, timeout_s: float = 240.0) -> str:
        with selectors.DefaultSelector() as sel:  # a deadline on the READY line, not a blocking readline
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                self.proc.kill()
                raise RuntimeError(f"peer process printed nothing in {timeout_s} s")
        line = self.proc.stdout.readline()
        match = re.match(r"READY (\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"peer process did not start: {line!r}")
        self.address = match.group(1)
        return self.address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def make_referee(model_dir: Path, num_layers: int, fault: FaultConfig | None = None, keep_s: float = 300.0) -> Referee:
    """A referee serving spans of ``model_dir`` from this process (a lying one with ``fault``: tests of its limits)."""
    def load(span: tuple[int, int], dtype: str):
        runtime = load_span(model_dir, span, dtype)
        if fault is not None:
            from openhydra.verification.faults import FaultyRuntime

            runtime = FaultyRuntime(runtime, fault)
        return runtime

    def record(runtime, address: str) -> PeerAnnouncement:
        return PeerAnnouncement(peer_id="coordinator", model_id=MODEL_ID, start=runtime.start, end=runtime.end,
                                total_layers=num_layers, grpc_address=address, dtype=str(runtime.dtype).split(".")[-1],
                                announced_at=time.time(), ttl_s=keep_s)

    return Referee(load, PeerServer, record, keep_s=keep_s)


class Swarm:
    def __init__(self, model_dir: Path, specs: list[PeerSpec], config: VerificationConfig, db_path: Path | None,
                 *, route_by_reputation: bool = True, stake: dict[str, int] | None = None,
                 referee: bool = False, referee_fault: FaultConfig | None = None) -> None:
        self.model_dir = model_dir
        self.servers: list[PeerServer | PeerProcess] = []
        self.records: list[PeerAnnouncement] = []
        self.runtimes = {}
        self.last_chain: list[str] = []
        num_layers = ShardRuntime(model_dir, 0, 1).num_layers
        # Every peer process starts at once (loading is mostly imports and reads), then each is awaited in order.
        processes = {i: PeerProcess(model_dir, spec) for i, spec in enumerate(specs) if spec.threads is not None}
        try:
            for i, spec in enumerate(specs):
                if i in processes:
                    server = processes[i]
                    address = server.wait_ready()
                else:
                    runtime = ShardRuntime(model_dir, spec.start, spec.end, dtype=spec.dtype,
                                           quantization=spec.quantization)
                    if spec.fault is not None:
                        from openhydra.verification.faults import FaultyRuntime

                        runtime = FaultyRuntime(runtime, spec.fault)
                    self.runtimes[spec.peer_id] = runtime
                    server = PeerServer(runtime)
                    address = server.start()
                self.servers.append(server)
                self.records.append(PeerAnnouncement(
                    peer_id=spec.peer_id, model_id=MODEL_ID, start=spec.start, end=spec.end,
                    total_layers=num_layers, grpc_address=address, dtype=str(spec.dtype).removeprefix("torch."),
                    backend=getattr(self.runtimes.get(spec.peer_id), "numerics", "pytorch"),
                    throughput_tps=spec.throughput, announced_at=time.time(), ttl_s=86400.0,
                ))
        except BaseException:
            for server in [*self.servers, *(p for p in processes.values() if p not in self.servers)]:
                server.stop()
            raise
        stake = stake or {}
        self.reputation = ReputationStore(db_path, config.reputation, stake_of=lambda p: stake.get(p, 0))
        self.verifier = Verifier(config, self.reputation)
        self.referee: Referee | None = None
        if referee:  # this process's own copy of a disputed span (verification/referee.py), as node.py builds it
            self.referee = self.verifier.referee = make_referee(model_dir, num_layers, referee_fault)
        self.client = PeerChainClient([], tunables=ClientTunables(step_timeout_s=60.0))
        self.pipeline = SwarmPipeline(MODEL_ID, num_layers, lambda: list(self.records), self.client,
                                      score=self.verifier.score if route_by_reputation else None,
                                      verifier=self.verifier)

    def generate(self, session: str, prompt: list[int], n: int, sampling: SamplingParams = GREEDY) -> list[int]:
        tokens: list[int] = []
        feed, pos = prompt, 0
        for step in range(n):
            token = self.pipeline.step(session, feed, pos, sampling, step)
            tokens.append(token)
            pos += len(feed)
            feed = [token]
        self.last_chain = self.pipeline.status()["sessions"].get(session, [])
        self.pipeline.close(session)
        return tokens

    def close(self) -> None:
        self.verifier.shutdown()
        self.client.shutdown()
        for server in self.servers:
            server.stop()
