"""A dishonest peer as its own process, for adversarial tests and demos (never a production entry point).

``python -m openhydra.verification.liar_peer --model-dir DIR --start A --end B --fault '{"mode": "perturb"}'``
serves layers [A, B) through the real gRPC :class:`~openhydra.peer.server.PeerServer`, wrapped in
:class:`~openhydra.verification.faults.FaultyRuntime`, and prints ``READY host:port`` like
``python -m openhydra.peer.server``. The fault is a validated :class:`FaultConfig` (JSON).
"""

from __future__ import annotations

import argparse

from openhydra.peer.server import main as serve
from openhydra.runtime.shard import ShardRuntime
from openhydra.verification.config import FaultConfig
from openhydra.verification.faults import FaultyRuntime


def _fault_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fault", required=True, help="FaultConfig as JSON, e.g. '{\"mode\": \"perturb\"}'")


def _faulty(runtime: ShardRuntime, args: argparse.Namespace) -> FaultyRuntime:
    return FaultyRuntime(runtime, FaultConfig.model_validate_json(args.fault))


def main(argv: list[str] | None = None) -> None:
    serve(argv, description="A dishonest OpenHydra peer (tests and demos)", extra_args=_fault_flag,
          wrap_runtime=_faulty)


if __name__ == "__main__":
    main()
