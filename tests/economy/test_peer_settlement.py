"""A serving peer signs only what it served, applies a receipt it signed at most once; the requester pays."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from openhydra.crypto.identity import Identity
from openhydra.economy.errors import InvalidSignature, ReceiptAlreadyApplied
from openhydra.economy.factory import build_economy as _build_economy
from openhydra.economy.peer_settlement import Claim, PeerSettlement, SettlementRefused
from openhydra.economy.receipts import PipelineEntry, ServedShare, SettlementRequest, pipeline_entry
from openhydra.economy.settlement_wire import claim_from_pb, claim_to_pb, receipt_from_pb, receipt_to_pb
from openhydra.economy.swarm_settlement import FreeTier, SwarmSettler

MODEL = "tiny-llama-8l"
SPANS = [(0, 2), (2, 4), (4, 8)]
NOW = 1_800_000_000.0


def build_economy(**keys):
    """The node's economy with its clock stopped: balances decay 5% a day by default, which takes a unit off a
    1,500,000-micro balance about every second, so a loaded machine read 1,499,999 for an exact share."""
    return _build_economy(clock=lambda: NOW, **keys)


@pytest.fixture
def peers(tmp_path: Path):
    built = []
    for i, span in enumerate(SPANS):
        identity = Identity.generate()
        economy = build_economy(identity=identity, data_dir=str(tmp_path / f"n{i}"))
        built.append(PeerSettlement(identity, economy, MODEL, span))
    yield built
    for p in built:
        p.economy.close()


def _pipeline(peers: list[PeerSettlement]) -> tuple[PipelineEntry, ...]:
    return tuple(pipeline_entry(p.identity, p.span[1] - p.span[0]) for p in peers)


def _claim(peer: PeerSettlement, pipeline, tokens: int = 40, session: str = "s1", request: str = "r1") -> Claim:
    return Claim(session, request, MODEL, tokens, *peer.span, pipeline)


def _sign_all(peers, tokens: int = 40, session: str = "s1", request: str = "r1") -> SettlementRequest:
    pipeline = _pipeline(peers)
    sigs = [p.sign(_claim(p, pipeline, tokens, session, request)).signature.hex() for p in peers]
    shares = [ServedShare(**e.model_dump(), signature=s) for e, s in zip(pipeline, sigs, strict=True)]
    return SettlementRequest(request_id=request, model_id=MODEL, tokens_served=tokens, shares=shares)


def test_every_ledger_applies_the_same_receipt_once_paying_its_own_share(peers):
    for p in peers:
        p.served("s1", 0, 30)  # the prompt
        p.served("s1", 30, 11)  # decode steps, one position each
    receipt = _sign_all(peers, tokens=41)
    results = [p.apply(receipt) for p in peers]
    assert {r.receipt_id for r in results} == {receipt.receipt_id}
    for i, p in enumerate(peers):  # 41 tokens = 41,000 micro-credits, split 2:2:4 by layers: each ledger pays
        balances = [p.economy.balance(q.identity.peer_id).credits for q in peers]  # its own peer's share only
        assert balances == [[10250, 10250, 20500][j] if j == i else 0 for j in range(3)]
        with pytest.raises(ReceiptAlreadyApplied):
            p.apply(receipt)
        assert p.counts == {"signed": 1, "refused": 0, "applied": 1, "replayed": 1}


def test_a_peer_refuses_claims_that_do_not_match_what_it_served(peers):
    a = peers[0]
    a.served("s1", 0, 40)
    pipeline = _pipeline(peers)
    with pytest.raises(SettlementRefused, match="computed 40"):
        a.sign(_claim(a, pipeline, tokens=41))
    with pytest.raises(SettlementRefused, match="no session"):
        a.sign(_claim(a, pipeline, session="other"))
    with pytest.raises(SettlementRefused, match="serves layers"):
        a.sign(Claim("s1", "r1", MODEL, 40, 0, 3, pipeline))
    with pytest.raises(SettlementRefused, match="serves tiny"):
        a.sign(Claim("s1", "r1", "other-model", 40, 0, 2, pipeline))
    inflated = (pipeline[0].model_copy(update={"layers_served": 6}), *pipeline[1:])
    with pytest.raises(SettlementRefused, match="with 2 layers"):
        a.sign(_claim(a, inflated))
    without_me = pipeline[1:]
    with pytest.raises(SettlementRefused, match="once"):
        a.sign(_claim(a, without_me))
    assert a.counts["refused"] == 6 and a.counts["signed"] == 0
    # a valid claim is signed, the same claim again gives the same signature (retries are safe) ...
    first = a.sign(_claim(a, pipeline))
    assert a.sign(_claim(a, pipeline)).signature == first.signature
    # ... but a session is settled by one request only
    with pytest.raises(SettlementRefused, match="already settled"):
        a.sign(_claim(a, pipeline, request="r2"))
    with pytest.raises(SettlementRefused, match="already settled"):
        a.sign(_claim(a, pipeline, tokens=39))


def test_identity_query_signs_nothing(peers):
    a = peers[0]
    a.served("s1", 0, 12)
    answer = a.sign(_claim(a, ()))
    assert (answer.peer_id, answer.public_key, answer.positions_served, answer.signature) == (
        a.identity.peer_id, a.identity.public_key_bytes, 12, b"")


def test_a_peer_applies_only_receipts_it_signed_untampered(peers, tmp_path):
    for p in peers:
        p.served("s1", 0, 40)
    receipt = _sign_all(peers)
    tampered = SettlementRequest.model_validate({**receipt.model_dump(), "tokens_served": 39})
    with pytest.raises(SettlementRefused, match="did not sign"):  # another body: not the receipt it signed
        peers[1].apply(tampered)
    shares = [s.model_dump() for s in receipt.shares]
    shares[2]["signature"] = shares[0]["signature"]  # the body it signed, another peer's signature forged
    forged = SettlementRequest.model_validate({**receipt.model_dump(), "shares": shares})
    assert forged.receipt_id == receipt.receipt_id
    with pytest.raises(InvalidSignature):
        peers[1].apply(forged)
    # a valid receipt this peer never signed (another swarm's request) is refused too
    stranger = PeerSettlement(Identity.generate(), build_economy(data_dir=str(tmp_path / "x")), MODEL, (0, 2))
    with pytest.raises(SettlementRefused, match="did not sign"):
        stranger.apply(receipt)
    stranger.economy.close()
    assert all(p.economy.ledger.totals().settlements == 0 for p in peers)


def test_wire_round_trip_is_lossless_and_strict(peers):
    for p in peers:
        p.served("s1", 0, 40)
    receipt = _sign_all(peers)
    assert receipt_from_pb(receipt_to_pb(receipt)) == receipt
    claim = _claim(peers[0], _pipeline(peers))
    assert claim_from_pb(claim_to_pb(claim)) == claim
    bad = claim_to_pb(claim)
    bad.pipeline[0].public_key = b"\x01" * 5
    with pytest.raises(ValueError):
        claim_from_pb(bad)


def test_requester_spends_credits_else_free_tier_within_its_limit(peers):
    for p in peers:
        p.served("s1", 0, 40)
        p.served("s2", 0, 40)
        p.served("s3", 0, 2000)
    coordinator = peers[0]  # serves layers [0, 2) and asks for the request
    settler = SwarmSettler(coordinator.economy, client=None, model_id=MODEL, free_tier_tokens_per_day=50)
    receipt = _sign_all(peers)
    result = coordinator.economy.settle(receipt)
    # it earned 10,000 for its own 2 layers; the others earned 30,000 > its balance: free tier (40 <= 50)
    assert settler._charge(receipt, result) == "free_tier"
    second = _sign_all(peers, session="s2", request="r2")
    assert settler._charge(second, coordinator.economy.settle(second)) == "over_free_tier"  # 80 > 50
    me = coordinator.identity.peer_id
    assert coordinator.economy.balance(me).credits == 20_000  # nothing was spent
    big = _sign_all(peers, tokens=2000, session="s3", request="r3")
    result = coordinator.economy.settle(big)  # 2 credits: 0.5 to it, 0.5 and 1.0 to the others
    coordinator.economy.ledger.transfer_credits(peers[2].identity.peer_id, me, 1_000_000)
    before = coordinator.economy.balance(me).credits
    assert settler._charge(big, result) == "charged"
    assert coordinator.economy.balance(me).credits == before - 1_500_000  # exactly what the others earned
    assert coordinator.economy.ledger.audit().ok
    settler.shutdown()


def test_free_tier_window_rolls_over():
    now = [0.0]
    tier = FreeTier(100, clock=lambda: now[0])
    assert tier.take(60) and not tier.take(60) and tier.used() == 60
    now[0] = 86_400.0
    assert tier.used() == 0 and tier.take(100)


def test_a_failed_settlement_is_counted_never_raised(peers):
    """Hops that are gone (nothing listens): the settlement fails at its first stage, is logged and counted."""
    from openhydra.peer.client import PeerChainClient
    from openhydra.peer.messages import HopSpec
    from openhydra.testing.processes import free_port

    client = PeerChainClient([])
    try:
        settler = SwarmSettler(peers[0].economy, client, MODEL)
        dead = [HopSpec(address=f"127.0.0.1:{free_port()}", start=a, end=b) for a, b in SPANS]
        future = settler.submit("r-dead", "s-dead", 40, dead)
        assert future is not None and future.result(timeout=30) is None
        status = settler.network_status()
        assert (status["failed"], status["settled"], status["failures_by_stage"]) == (1, 0, {"identity": 1})
        assert settler.submit("r-empty", "s", 0, dead) is None  # nothing computed: nothing to settle
        settler.shutdown()
    finally:
        client.shutdown()
    assert peers[0].economy.ledger.totals().settlements == 0


def test_a_session_that_closes_after_the_node_stopped_is_dropped_not_a_traceback(caplog):
    """A swarm session can close after the node's shutdown (``action=check``: the request returns, then the node
    stops while its session closes): its settlement is dropped with one line, not raised into the pipeline."""
    from types import SimpleNamespace

    settler = SwarmSettler(economy=None, client=None, model_id="m")
    settler.shutdown()
    hop = SimpleNamespace(address="127.0.0.1:1", start=0, end=4)
    with caplog.at_level(logging.INFO, logger="openhydra.economy.swarm_settlement"):
        assert settler.submit("r1", "s1", 3, [hop]) is None
    assert settler.counts["dropped"] == 1 and settler._queued == 0
    assert "the node is stopping: request r1 is not settled" in caplog.text


def _onion_settle(peers, coordinator_economy, receipts, tokens: int = 3000, session: str = "s-onion"):
    """The coordinator's side of an onion close: each hop's receipt as it came back, checked and recorded."""
    from types import SimpleNamespace

    client = SimpleNamespace(privacy=SimpleNamespace(onion=True), onion_receipts={
        session: [(SimpleNamespace(peer_id=p.identity.peer_id), None if r is None else r.model_dump_json())
                  for p, r in zip(peers, receipts, strict=True)]})
    settler = SwarmSettler(coordinator_economy, client, MODEL)
    settler.settle("r-onion", session, tokens, [("addr", *p.span) for p in peers])
    settler.shutdown()
    return settler.counts


@pytest.mark.parametrize("lie", ["model_layers", "request_id"])
def test_an_onion_hop_earns_its_layers_share_and_no_more(peers, tmp_path, lie):
    """An attacker who read onion_control.py signs its own receipt with ``model_layers`` = its own layer count (it
    would earn the whole request) or with another hop's request id (that hop's receipt would then be a 'replay' and
    go unrecorded). The coordinator refuses that receipt; the honest hops are paid their exact shares."""
    from openhydra.peer.onion_control import own_request_id

    coordinator = build_economy(identity=Identity.generate(), data_dir=str(tmp_path / "coordinator"))
    for p in peers:
        p.served("s-onion", 0, 3000)
    liar = peers[1]
    receipts = []
    for i, p in enumerate(peers):
        model_layers, request = 8, own_request_id("s-onion", i)
        if p is liar and lie == "model_layers":
            model_layers = p.span[1] - p.span[0]
        if p is liar and lie == "request_id":
            request = own_request_id("s-onion", 2)
        receipts.append(p.sign_own("s-onion", request, model_layers, apply=False))
    counts = _onion_settle(peers, coordinator, receipts)
    assert (counts["peer_applied"], counts["peer_failed"]) == (2, 1)
    credits = {p.identity.peer_id: coordinator.balance(p.identity.peer_id).credits for p in peers}
    # 3,000 tokens = 3 credits = 3,000,000 micro, by layers 2:2:4 of 8: only the honest hops' shares are minted
    assert credits == {peers[0].identity.peer_id: 750_000, liar.identity.peer_id: 0,
                       peers[2].identity.peer_id: 1_500_000}
    assert coordinator.ledger.totals().settlements == 2 and coordinator.ledger.audit().ok
    coordinator.close()


def test_an_honest_onion_close_pays_every_hop_exactly_the_request(peers, tmp_path):
    from openhydra.peer.onion_control import own_request_id

    coordinator = build_economy(identity=Identity.generate(), data_dir=str(tmp_path / "coordinator"))
    for p in peers:
        p.served("s-onion", 0, 3000)
    receipts = [p.sign_own("s-onion", own_request_id("s-onion", i), 8, apply=False) for i, p in enumerate(peers)]
    counts = _onion_settle(peers, coordinator, receipts)
    assert (counts["peer_applied"], counts["peer_failed"]) == (3, 0)
    assert sum(coordinator.balance(p.identity.peer_id).credits for p in peers) == 3_000_000
    coordinator.close()


def test_a_padded_pipeline_is_not_signed(tmp_path):
    """A coordinator adds a sybil with 10,000 layers to the pipeline it asks an honest peer to sign: the peer's own
    ledger would pay the sybil nearly all of the request and the peer 0.3% of its share. A peer that knows its
    model's layer count signs only pipelines that add up to it."""
    identity = Identity.generate()
    economy = build_economy(identity=identity, data_dir=str(tmp_path / "peer"))
    peer = PeerSettlement(identity, economy, MODEL, (0, 2), model_layers=8)
    peer.served("s1", 0, 40)
    sybil = Identity.generate()
    me = pipeline_entry(identity, 2)
    others = (pipeline_entry(Identity.generate(), 2), pipeline_entry(Identity.generate(), 4))
    with pytest.raises(SettlementRefused, match="lists 10002 layers"):
        peer.sign(Claim("s1", "r1", MODEL, 40, 0, 2, (me, pipeline_entry(sybil, 10_000))))
    assert peer.sign(Claim("s1", "r1", MODEL, 40, 0, 2, (me, *others))).signature
    economy.close()


