"""A standalone libp2p circuit relay: hivemind's bundled p2pd with relay v2 service on, nothing else.

``python -m openhydra.peer.libp2p_relay --listen /ip4/0.0.0.0/tcp/4001 --identity relay.key`` prints
``RELAY <multiaddr>/p2p/<id>`` (what NATed peers put in ``peer.libp2p.relays``) and then *becomes* p2pd (exec):
no Python stays resident, a relay costs only the Go daemon. Limits default to p2pd's relay v2 defaults (16
circuits per peer, 128 reservations, 30 min and 4 GiB per circuit; the flags below change them). Nodes with
``peer.transport=libp2p|auto`` and ``discovery.relay=true`` relay as well; this is for a box that serves no layers.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.resources import files
from pathlib import Path

from openhydra.peer.libp2p_transport import Libp2pSettings, relay_limit_flags


def p2pd_path() -> str:
    return str(files("hivemind.hivemind_cli") / "p2pd")


def ensure_identity(path: Path) -> str:
    """The relay's libp2p peer id, generating its key file (mode 0400) on first use."""
    from hivemind.p2p import P2P, PeerID

    if not path.exists():
        P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes()).to_base58()


def relay_command(identity: Path, listen: str, announce: str | None = None, control: str | None = None,
                  limits: Libp2pSettings | None = None) -> list[str]:
    """The p2pd command line of a relay listening on ``listen`` (one multiaddr), with ``limits``' relay limits."""
    control = control or f"/unix/tmp/openhydra-relay-{os.getpid()}-{identity.stem}.sock"
    flags = relay_limit_flags(limits or Libp2pSettings())
    args = [p2pd_path(), f"-listen={control}", f"-hostAddrs={listen}", f"-id={identity}", "-relay=1",
            "-relayService=1", "-autonat=1", "-forceReachabilityPublic=1", "-natPortMap=0", "-q",
            *(f"-{k}={v}" for k, v in flags.items())]
    if announce:
        args.append(f"-announceAddrs={announce}")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--announce", default=None, help="the public multiaddr, if it differs from --listen")
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--max-circuits", type=int, default=16, help="relayed connections per peer at once")
    parser.add_argument("--max-reservations", type=int, default=128, help="NATed peers holding a slot at once")
    parser.add_argument("--data-limit-mb", type=int, default=4096, help="per relayed connection, each way")
    parser.add_argument("--time-limit-s", type=int, default=1800, help="lifetime of one relayed connection")
    args = parser.parse_args(argv)
    limits = Libp2pSettings(relay_max_circuits=args.max_circuits, relay_max_reservations=args.max_reservations,
                            relay_data_limit_mb=args.data_limit_mb, relay_time_limit_s=args.time_limit_s)
    peer_id = ensure_identity(args.identity)
    print(f"RELAY {args.announce or args.listen}/p2p/{peer_id}", flush=True)
    command = relay_command(args.identity, args.listen, args.announce, limits=limits)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
