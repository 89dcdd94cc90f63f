"""What the transport alone costs a hop: a ring of three processes, gRPC streams as the peers use them vs raw TCP.

    python bench/bench_ring_transport.py [--messages 300] [--rounds 3] [--gaps-ms 0,6]

Three processes A -> B -> C -> A, each on loopback with its own asyncio loop, as three peers of a pipeline. A sends
one decode step's bytes (SmolLM2's [1, 576] bf16 hidden state plus ~200 bytes of header), B and C pass it on, and A
times the message's way round: three one-way hops, nothing computed. Between messages A waits ``gap`` ms, as a peer
waits while the others compute (0 = back to back; ~6 ms is what a peer of a 3-peer ``cpu_int4`` pipeline idles).

Arms, interleaved round by round:
  grpc  a client stream per hop (``stream_unary``, written with ``call.write``) with the peers' own channel and
        server options (peer/outbound.py), the way a peer pushes a step to the next (PeerService.Forward)
  tcp   asyncio streams, a 4-byte length and the bytes, TCP_NODELAY: the least a hop can cost in Python here

It prints the median ms per hop (the ring's median / 3) per arm and gap, their ratio, and the machine and its load;
the plot shows every round. A hop of a real pipeline costs more than this (sealing, parsing, validation, the compute
waking up): this is the part a different transport could remove (docs/benchmarks.md, "The transport's share of a
hop").
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import plot_trials  # noqa: E402

PAYLOAD = os.urandom(576 * 2 + 200)
HOPS = 3


async def _grpc_node(port: int, next_port: int, head: bool, messages: int, gap: float, results: mp.Queue) -> None:
    import grpc

    from openhydra.peer.outbound import channel_options, server_options

    server = grpc.aio.server(options=server_options())
    inbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def forward(requests, _context) -> bytes:
        async for message in requests:
            inbox.put_nowait(message)
        return b""

    handler = grpc.method_handlers_generic_handler("ring", {"Forward": grpc.stream_unary_rpc_method_handler(forward)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{next_port}", options=channel_options())
    await channel.channel_ready()
    call = channel.stream_unary("/ring/Forward")()  # written to with ``write``, as OutboundStream does
    await _run(head, messages, gap, call.write, inbox, results)
    call.cancel()


async def _tcp_node(port: int, next_port: int, head: bool, messages: int, gap: float, results: mp.Queue) -> None:
    inbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_connection(reader: asyncio.StreamReader, _writer) -> None:
        try:
            while True:
                (size,) = struct.unpack("<I", await reader.readexactly(4))
                inbox.put_nowait(await reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return  # the ring ends: the process before this one stopped, or this one's loop closes

    await asyncio.start_server(on_connection, "127.0.0.1", port)
    for _ in range(200):  # the next process may not listen yet
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", next_port)
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"nothing listens on {next_port}")
    writer.transport.get_extra_info("socket").setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY

    async def send(data: bytes) -> None:
        writer.write(struct.pack("<I", len(data)) + data)

    await _run(head, messages, gap, send, inbox, results)


async def _run(head: bool, messages: int, gap: float, send, inbox: asyncio.Queue, results: mp.Queue) -> None:
    """The head times ``messages`` trips round the ring (after 20 untimed ones); the others pass messages on."""
    if not head:
        while True:
            await send(await inbox.get())
    await asyncio.sleep(0.5)  # every process connected
    rings = []
    for i in range(messages + 20):
        await asyncio.sleep(gap)
        began = time.perf_counter()
        await send(PAYLOAD)
        await inbox.get()
        if i >= 20:
            rings.append(time.perf_counter() - began)
    results.put(rings)


def _node(kind: str, port: int, next_port: int, head: bool, messages: int, gap: float, results: mp.Queue) -> None:
    run = _grpc_node if kind == "grpc" else _tcp_node
    asyncio.run(run(port, next_port, head, messages, gap, results))


def ring_ms_per_hop(kind: str, messages: int, gap_ms: float) -> float:
    from openhydra.testing.processes import free_port

    ports = [free_port() for _ in range(HOPS)]
    results: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_node, daemon=True,
                        args=(kind, ports[i], ports[(i + 1) % HOPS], i == 0, messages, gap_ms / 1e3, results))
             for i in range(HOPS)]
    for proc in procs:
        proc.start()
    try:
        rings = results.get(timeout=300)
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)
    return statistics.median(rings) * 1e3 / HOPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gaps-ms", default="0,6")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_ring_transport.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    gaps = [float(v) for v in args.gaps_ms.split(",")]
    arms = [(kind, gap) for gap in gaps for kind in ("grpc", "tcp")]
    per_hop: dict[tuple[str, float], list[float]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        for kind, gap in arms:
            per_hop[(kind, gap)].append(ring_ms_per_hop(kind, args.messages, gap))
            print(f"round {round_ + 1}/{args.rounds}: {kind}, gap {gap:g} ms: {per_hop[(kind, gap)][-1]:.3f} ms/hop",
                  flush=True)
    print("\n| gap between messages | gRPC ms per hop (rounds) | raw TCP ms per hop (rounds) | gRPC - TCP | ratio |")
    print("|---|---|---|---|---|")
    for gap in gaps:
        g, t = statistics.median(per_hop[("grpc", gap)]), statistics.median(per_hop[("tcp", gap)])
        rounds = {k: ", ".join(f"{v:.3f}" for v in per_hop[(k, gap)]) for k in ("grpc", "tcp")}
        print(f"| {gap:g} ms | {g:.3f} ({rounds['grpc']}) | {t:.3f} ({rounds['tcp']}) | {g - t:.3f} | {g / t:.2f} |")

    plot_trials({f"{kind}, gap {gap:g} ms": values for (kind, gap), values in per_hop.items()},
                "Transport alone: a ring of 3 processes on loopback", args.plot, ylabel="ms per one-way hop (median)")

if __name__ == "__main__":
    main()