def test_a_strangers_receipt_mints_nothing_for_the_peers_it_names_besides_this_hop(tmp_path):
    """A red team's coordinator (a stranger) routed its own request through an honest peer alone, then had it sign a
    pipeline of [phantom: 6 layers, victim: 2 layers]: the phantom, a bare keypair on no route, was minted 3/4 of the
    request's credits and HYDRA in the victim's ledger, which the victim's coordinator then held as the phantom's
    stake. A hop's ledger now pays that hop's share only; the coordinator's own ledger is where the others' are."""
    identity = Identity.generate()
    economy = build_economy(identity=identity, data_dir=str(tmp_path / "victim"), hydra=True)
    victim = PeerSettlement(identity, economy, MODEL, (6, 8), model_layers=8)
    victim.served("s1", 0, 49)
    phantom = Identity.generate()
    pipeline = (pipeline_entry(phantom, 6), pipeline_entry(identity, 2))
    body_claim = Claim("s1", "r1", MODEL, 49, 6, 8, pipeline)
    from openhydra.economy.receipts import settlement_body

    signatures = [phantom.sign(settlement_body("r1", MODEL, 49, list(pipeline))).hex(),
                  victim.sign(body_claim).signature.hex()]
    receipt = SettlementRequest(request_id="r1", model_id=MODEL, tokens_served=49, shares=[
        ServedShare(**e.model_dump(), signature=s) for e, s in zip(pipeline, signatures, strict=True)])
    result = victim.apply(receipt)
    assert result.credits == {identity.peer_id: 12_250} and set(result.hydra) == {identity.peer_id}
    assert economy.balance(phantom.peer_id).credits == 0 and economy.balance(phantom.peer_id).hydra == 0
    assert economy.balance(identity.peer_id).credits == 12_250  # 49 tokens' 49,000 micro-credits x 2/8
    totals = economy.ledger.totals()
    assert totals.credits_minted == 12_250 and economy.ledger.audit().ok, totals
    economy.close()


