"""An outsider's signed record that names an honest peer's address (a third red team, 2026-12-07).

A record is signed by its own peer id's key, so anyone can announce a correct record under a new identity with any
address. Routed through such a record, the coordinator used to seal the session to the honest peer's key (it looked
keys up by address), so the honest peer served; settlement, which checks that each hop answers as the identity it
was routed as, then failed, and no hop of the chain was paid. Keys are now looked up by (address, routed peer id):
sealed to the outsider's key, the step fails at the honest peer, the outsider's record is banned, the session fails
over to the honest record, and the settlement pays the hops that served.

In-process peers (tiny Llama, two spans, encryption required, HYDRA ledgers) and the coordinator's real
``SwarmPipeline`` + ``PeerChainClient`` + ``SwarmSettler``.
"""

from __future__ import annotations

import time

import pytest
import torch

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.records import sign_record
from openhydra.discovery.records import PeerAnnouncement
from openhydra.economy.factory import build_economy
from openhydra.economy.peer_settlement import PeerSettlement
from openhydra.economy.swarm_settlement import SwarmSettler
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.node_privacy import record_key
from openhydra.peer.privacy import ChainPrivacy
from openhydra.peer.server import PeerServer
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing.wait import wait_until

MODEL = "tiny-llama-8l"
SPANS = [(0, 4), (4, 8)]


@pytest.fixture
def honest(tiny_model_dirs, tmp_path):
    servers, records, identities, ledgers = [], [], [], []
    for i, (a, b) in enumerate(SPANS):
        identity, static = Identity.generate(), StaticKeyPair.generate()
        economy = build_economy(identity=identity, data_dir=str(tmp_path / f"hop{i}"), hydra=True)
        runtime = ShardRuntime(str(tiny_model_dirs["llama"]), a, b, dtype=torch.float32)
        server = PeerServer(runtime, "127.0.0.1", 0, model_id=MODEL, static_key=static, require_encryption=True,
                            settlement=PeerSettlement(identity, economy, MODEL, (a, b), model_layers=8))
        address = server.start()
        record = PeerAnnouncement(peer_id=identity.peer_id, model_id=MODEL, start=a, end=b, total_layers=8,
                                  grpc_address=address, dtype="float32", announced_at=time.time(), ttl_s=3600.0)
        servers.append(server)
        records.append(sign_record(record, identity, static.signed_by(identity)))
        identities.append(identity)
        ledgers.append(economy)
    yield records, identities
    for server in servers:
        server.stop()
    for economy in ledgers:
        economy.close()


def test_an_outsiders_record_at_an_honest_address_is_refused_and_the_honest_chain_is_paid(honest, tmp_path):
    records, identities = honest
    outsider, outsider_static = Identity.generate(), StaticKeyPair.generate()
    # a correct record of its own, with the honest peer's address and span and a throughput that makes the router
    # pick it first (its cost comes from the record's own numbers)
    impostor = sign_record(records[1].model_copy(update={"peer_id": outsider.peer_id, "signature": None,
                                                         "public_key": None, "static_key": None,
                                                         "throughput_tps": 1e6}),
                           outsider, outsider_static.signed_by(outsider))
    view = [records[0], impostor, records[1]]
    client = PeerChainClient([], tunables=ClientTunables(step_timeout_s=20.0), privacy=ChainPrivacy(encrypt=True))
    client.key_lookup = lambda address, peer_id="": record_key(view, address, peer_id)
    coordinator = build_economy(identity=Identity.generate(), data_dir=str(tmp_path / "coordinator"), hydra=True)
    settler = SwarmSettler(coordinator, client, MODEL)
    routes = []
    pipeline = SwarmPipeline(MODEL, 8, lambda: list(view), client,
                             on_session_end=lambda *args: routes.append(args[3]) or settler.submit(*args))
    try:
        tokens = [pipeline.step("s", [1, 504, 3456, 28, 17], 0, SamplingParams(), 0)]
        for i in range(1, 4):
            tokens.append(pipeline.step("s", [tokens[-1]], 4 + i, SamplingParams(), i))
        pipeline.close("s")
        wait_until(lambda: settler.completed >= 1, 30, what="the settlement")
    finally:
        settler.shutdown()
        client.shutdown()
    # the first step went to the outsider's record, failed at the honest peer (sealed to the outsider's key), and
    # the session failed over to the honest record
    assert pipeline.failovers >= 1 and pipeline.bans.is_banned(outsider.peer_id)
    assert [h.peer_id for h in routes[0]] == [i.peer_id for i in identities]
    assert (settler.counts["settled"], settler.counts["failed"]) == (1, 0), settler.counts
    earned = [coordinator.balance(i.peer_id).credits for i in identities]
    assert earned[0] == earned[1] > 0 and coordinator.balance(outsider.peer_id).credits == 0
    coordinator.close()
