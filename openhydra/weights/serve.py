"""Serving weights to joining peers: the FetchWeights RPC's logic (served by openhydra/peer/control_rpcs.py).

A peer offers the byte ranges of its checkpoint folder that its own span loads (manifest.span_needs): its
layers' tensors, the embeddings / final norm / head where its span has them, every safetensors header and
every small file (config, tokenizer). Requests name the manifest hash (a peer serving another version
answers FAILED_PRECONDITION) and a range that must lie inside one of those pieces (else OUT_OF_RANGE), so a
peer never hands out bytes it did not verify or load. All streams together are paced to
``peer.share_weights_mbps`` by one virtual-clock limiter; 0 means the peer does not share at all.

The fetcher trusts none of this: it checks every chunk against the manifest (openhydra/weights/fetch.py).
``OPENHYDRA_WEIGHTS_FAULT=flip`` makes a peer flip one byte per message it sends: a dishonest peer on purpose,
for the tests and demos that show it is detected, avoided and reported.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from openhydra.peer.proto import peer_pb2 as pb
from openhydra.weights.manifest import MANIFEST_FILE, SignedManifest, span_needs

log = logging.getLogger(__name__)

MESSAGE_BYTES = 1 << 20
"""Bytes per streamed message (the gRPC default receive limit is 4 MiB)."""
MAX_REQUEST_BYTES = 1 << 30
FAULT_ENV = "OPENHYDRA_WEIGHTS_FAULT"


class Pacer:
    """Paces bytes to ``bytes_per_s`` over every stream of a server (a virtual clock, burst of ``burst_s``)."""

    def __init__(self, bytes_per_s: float, burst_s: float = 0.25) -> None:
        self.bytes_per_s = bytes_per_s
        self.burst_s = burst_s
        self._next = time.monotonic()

    async def take(self, n: int) -> None:
        if self.bytes_per_s <= 0:
            return
        now = time.monotonic()
        start = max(self._next, now - self.burst_s)
        self._next = start + n / self.bytes_per_s
        delay = self._next - now - self.burst_s
        if delay > 0:
            await asyncio.sleep(delay)


class WeightsServer:
    """Serves the pieces of ``folder`` that a node holding layers ``span`` loads, at most ``mbps`` megabits/s."""

    def __init__(self, folder: Path, signed: SignedManifest, span: tuple[int, int], mbps: float,
                 fault: str | None = None) -> None:
        manifest = signed.check()
        self.folder = Path(folder)
        self.content_hash = signed.content_hash
        self.span = span
        self.mbps = mbps
        self.fault = fault if fault is not None else os.environ.get(FAULT_ENV) or None
        self._manifest_json = signed.model_dump_json().encode()
        self._pacer = Pacer(mbps * 1e6 / 8)
        # Per file: sorted, merged [start, end) ranges this peer serves.
        self._ranges: dict[str, tuple[list[int], list[int]]] = {}
        for entry in manifest.files:
            spans: list[list[int]] = []
            for piece in entry.pieces:
                if span_needs(piece.name, span, manifest.num_layers, manifest.tie_word_embeddings):
                    if spans and spans[-1][1] == piece.offset:
                        spans[-1][1] = piece.offset + piece.length
                    else:
                        spans.append([piece.offset, piece.offset + piece.length])
            self._ranges[entry.path] = ([s for s, _ in spans], [e for _, e in spans])
        self.bytes_served = 0
        self.requests = 0
        self.refused = 0
        self.offered_bytes = sum(e - s for starts, ends in self._ranges.values()
                                 for s, e in zip(starts, ends, strict=True))

    def allows(self, path: str, offset: int, length: int) -> bool:
        ranges = self._ranges.get(path)
        if ranges is None:
            return False
        starts, ends = ranges
        i = bisect.bisect_right(starts, offset) - 1
        return i >= 0 and offset + length <= ends[i]

    def status(self) -> dict[str, object]:
        return {"manifest": self.content_hash, "span": list(self.span), "mbps": self.mbps,
                "offered_bytes": self.offered_bytes, "bytes_served": self.bytes_served, "requests": self.requests,
                "refused": self.refused}

    async def stream(self, request: pb.WeightsRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[pb.WeightsChunk]:
        self.requests += 1
        if request.manifest_hash != self.content_hash:
            self.refused += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this peer serves manifest {self.content_hash}, not {request.manifest_hash[:80]!r}")
        if request.path == MANIFEST_FILE:
            blob = self._manifest_json
            for offset in range(0, len(blob), MESSAGE_BYTES):
                yield pb.WeightsChunk(offset=offset, data=blob[offset:offset + MESSAGE_BYTES])
            return
        offset, length = int(request.offset), int(request.length)
        if length == 0 or length > MAX_REQUEST_BYTES or not self.allows(request.path, offset, length):
            self.refused += 1
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"{request.path[:200]!r} [{offset}, {offset + length}) is not a range this peer's "
                                f"span {list(self.span)} serves")
        with open(self.folder / request.path, "rb") as f:
            end = offset + length
            while offset < end:
                n = min(MESSAGE_BYTES, end - offset)
                await self._pacer.take(n)
                data = os.pread(f.fileno(), n, offset)
                if len(data) != n:
                    await context.abort(grpc.StatusCode.DATA_LOSS, f"short read of {request.path} at {offset}")
                if self.fault == "flip":  # a dishonest peer, on purpose (tests): one flipped byte per message
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.bytes_served += n
                yield pb.WeightsChunk(offset=offset, data=data)
                offset += n


def weights_server_for(folder: Path, span: tuple[int, int], mbps: float, identity=None) -> WeightsServer | None:
    """What a node serves (None when sharing is off or the folder has no manifest and cannot get one)."""
    if mbps <= 0:
        return None
    from openhydra.weights.fetch import fetched_manifest
    from openhydra.weights.manifest import ensure_manifest

    signed = fetched_manifest(folder)  # a folder fetched from the swarm: the pinned manifest it was checked with
    if signed is None:
        signed = ensure_manifest(folder, identity)
    server = WeightsServer(folder, signed, span, mbps)
    log.info("sharing weights of layers [%d, %d) (manifest %s, %.0f MB) at up to %.0f Mbit/s", *span,
             signed.content_hash[:16], server.offered_bytes / 1e6, mbps)
    return server


def main(argv: list[str] | None = None) -> None:
    """A weights-only seeder: ``python -m openhydra.weights.serve --folder DIR [--start A --end B] --port P``.

    Serves FetchWeights for a checkpoint folder without loading the model (benchmarks, or seeding a swarm from a
    machine that does not compute); every other Peer RPC answers UNIMPLEMENTED.
    """
    import argparse
    import signal

    from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
    from openhydra.peer.refusals import releasing
    from openhydra.weights.manifest import ensure_manifest

    parser = argparse.ArgumentParser(prog="python -m openhydra.weights.serve", description=main.__doc__)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--mbps", type=float, default=0.0, help="cap in megabits/s (0: unpaced)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signed = ensure_manifest(args.folder)
    span = (args.start, args.end if args.end is not None else signed.manifest.num_layers)
    weights = WeightsServer(args.folder, signed, span, args.mbps)

    class WeightsOnly(pb_grpc.PeerServicer):
        async def FetchWeights(self, request, context):
            async for chunk in weights.stream(request, context):
                yield chunk

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_PeerServicer_to_server(releasing(WeightsOnly()), server)
        port = server.add_insecure_port(f"{args.host}:{args.port}")
        await server.start()
        print(f"READY {args.host}:{port} {signed.content_hash}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0.5)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