def test_positions_seeded_from_the_prefix_cache_are_not_signed_for(peers):
    """The red team cached a 3,200-token prompt once, then opened session after session whose first step starts at
    position 3,200 (seeded from the cache) and computes one position, and had each signed for 3,201 tokens (98x
    what the hop computed). A hop counts the positions it computed, not the position a step reached."""
    a = peers[0]
    a.served("s-seeded", 3200, 1)
    assert a.sign(_claim(a, (), session="s-seeded")).positions_served == 1
    with pytest.raises(SettlementRefused, match="computed 1 for the session"):
        a.sign(_claim(a, _pipeline(peers), tokens=3201, session="s-seeded"))
    assert a.sign(_claim(a, _pipeline(peers), tokens=1, session="s-seeded")).signature


def test_a_session_that_adopts_another_takes_its_record_so_nothing_is_signed_for_twice(peers):
    """Failover adoption (peer/rebuild_service.py): the new session settles the whole history, the old one nothing.
    Before, the red team computed 3,500 positions once and adopted that cache into session after session, each
    signed for 3,501 tokens: 289x what the hop computed, minted in its ledger."""
    a = peers[0]
    a.served("s0", 0, 3500)
    a.adopt("s0", "s1")
    a.served("s1", 3500, 1)
    with pytest.raises(SettlementRefused, match="no session s0"):
        a.sign(_claim(a, (), session="s0"))
    assert a.sign(_claim(a, (), session="s1")).positions_served == 3501
    assert a.sign(_claim(a, _pipeline(peers), tokens=3501, session="s1", request="r1")).signature
    a.adopt("s1", "s2")  # a settled session's cache adopted again: the new session is settled too
    a.served("s2", 3501, 1)
    with pytest.raises(SettlementRefused, match="already settled by request r1"):
        a.sign(_claim(a, _pipeline(peers), tokens=3502, session="s2", request="r2"))
    a.adopt("gone", "s3")  # an adoption of a session it holds no record of: nothing moves
    a.served("s3", 10, 1)
    assert a.sign(_claim(a, (), session="s3")).positions_served == 1


