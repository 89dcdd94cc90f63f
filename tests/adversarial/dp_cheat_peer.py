"""A keyed peer as a real OS process for the privacy tests, honest or cheating on DP noise.

``python -m tests.adversarial.dp_cheat_peer --model-dir DIR --start A --end B [--cheat]`` prints
``READY <address> <peer id> <signed static key>`` once it serves, then serves until SIGTERM. With ``--cheat`` it
sends its clean hidden states on, with the honest audit record of the noised tensor it should have sent (so the
record alone is perfect: right seed, sigma, clip and tag).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from openhydra.peer.forward import PeerService
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb
from tests.adversarial.keyed_peer import keyed_peers
from tests.adversarial.keyed_peer import main as serve_keyed_peer

_honest = PeerService._dp_noise


def _clean_with_honest_record(self, state, hidden: torch.Tensor, step: pb.Step) -> tuple[torch.Tensor, bytes]:
    _noised, record = _honest(self, state, hidden, step)  # the record covers the noised tensor...
    return hidden, record  # ...but the clean one goes on the wire


def _cheat_if_asked(args: argparse.Namespace) -> None:
    if args.cheat:
        PeerService._dp_noise = _clean_with_honest_record


def main() -> None:
    serve_keyed_peer(patch=_cheat_if_asked, extra=lambda parser: parser.add_argument("--cheat", action="store_true"))


@contextmanager
def peers(model_dir: Path, spans: list[tuple[int, int, bool]]) -> Iterator[list[HopSpec]]:
    """One process per ``(start, end, cheat)``, started in parallel; SIGTERM (then SIGKILL) at the end."""
    with keyed_peers(model_dir, [(a, b) for a, b, _ in spans], module="tests.adversarial.dp_cheat_peer",
                     flags=[["--cheat"] if cheat else [] for *_, cheat in spans]) as (route, _procs):
        yield route


if __name__ == "__main__":
    main()
