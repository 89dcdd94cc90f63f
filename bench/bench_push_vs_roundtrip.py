"""Push forwarding vs a coordinator round trip per hop (Petals' client-driven style), under emulated RTT.

    python bench/bench_push_vs_roundtrip.py [--model-dir tiny|smollm2|DIR] [--one-way-ms 0 10] [--trials 5]

Three spans of the same model, each in its own process with 1 torch thread, are served twice:
  push     our peers (openhydra.peer.server): coordinator -> P1 -> P2 -> P3 -> coordinator,
           N + 1 = 4 one-way link crossings per token;
  client   a minimal client-driven span server (in this script: one unary RPC, hidden states in,
           hidden states or logits out, on the same ShardRuntime): coordinator -> Pi -> coordinator
           for each span, 2N = 6 one-way crossings per token.
Every connection, including the peers' own pushes and the last peer's answer to the coordinator, goes
through the userspace delay relay (openhydra/sim/relay.py; this kernel has no ``tc netem``), which adds
``one_way_ms`` per crossing: servers bind 127.0.0.1, everything is addressed at 127.0.0.2, where the relay
listens on the same ports. ``compute`` chains the same three spans in one process (no network).

Per decode step it reports medians, interleaved trial by trial: push, client, compute, and the model
push = compute + 4 x one-way, client = compute + 6 x one-way (ideally). Prints the ratio client / push per RTT.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import time
from pathlib import Path

import grpc
import torch

from bench.common import bench_model_dir, plot_trials, spawn_ready
from openhydra.peer.client import PeerChainClient
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.wire import decode_tensor, encode_tensor
from openhydra.runtime.local_pipeline import pipeline_step
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime
from openhydra.sim.relay import LinkSpec, RelayThread, Wire

SPAN_METHOD = "/bench.Span/Run"
RELAY_HOST = "127.0.0.2"  # everything is addressed here; the relay forwards to 127.0.0.1, same port


# ---------------------------------------------------------------- the client-driven baseline server
def _span_server(model_dir: str, start: int, end: int, dtype: str) -> None:
    """One unary RPC per hop: pb.Step (ids or hidden states) in, pb.Result (hidden states or logits) out."""
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    runtime = ShardRuntime(model_dir, start, end, dtype=getattr(torch, dtype))

    def run(request: bytes, context) -> bytes:
        step = pb.Step.FromString(request)
        positions = torch.arange(step.start_position, step.start_position + step.num_positions)
        tensor = decode_tensor(step.tensor)
        if tensor.dtype == torch.int64:
            out = runtime.forward(step.session_id, positions, input_ids=tensor)
        else:
            out = runtime.forward(step.session_id, positions, hidden_states=tensor)
        return pb.Result(session_id=step.session_id, seq=step.seq, logits=encode_tensor(out)).SerializeToString()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "bench.Span", {"Run": grpc.unary_unary_rpc_method_handler(run)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


class ClientDriven:
    """The coordinator calls every span in turn and carries hidden states itself."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.calls = [c.unary_unary(SPAN_METHOD) for c in self.channels]

    def step(self, session_id: str, ids: list[int], start: int) -> int:
        tensor = encode_tensor(torch.tensor(ids, dtype=torch.int64))
        for call in self.calls:
            step = pb.Step(session_id=session_id, start_position=start, num_positions=len(ids), tensor=tensor)
            tensor = pb.Result.FromString(call(step.SerializeToString(), timeout=60)).logits
        return int(decode_tensor(tensor)[-1].argmax())

    def close(self) -> None:
        for c in self.channels:
            c.close()


# ---------------------------------------------------------------- helpers
def _relayed(address: str) -> str:
    return f"{RELAY_HOST}:{address.rsplit(':', 1)[1]}"