def test_an_onion_hop_signs_for_what_it_computed_up_to_the_positions_the_session_reached(peers):
    """A speculative verify computes drafts that are rejected and truncated: they count as computed (real work),
    but the hop's own receipt claims no more than the session reached, which the coordinator checks."""
    a = peers[0]
    a.served("s-spec", 0, 10)
    a.served("s-spec", 10, 5)  # a verify of 5 positions; 3 of them rejected and truncated
    a.served("s-spec", 12, 5)  # the next verify
    receipt = a.sign_own("s-spec", "r-spec#0", 8, apply=False)
    assert receipt is not None and receipt.tokens_served == 17  # computed 20, reached 17
    b = peers[1]
    b.served("s-seed", 3200, 1)  # seeded from the prefix cache: one position computed
    assert b.sign_own("s-seed", "r-seed#1", 8, apply=False).tokens_served == 1


class _Direct:
    """A coordinator's client that calls the peers' settlement objects directly (address -> PeerSettlement);
    ``keyed``: the session agreed keys (encrypted), so its settlement calls carry tags (passed through here)."""

    privacy = None

    def __init__(self, peers: dict[str, PeerSettlement], keyed: bool = True) -> None:
        self.peers = peers
        self.keyed = keyed

    def take_settlement_keys(self, peer_session):
        from types import SimpleNamespace

        return SimpleNamespace(sign_claim=lambda address, message: message,
                               sign_receipt=lambda address, message, receipt_id: message) if self.keyed else None

    def peer_calls(self, calls):
        answers = []
        for address, method, message in calls:
            peer = self.peers[address]
            try:
                answers.append(peer.sign(claim_from_pb(message)) if method == "SignSettlement"
                               else peer.apply(receipt_from_pb(message)))
            except Exception as exc:
                answers.append(exc)
        return answers


