"""A keyed peer as a real OS process, for the adversarial tests: an identity, a signed static key, encryption required.

Run as ``python -m tests.adversarial.keyed_peer --model-dir DIR --start A --end B [--ledger-dir DIR]``; prints
``READY <address> <peer id> <signed static key>`` once it serves, then serves until SIGTERM. With ``--ledger-dir``
it also settles (barter economy, its ledger in that folder, model id :data:`SETTLE_MODEL`).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.records import encode_static_key
from openhydra.peer.messages import HopSpec
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing import forkserver
from openhydra.testing.processes import ready_fields, terminate_all

READY_TIMEOUT_S = 300.0  # several peers start at once on 2 shared cores
SETTLE_MODEL = "tiny-adversarial"  # the model id a settling keyed peer signs for


def main(argv: list[str] | None = None, patch: Callable[[argparse.Namespace], None] | None = None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Serve one keyed peer until SIGTERM; ``extra`` adds flags, ``patch(args)`` alters the peer before it starts
    (an adversarial variant, see dp_cheat_peer.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--ledger-dir", default=None, help="settle what it serves, ledger in this folder")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if patch is not None:
        patch(args)
    torch.set_num_threads(1)
    identity, static = Identity.generate(), StaticKeyPair.generate()
    settlement = None
    if args.ledger_dir:
        from openhydra.economy.factory import build_economy
        from openhydra.economy.peer_settlement import PeerSettlement

        economy = build_economy(identity=identity, data_dir=args.ledger_dir)
        settlement = PeerSettlement(identity, economy, SETTLE_MODEL, (args.start, args.end))
    server = PeerServer(ShardRuntime(args.model_dir, args.start, args.end, dtype=torch.float32), static_key=static,
                        require_encryption=True, settlement=settlement)
    address = server.start()
    print(f"READY {address} {identity.peer_id} {encode_static_key(static.signed_by(identity))}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


def _wait_ready(proc: forkserver.Process, start: int, end: int) -> HopSpec:
    fields = ready_fields(proc, READY_TIMEOUT_S)
    if fields is not None:
        address, peer_id, static_key = fields
        return HopSpec(address=address, start=start, end=end, peer_id=peer_id, static_key=static_key)
    proc.kill()
    raise RuntimeError(f"keyed peer [{start},{end}) did not start (exit code {proc.poll()})")


@contextmanager
def keyed_peers(model_dir: Path, splits: list[tuple[int, int]], module: str = "tests.adversarial.keyed_peer",
                flags: list[list[str]] | None = None) -> Iterator[tuple[list[HopSpec], list[forkserver.Process]]]:
    """Start one keyed peer process per span (in parallel; ``module`` runs it, ``flags[i]`` are span i's extra
    arguments); yield the route and the processes; SIGTERM (then SIGKILL) them all at the end."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs: list[forkserver.Process] = []
    try:
        for i, (start, end) in enumerate(splits):
            args = ["--model-dir", str(model_dir), "--start", str(start), "--end", str(end),
                    *(flags[i] if flags else [])]
            procs.append(forkserver.spawn(module, args, env=env, stdout_pipe=True, stderr_null=True,
                                          cwd=Path(__file__).resolve().parents[2]))
        yield [_wait_ready(proc, a, b) for proc, (a, b) in zip(procs, splits, strict=True)], procs
    finally:
        terminate_all(procs)


if __name__ == "__main__":
    main()
