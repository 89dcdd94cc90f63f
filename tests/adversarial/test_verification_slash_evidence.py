"""Slashing as evidence between nodes, and what a new identity is worth.

- A failed audit produces slash evidence signed by the auditing coordinator's Ed25519 identity, naming
  the request (digest), the step and the digests of the two answers. It travels through a real HTTP DHT
  process (the public Discovery interface, in a carrier record) to a second coordinator that never saw
  the request, which checks it and stops routing to the liar. Forged, tampered, self-serving and
  untrusted evidence is ignored. Before this change nothing left the auditing coordinator: every other
  coordinator kept routing to a proven liar (no module, no record: the test cannot even import).
- A fresh identity scores below a peer with a clean history, so rejoining under a new id never buys
  better routing (before: 0.85 for a fresh id, above any peer whose latency had any jitter).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from openhydra.crypto.identity import Identity
from openhydra.crypto.records import sign_record
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import LayerCoverageMap
from openhydra.testing.processes import DhtProcess
from openhydra.verification.config import FaultConfig, ReputationConfig, VerificationConfig
from openhydra.verification.evidence import (
    EvidenceBoard,
    EvidenceBook,
    carrier_record,
    sign_evidence,
)
from openhydra.verification.reputation import ReputationStore
from tests.verification.kit import MODEL_ID, PeerSpec, Swarm, prompt_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _template(identity: Identity) -> PeerAnnouncement:
    return PeerAnnouncement(peer_id=identity.peer_id, model_id=MODEL_ID, start=0, end=8, total_layers=8,
                            grpc_address="127.0.0.1:1", announced_at=time.time(), ttl_s=600.0)


def _board(url: str, store: ReputationStore, identity: Identity) -> EvidenceBoard:
    return EvidenceBoard(HttpDiscovery([url]), EvidenceBook(store, own_peer_id=identity.peer_id), identity=identity,
                         template=lambda: _template(identity), sign=lambda r: sign_record(r, identity, None))


def test_slash_evidence_spreads_through_the_dht_and_reroutes(tiny_model_dirs, tmp_path) -> None:
    specs = [PeerSpec("p0", 0, 3),
             PeerSpec("liar", 3, 5, fault=FaultConfig(mode="perturb", magnitude=1.0), throughput=1000.0, threads=1),
             PeerSpec("h3a", 3, 5), PeerSpec("h3b", 3, 5), PeerSpec("p5", 5, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.0, seed=4, reputation={"floor": 0.0})
    auditor, other, sybil = Identity.generate(), Identity.generate(), Identity.generate()
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "a.db", route_by_reputation=False)
    loop = asyncio.new_event_loop()  # one loop: the DHT clients' connections belong to it
    run = loop.run_until_complete
    try:
        with DhtProcess() as dht:
            board_a = _board(dht.url, swarm.reputation, auditor)
            swarm.verifier.evidence = board_a
            issued = []
            swarm.verifier.on_evidence = issued.append
            swarm.generate("user-request", prompt_of(7), 3)
            assert swarm.verifier.drain(120)
            assert [e.accused for e in issued] == ["liar"], swarm.verifier.outcomes
            evidence = issued[0]
            assert evidence.auditor == auditor.peer_id and evidence.accused_answer != evidence.majority_answer
            run(board_a.publish())

            # Coordinator B never saw the request; it has seen the auditor pass audits (a clean history).
            store_b = ReputationStore(None, ReputationConfig())
            store_b.record(auditor.peer_id, "pass")
            board_b = _board(dht.url, store_b, other)
            assert store_b.routing_score("liar") > 0
            assert run(board_b.pull(MODEL_ID)) == 1
            assert store_b.routing_score("liar") == 0.0 and store_b.counts("liar")["fail"] == 1
            chain = LayerCoverageMap(swarm.records, 8, model_id=MODEL_ID, score=store_b.routing_score).chain()
            assert chain is not None and "liar" not in chain.peer_ids
            assert run(board_b.pull(MODEL_ID)) == 0  # read again: applied once only

            # What an attacker can publish is ignored: a tampered accusation, a fresh sybil's, a self-accusation.
            book = board_b.book
            assert not book.receive(evidence.model_copy(update={"accused": "h3a"}))
            framing = evidence.model_dump(exclude={"auditor", "signature", "accused"})
            assert not book.receive(sign_evidence(sybil, accused="h3b", **framing))
            assert not book.receive(sign_evidence(auditor, accused=auditor.peer_id, **framing))
            run(HttpDiscovery([dht.url]).announce(sign_record(
                carrier_record([evidence.model_copy(update={"accused": "p5"})], _template(sybil), time.time(), 600),
                sybil, None)))
            assert run(board_b.pull(MODEL_ID)) == 0
            assert {p: store_b.counts(p)["fail"] for p in ("h3a", "h3b", "p5")} == {"h3a": 0, "h3b": 0, "p5": 0}
            assert book.rejected.get("bad signature", 0) >= 1 and book.rejected.get("untrusted auditor", 0) >= 1
    finally:
        loop.close()
        swarm.close()


def test_fresh_identity_does_not_outrank_a_clean_history() -> None:
    store = ReputationStore(None, ReputationConfig())
    for ms in (10.0, 14.0, 9.0, 30.0, 11.0):  # a clean but jittery history: served, passed, never failed
        store.record("veteran", "latency", value=ms)
        store.record("veteran", "ok")
    store.record("veteran", "pass")
    assert store.score("fresh-identity") < store.score("veteran")
    assert store.routing_score("fresh-identity") > 0  # still routable: newcomers can build a history
    records = [PeerAnnouncement(peer_id=p, model_id=MODEL_ID, start=0, end=8, total_layers=8,
                                grpc_address=f"127.0.0.1:{port}", throughput_tps=100.0, announced_at=time.time(),
                                ttl_s=600.0) for p, port in (("fresh-identity", 2), ("veteran", 3))]
    chain = LayerCoverageMap(records, 8, model_id=MODEL_ID, score=store.routing_score).chain()
    assert chain is not None and chain.peer_ids == ["veteran"]