def _settle(coordinator, peers, tokens: int, routed: list[str], session: str = "s1", request: str = "r1",
            keyed: bool = True):
    client = _Direct({f"h{i}": p for i, p in enumerate(peers)}, keyed)
    settler = SwarmSettler(coordinator.economy, client, MODEL)
    try:
        return settler.settle(request, session, tokens, [(f"h{i}", *p.span) for i, p in enumerate(peers)], routed)
    finally:
        settler.shutdown()


def test_a_hop_that_settles_as_another_identity_is_not_paid(peers, tmp_path):
    """A second red team routed through hop M and had M answer the settlement as Sybil S: the coordinator's ledger
    paid S (which never served, and then held S's stake) and nothing to M, whose slash found nothing. The
    coordinator now names each hop with the peer id it routed to and settles nothing for an identity swap."""
    from openhydra.economy.swarm_settlement import SettlementFailed

    for p in peers:
        p.served("s1", 0, 40)
    coordinator = PeerSettlement(Identity.generate(), build_economy(data_dir=str(tmp_path / "c")), MODEL, (0, 2))
    routed = [p.identity.peer_id for p in peers]
    swapped = [*routed[:2], Identity.generate().peer_id]  # the last hop was routed as another peer than answers
    with pytest.raises(SettlementFailed, match="routed as"):
        _settle(coordinator, peers, 40, swapped)
    assert coordinator.economy.ledger.totals().settlements == 0
    result = _settle(coordinator, peers, 40, routed)
    assert result.credits == {routed[0]: 10_000, routed[1]: 10_000, routed[2]: 20_000}
    coordinator.economy.close()


