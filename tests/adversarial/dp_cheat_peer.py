"""A keyed peer as a real OS process for the privacy tests, honest or cheating on DP noise.

``python -m tests.adversarial.dp_cheat_peer --model-dir DIR --start A --end B [--cheat]`` prints
``READY <address> <peer id> <signed static key>`` once it serves, then serves until SIGTERM. With ``--cheat`` it
sends its clean hidden states on, with the honest audit record of the noised tensor it should have sent (so the
record alone is perfect: right seed, sigma, clip and tag).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.records import encode_static_key
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.server import PeerServer, PeerService
from openhydra.runtime.shard import ShardRuntime

READY_TIMEOUT_S = 300.0
_honest = PeerService._dp_noise


def _clean_with_honest_record(self, state, hidden: torch.Tensor, step: pb.Step) -> tuple[torch.Tensor, bytes]:
    _noised, record = _honest(self, state, hidden, step)  # the record covers the noised tensor...
    return hidden, record  # ...but the clean one goes on the wire


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--cheat", action="store_true")
    args = parser.parse_args()
    if args.cheat:
        PeerService._dp_noise = _clean_with_honest_record
    torch.set_num_threads(1)
    identity, static = Identity.generate(), StaticKeyPair.generate()
    server = PeerServer(ShardRuntime(args.model_dir, args.start, args.end, dtype=torch.float32), static_key=static,
                        require_encryption=True)
    address = server.start()
    print(f"READY {address} {identity.peer_id} {encode_static_key(static.signed_by(identity))}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


def _wait_ready(proc: subprocess.Popen, start: int, end: int) -> HopSpec:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                _, address, peer_id, static_key = line.split()
                return HopSpec(address=address, start=start, end=end, peer_id=peer_id, static_key=static_key)
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise RuntimeError(f"peer [{start},{end}) did not start (exit code {proc.poll()})")


@contextmanager
def peers(model_dir: Path, spans: list[tuple[int, int, bool]]) -> Iterator[list[HopSpec]]:
    """One process per ``(start, end, cheat)``, started in parallel; SIGTERM (then SIGKILL) at the end."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    try:
        for start, end, cheat in spans:
            cmd = [sys.executable, "-m", "tests.adversarial.dp_cheat_peer", "--model-dir", str(model_dir),
                   "--start", str(start), "--end", str(end), *(["--cheat"] if cheat else [])]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                          cwd=Path(__file__).resolve().parents[2]))
        yield [_wait_ready(proc, a, b) for proc, (a, b, _) in zip(procs, spans, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


if __name__ == "__main__":
    main()
