"""The peer process: :class:`PeerServer` serves a span's :class:`~openhydra.peer.forward.PeerService` (the forward
stream, its control calls and rebuilds) on a gRPC server from its own event-loop thread, and
``python -m openhydra.peer.server`` serves one span from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import grpc
import torch

from openhydra.crypto.keys import StaticKeyPair
from openhydra.peer.forward import PeerService
from openhydra.peer.outbound import SERVER_OPTIONS
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.rebuild import DEFAULT_RETAIN_BYTES
from openhydra.peer.refusals import releasing
from openhydra.runtime import compute_lane
from openhydra.runtime.shard import ShardRuntime


class CannotBind(OSError):
    """The peer's port cannot be bound: a configuration error the node stops for (openhydra/cli.py)."""


class PeerServer:
    """A peer serving ``runtime`` on ``host:port`` from its own event-loop thread (port 0: any free one)."""

    def __init__(
        self,
        runtime: ShardRuntime,
        host: str = "127.0.0.1",
        port: int = 0,
        model_id: str = "",
        workers: int = 1,
        static_key: StaticKeyPair | None = None,
        require_encryption: bool = False,
        swarm_token: str | None = None,
        settlement: Any = None,
        retain_bytes: int = DEFAULT_RETAIN_BYTES,
        advertise_address: str | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self.runtime, self.host, self.port = runtime, host, port
        self.advertise_address = advertise_address  # the hop address others use (a libp2p peer's ``<id>.p2p:1``)
        self.advertise_host = advertise_host  # or the host others dial, on our port (NAT forwarding, a relay)
        self.retain_bytes = retain_bytes  # activations kept for a failover rebuild (peer/rebuild.py)
        self.settlement = settlement
        self.swarm_token = swarm_token
        self.weights: Any = None  # set before start(): openhydra/weights/serve.py WeightsServer
        self.auth = None  # SwarmAuthInterceptor in a private swarm (its refusal counts)
        self.model_id, self.workers = model_id, workers
        self.static_key = static_key or StaticKeyPair.generate()
        self.require_encryption = require_encryption
        self.service: PeerService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The running loop the server works on (None before start and after stop): the node's gRPC clients share it."""
        return self._loop

    @property
    def hop_address(self) -> str:
        """The address others put in routes for this peer (bound port known only after start)."""
        if self.advertise_address:
            return self.advertise_address
        return f"{self.advertise_host}:{self.port}" if self.advertise_host else self.address

    def start(self) -> str:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"peer-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if errors:
            raise errors[0]
        return self.address

    async def _start(self) -> None:
        interceptors = []
        if self.swarm_token is not None:
            from openhydra.peer.swarm_auth import SwarmAuthInterceptor

            self.auth = SwarmAuthInterceptor(self.swarm_token)
            interceptors.append(self.auth)
        self._server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        try:
            bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError as exc:  # gRPC's "Failed to bind": in use (no port sharing: SERVER_OPTIONS), bad host
            raise CannotBind(f"peer.port {self.port} on {self.host} cannot be bound (in use by another node, or "
                             f"not an address of this machine): {exc}") from None
        if bound == 0:
            raise CannotBind(f"peer.port {self.port} on {self.host} cannot be bound")
        self.port = bound
        self.service = PeerService(self.runtime, self.hop_address, self.model_id, self.workers,
                                   static_key=self.static_key, require_encryption=self.require_encryption,
                                   swarm_token=self.swarm_token, settlement=self.settlement,
                                   retain_bytes=self.retain_bytes)
        self.service.weights = self.weights
        pb_grpc.add_PeerServicer_to_server(releasing(self.service), self._server)
        await self._server.start()

    def stop(self, grace_s: float = 0.5) -> None:
        if self._loop is None or self._server is None:
            return

        async def shutdown() -> None:
            await self._server.stop(grace_s)
            await self.service.aclose()

        loop, self._loop = self._loop, None  # stop() is idempotent
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None, *, description: str = "OpenHydra peer: serve layers [start, end) over gRPC",
         extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
         wrap_runtime: Callable[[ShardRuntime, argparse.Namespace], Any] | None = None) -> None:
    """Serve one span: ``python -m openhydra.peer.server --model-dir DIR --start A --end B --port P``; prints
    ``READY host:port`` once serving, stops on SIGTERM/SIGINT. ``extra_args``/``wrap_runtime``: a variant's own
    flags and runtime wrapper (verification/liar_peer.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model-id", default="")
    parser.add_argument("--threads", type=int, default=1)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    compute_lane.install(args.threads)  # several threads: the span's compute on one thread (runtime/compute_lane.py)
    runtime = compute_lane.run(ShardRuntime, args.model_dir, args.start, args.end, dtype=getattr(torch, args.dtype))
    if wrap_runtime is not None:
        runtime = wrap_runtime(runtime, args)
    server = PeerServer(runtime, args.host, args.port, args.model_id)
    server.start()
    print(f"READY {server.address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