def test_without_keys_whoever_served_at_the_routed_address_is_paid(peers, tmp_path):
    """privacy=off: nothing binds an address to an identity (records are unsigned), so a third red team's outsider
    record naming an honest peer's address would, with the identity check, have left every hop of the chain
    unpaid. Unkeyed sessions pay the identity that served; keyed ones were sealed to the routed record's key."""
    for p in peers:
        p.served("s1", 0, 40)
    coordinator = PeerSettlement(Identity.generate(), build_economy(data_dir=str(tmp_path / "c")), MODEL, (0, 2))
    routed = [p.identity.peer_id for p in peers]
    outsider = [*routed[:2], Identity.generate().peer_id]
    result = _settle(coordinator, peers, 40, outsider, keyed=False)
    assert result.credits == {routed[0]: 10_000, routed[1]: 10_000, routed[2]: 20_000}
    coordinator.economy.close()


def test_a_hop_that_says_it_computed_less_fails_the_settlement_rather_than_shrinking_everyones_pay(peers, tmp_path):
    """The coordinator knows what every hop computed (the session's positions less the prompt blocks taken from
    the prefix caches); a hop answering less (a second red team's griefer said 1) is not taken at its word."""
    from openhydra.economy.swarm_settlement import SettlementFailed

    for p in peers[:2]:
        p.served("s1", 0, 40)
    peers[2].served("s1", 0, 1)
    coordinator = PeerSettlement(Identity.generate(), build_economy(data_dir=str(tmp_path / "c")), MODEL, (0, 2))
    with pytest.raises(SettlementFailed, match="computed 1 of 40"):
        _settle(coordinator, peers, 40, [p.identity.peer_id for p in peers])
    assert all(p.economy.ledger.totals().settlements == 0 for p in [coordinator, *peers])
    coordinator.economy.close()


def test_adopting_into_a_settled_session_leaves_it_settled(peers):
    """A second red team truncated a settled session to nothing, had it adopt another session's cache, and had it
    signed again with the adopted positions added. The peer refuses such an adoption (rebuild_service._adopt); its
    record keeps a settled session settled whatever it is merged with."""
    a = peers[0]
    a.served("done", 0, 40)
    assert a.sign(_claim(a, _pipeline(peers), tokens=40, session="done", request="r1")).signature
    a.served("fresh", 0, 1)
    a.adopt("fresh", "done")
    with pytest.raises(SettlementRefused, match="already settled by request r1"):
        a.sign(_claim(a, _pipeline(peers), tokens=41, session="done", request="r2"))
