"""Per-hop overhead of the peer protocol vs a plain gRPC unary echo, measured in the same run.

    python bench/bench_hop.py [--model-dir tiny|smollm2|DIR] [--rounds 7] [--steps 16] [--dtype bfloat16]

``tiny`` (default) is an 8-layer random llama whose compute is ~1 ms, so the protocol's cost shows;
``smollm2`` gives the end-to-end picture on real weights (there, compute noise on a shared CPU dominates).

Everything runs on loopback, each server in its own process with 1 torch thread. Per decode step
(one token) it times, interleaved round by round:
  local 1  one span [0,L) in a plain process (no network): the compute of "1 peer"
  local 3  the three spans chained in a plain process (no network): the compute of "3 peers"
  1 peer   coordinator -> peer [0,L) -> coordinator: 2 one-way hops
  3 peers  coordinator -> [0,a) -> [a,b) -> [b,L) -> coordinator: 4 one-way hops, same total compute
  echo     a plain gRPC unary echo of one decode-sized activation (a round trip = 2 one-way hops)
Protocol cost = peers - local with the same spans; per hop = cost / one-way hops; the echo's
one-way cost is echo / 2. Medians over all steps.

First it prints the protocol alone: the same client and servers with a null runtime (no compute,
[1, 576] bf16 hidden states), in this process, 1 peer vs 3 peers: (3 - 1) / 2 = cost per extra hop.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import statistics
import subprocess
import time
from pathlib import Path

import grpc
import torch

from bench.common import bench_model_dir, spawn_ready
from openhydra.peer.client import PeerChainClient
from openhydra.peer.messages import HopSpec
from openhydra.runtime.local_pipeline import pipeline_step
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime

ECHO_METHOD = "/bench.Echo/Echo"


def _echo_server(port: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"READY 127.0.0.1:{bound}", flush=True)
    server.wait_for_termination()


class _NullRuntime:
    """Stands in for ShardRuntime with no compute, so only the protocol is timed."""

    def __init__(self, start: int, end: int, num_layers: int = 8, hidden: int = 576, vocab: int = 64) -> None:
        self.start, self.end, self.num_layers = start, end, num_layers
        self.is_first, self.is_last = start == 0, end == num_layers
        self.hidden_size, self.vocab_size, self.dtype = hidden, vocab, torch.bfloat16
        self.model_type, self.model_dir = "null", Path("null")

    def forward(self, session_id, positions, *, input_ids=None, hidden_states=None, all_logits=False):
        if self.is_last:
            return torch.zeros(1, self.vocab_size)  # logits [1, V]
        return torch.zeros(positions.numel(), self.hidden_size, dtype=self.dtype)  # hidden [S, D]

    def session_length(self, session_id: str) -> int:
        return 0

    def close_session(self, session_id: str) -> None:
        pass

    def session_count(self) -> int:
        return 0


def _null_chain_ms(splits: list[tuple[int, int]], steps: int) -> list[float]:
    from openhydra.peer.server import PeerServer

    servers = [PeerServer(_NullRuntime(a, b)) for a, b in splits]
    route = [HopSpec(address=s.start(), start=a, end=b) for s, (a, b) in zip(servers, splits, strict=True)]
    client = PeerChainClient(route)
    greedy = SamplingParams()
    try:
        for i in range(20):  # warm up
            client.step("warm", [1], i, greedy, i)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            client.step("timed", [1], i, greedy, i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    finally:
        client.shutdown()
        for server in servers:
            server.stop()


def protocol_only(rounds: int, steps: int) -> None:
    one: list[float] = []
    three: list[float] = []
    for _ in range(rounds):
        one += _null_chain_ms([(0, 8)], steps)
        three += _null_chain_ms([(0, 3), (3, 5), (5, 8)], steps)
    m1, m3 = statistics.median(one), statistics.median(three)
    print(f"protocol only (null runtime, in-process, {rounds} rounds x {steps} steps):")
    print(f"  1 peer {m1:.3f} ms   3 peers {m3:.3f} ms   per extra hop {(m3 - m1) / 2:.3f} ms")


def _local_worker(conn, model_dir: str, dtype_name: str, splits, prompt: list[int], steps: int) -> None:
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    spans = {
        "1": [ShardRuntime(model_dir, 0, splits[-1][1], dtype=dtype)],
        "3": [ShardRuntime(model_dir, a, b, dtype=dtype) for a, b in splits],
    }
    while (request := conn.recv()) is not None:
        which, sid = request
        chain = spans[which]

        def step(ids, pos, _i, chain=chain, sid=sid):
            return int(pipeline_step(chain, sid, torch.tensor(ids), pos)[-1].argmax())

        conn.send(_decode_latencies(step, prompt, steps))
        for rt in chain:
            rt.close_session(sid)


def _decode_latencies(step_fn, prompt: list[int], steps: int) -> list[float]:
    """Prefill, then time ``steps`` single-token steps (ms)."""
    token = step_fn(prompt, 0, 0)
    pos, times = len(prompt), []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        token = step_fn([token], pos, i)
        times.append((time.perf_counter() - t0) * 1e3)
        pos += 1
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--protocol-only", action="store_true", help="only the null-runtime measurement")
    parser.add_argument("--echo-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server is not None:
        _echo_server(args.echo_server)
        return
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(1)
    protocol_only(args.rounds, 100)
    if args.protocol_only:
        return
    model_dir = bench_model_dir(args.model_dir)  # default: the tiny llama, so compute does not drown the protocol
    dtype = getattr(torch, args.dtype)
    from openhydra.runtime.shard_layers import load_text_config

    num_layers = load_text_config(model_dir).num_hidden_layers
    cuts = [0, num_layers // 3, 2 * num_layers // 3, num_layers]
    splits = list(itertools.pairwise(cuts))
    server = ["-m", "openhydra.peer.server", "--model-dir", model_dir, "--dtype", args.dtype]
    procs: list[subprocess.Popen] = []
    try:
        proc, full_addr = spawn_ready([*server, "--start", "0"])
        procs.append(proc)
        route3 = []
        for a, b in splits:
            proc, addr = spawn_ready([*server, "--start", str(a), "--end", str(b)])
            procs.append(proc)
            route3.append(HopSpec(address=addr, start=a, end=b))
        proc, echo_addr = spawn_ready([__file__, "--echo-server", "0"])
        procs.append(proc)

        one = PeerChainClient([HopSpec(address=full_addr, start=0, end=num_layers)])
        three = PeerChainClient(route3)
        prompt = list(range(100, 132))
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        # The local baselines run in their own process: grpc's threads in this one would slow them.
        worker = ctx.Process(target=_local_worker, args=(child_conn, model_dir, args.dtype, splits, prompt, args.steps))
        worker.start()
        channel = grpc.insecure_channel(echo_addr)
        echo = channel.unary_unary(ECHO_METHOD)
        hidden = load_text_config(model_dir).hidden_size
        payload = b"\x01" * (hidden * torch.tensor([], dtype=dtype).element_size())
        greedy = SamplingParams()

        def local_run(which: str, sid: str) -> list[float]:
            conn.send((which, sid))
            return conn.recv()

        results: dict[str, list[float]] = {"local 1": [], "local 3": [], "1 peer": [], "3 peers": [], "echo": []}
        for r in range(args.rounds + 1):  # round 0 warms up and is discarded
            sid = f"r{r}"

            runs = {
                "local 1": lambda sid=sid: local_run("1", sid),
                "local 3": lambda sid=sid: local_run("3", sid),
                "1 peer": lambda sid=sid: _decode_latencies(
                    lambda ids, pos, i: one.step(sid, ids, pos, greedy, i), prompt, args.steps
                ),
                "3 peers": lambda sid=sid: _decode_latencies(
                    lambda ids, pos, i: three.step(sid, ids, pos, greedy, i), prompt, args.steps
                ),
                "echo": lambda: [_time_ms(lambda: echo(payload, timeout=5)) for _ in range(args.steps)],
            }
            for name, run in runs.items():
                times = run()
                if r:
                    results[name].extend(times)
            one.close(sid)
            three.close(sid)
        med = {k: statistics.median(v) for k, v in results.items()}
        p90 = {k: sorted(v)[int(0.9 * len(v))] for k, v in results.items()}
        print(f"model {model_dir} {args.dtype}, splits {splits}, {args.rounds} rounds x {args.steps} decode steps")
        for name in results:
            print(f"{name:>8}: median {med[name]:7.3f} ms  p90 {p90[name]:7.3f} ms  (n={len(results[name])})")
        cost1 = med["1 peer"] - med["local 1"]  # 2 one-way hops + protocol, same compute
        cost3 = med["3 peers"] - med["local 3"]  # 4 one-way hops + protocol, same compute
        print(f"protocol cost, 1 peer (2 hops)   : {cost1:6.3f} ms  -> {cost1 / 2:6.3f} ms per hop")
        print(f"protocol cost, 3 peers (4 hops)  : {cost3:6.3f} ms  -> {cost3 / 4:6.3f} ms per hop")
        print(f"per extra peer ((3p-l3)-(1p-l1))/2: {(cost3 - cost1) / 2:6.3f} ms")
        print(f"one-way plain gRPC echo (echo/2) : {med['echo'] / 2:6.3f} ms")
        print(f"3 peers vs plain local [0,L), tokens/s: {med['local 1'] / med['3 peers']:6.3f}x")
        one.shutdown()
        three.shutdown()
        channel.close()
        conn.send(None)
        worker.join(timeout=30)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _time_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    main()