class Relay(RelayThread):
    """The delay relay on its own event loop thread. Links are 1 ms and ``Wire.delay_scale`` (read per chunk)
    sets the one-way delay in ms, so it changes between trials on the same long-lived HTTP/2 connections."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(RELAY_HOST, ports, lambda s, d: LinkSpec(1.0, 0.0))


def _decode_ms(step_fn, prompt: list[int], steps: int) -> list[float]:
    token = step_fn(prompt, 0)
    pos, times = len(prompt), []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = step_fn([token], pos)
        times.append((time.perf_counter() - t0) * 1e3)
        pos += 1
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--one-way-ms", type=float, nargs="+", default=[0.0, 10.0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--plot", default="docs/img/bench_push_vs_roundtrip.png")
    parser.add_argument("--serve-span", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_span is not None:
        path, a, b = args.serve_span
        _span_server(path, int(a), int(b), args.dtype)
        return
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(1)
    model_dir = bench_model_dir(args.model_dir)
    from openhydra.runtime.shard_layers import load_text_config

    num_layers = load_text_config(model_dir).num_hidden_layers
    splits = list(itertools.pairwise([0, num_layers // 3, 2 * num_layers // 3, num_layers]))
    procs: list[subprocess.Popen] = []
    try:
        peers, spans = [], []
        for a, b in splits:
            proc, addr = spawn_ready(["-m", "openhydra.peer.server", "--model-dir", model_dir, "--dtype", args.dtype,
                                 "--start", str(a), "--end", str(b)])
            procs.append(proc)
            peers.append(addr)
            proc, addr = spawn_ready([__file__, "--dtype", args.dtype, "--serve-span", model_dir, str(a), str(b)])
            procs.append(proc)
            spans.append(addr)
        push = PeerChainClient([HopSpec(address=_relayed(p), start=a, end=b) for p, (a, b) in zip(peers, splits,
                                                                                                    strict=True)],
                               advertise_host=RELAY_HOST)
        client = ClientDriven([_relayed(s) for s in spans])
        ports = [int(a.rsplit(":", 1)[1]) for a in [*peers, *spans, push.reply_address]]
        relay = Relay(ports)
        local = [ShardRuntime(model_dir, a, b, dtype=getattr(torch, args.dtype)) for a, b in splits]
        prompt = list(range(100, 132))
        greedy = SamplingParams()
        ids = itertools.count()
        arms = {
            "push": lambda sid: _decode_ms(lambda t, p: push.step(sid, t, p, greedy, p), prompt, args.steps),
            "client": lambda sid: _decode_ms(lambda t, p: client.step(sid, t, p), prompt, args.steps),
            "compute": lambda sid: _decode_ms(lambda t, p: int(pipeline_step(local, sid, torch.tensor(t), p)[-1]
                                                                 .argmax()), prompt, args.steps),
        }
        results: dict[float, dict[str, list[float]]] = {}
        for one_way in args.one_way_ms:
            Wire.delay_scale = one_way
            per_trial: dict[str, list[float]] = {k: [] for k in arms}
            for trial in range(args.trials + 1):  # trial 0 warms up the connections and is not counted
                for name, run in arms.items():
                    ms = statistics.median(run(f"{name}-{one_way}-{next(ids)}"))
                    if trial:
                        per_trial[name].append(ms)
                print(f"one-way {one_way:g} ms, trial {trial}/{args.trials}: "
                      + "  ".join(f"{k} {v[-1]:.1f}" for k, v in per_trial.items() if v), flush=True)
            results[one_way] = per_trial
        client.close()
        push.shutdown()
        relay.close()
    finally:
        for proc in procs:
            proc.kill()
    _report(results, args.plot)


def _report(results: dict[float, dict[str, list[float]]], plot: str) -> None:
    print("\n| one-way delay | compute ms | push ms | client-driven ms | push - compute | client - compute "
          "| model push (4 x d) | model client (6 x d) | client / push |")
    print("|---|---|---|---|---|---|---|---|---|")
    series: dict[str, list[float]] = {}
    for one_way, arms in results.items():
        m = {k: statistics.median(v) for k, v in arms.items()}
        ratios = [c / p for c, p in zip(arms["client"], arms["push"], strict=True)]
        print(f"| {one_way:g} ms | {m['compute']:.2f} | {m['push']:.2f} | {m['client']:.2f} "
              f"| {m['push'] - m['compute']:.2f} | {m['client'] - m['compute']:.2f} | {4 * one_way:g} "
              f"| {6 * one_way:g} | **{statistics.median(ratios):.2f}** |")
        for k, v in arms.items():
            series[f"{k} @ {one_way:g} ms"] = v
    plot_trials(series, "per-token time: push vs client-driven round trips (3 spans)", Path(plot),
                ylabel="ms per decode step (median per trial)")
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
