"""A dishonest peer as its own process, for adversarial tests and demos (never a production entry point).

``python -m openhydra.verification.liar_peer --model-dir DIR --start A --end B --fault '{"mode": "perturb"}'``
serves layers [A, B) through the real gRPC :class:`~openhydra.peer.server.PeerServer`, wrapped in
:class:`~openhydra.verification.faults.FaultyRuntime`, and prints ``READY host:port`` like
``python -m openhydra.peer.server``. The fault is a validated :class:`FaultConfig` (JSON).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import torch

from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime
from openhydra.verification.config import FaultConfig
from openhydra.verification.faults import FaultyRuntime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A dishonest OpenHydra peer (tests and demos)")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fault", required=True, help="FaultConfig as JSON, e.g. '{\"mode\": \"perturb\"}'")
    args = parser.parse_args(argv)
    fault = FaultConfig.model_validate_json(args.fault)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    runtime = FaultyRuntime(ShardRuntime(args.model_dir, args.start, args.end, dtype=getattr(torch, args.dtype)),
                            fault)
    server = PeerServer(runtime, "127.0.0.1", 0)
    server.start()
    print(f"READY {server.address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
