"""A peer's announced stake held in a coordinator's ledger (economy/remote_stake.py): only the peer's own signed word,
at most the HYDRA it earned there, released only after unbonding, slashed there after a failed audit, and counted by
that coordinator's reputation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from openhydra.crypto.identity import Identity
from openhydra.crypto.records import sign_record
from openhydra.discovery.records import PeerAnnouncement
from openhydra.economy.factory import build_economy
from openhydra.economy.receipts import build_settlement
from openhydra.economy.remote_stake import StakeHolder
from openhydra.economy.units import MICRO


def _record(identity: Identity, stake: int | None, announced_at: float, peer_id: str | None = None,
            signed: bool = True) -> PeerAnnouncement:
    record = PeerAnnouncement(peer_id=peer_id or identity.peer_id, model_id="m", start=0, end=4, total_layers=8,
                              grpc_address="127.0.0.1:50051", announced_at=announced_at, ttl_s=60.0,
                              stake_micro=stake)
    return sign_record(record, identity, None) if signed else record


@pytest.fixture
def swarm(tmp_path: Path):
    now = [time.time()]
    coordinator = build_economy(identity=Identity.generate(), clock=lambda: now[0], hydra=True,
                                data_dir=str(tmp_path / "c"))
    peer, other = Identity.generate(), Identity.generate()
    # the peer served 4 of 8 layers of 10,000 tokens this coordinator recorded: 5 credits and 5 HYDRA here
    coordinator.settle(build_settlement("r1", "m", 10_000, [(peer, 4), (coordinator.identity, 4)]))
    holder = StakeHolder(coordinator, coordinator.peer_id, unbond_s=3600.0, clock=lambda: now[0])
    yield coordinator, holder, peer, other, now
    coordinator.close()


def test_an_announced_stake_is_held_from_the_hydra_the_peer_earned_here(swarm):
    coordinator, holder, peer, _, now = swarm
    assert coordinator.stake_of(peer.peer_id) == 0
    assert holder.sync([_record(peer, 2 * MICRO, now[0])]) == {peer.peer_id: 2 * MICRO}
    view = coordinator.balance(peer.peer_id)
    assert (view.stake, view.hydra) == (2 * MICRO, 3 * MICRO)
    assert holder.sync([_record(peer, 2 * MICRO, now[0] + 1)]) == {}  # unchanged: no write
    now[0] += 10
    assert holder.sync([_record(peer, 100 * MICRO, now[0])]) == {peer.peer_id: 5 * MICRO}  # all it has here
    assert coordinator.ledger.audit().ok


def test_only_the_peers_own_signed_word_moves_its_stake(swarm):
    """An attacker announces a stake for the peer: unsigned, signed by another key, or a record of its own naming
    the peer: nothing moves. A peer with no HYDRA here (it never served this coordinator) holds nothing."""
    coordinator, holder, peer, other, now = swarm
    forged = [_record(peer, MICRO, now[0], signed=False),
              _record(other, MICRO, now[0]).model_copy(update={"peer_id": peer.peer_id}),
              _record(other, MICRO, now[0])]
    assert holder.sync(forged) == {}
    assert coordinator.stake_of(peer.peer_id) == 0 and coordinator.stake_of(other.peer_id) == 0
    assert holder.sync([_record(peer, MICRO, now[0] - 3600)]) == {}  # expired: not the peer's word now
    assert coordinator.stake_of(peer.peer_id) == 0


def test_a_lower_stake_is_released_only_after_unbonding_and_a_slash_burns_what_is_held(swarm):
    """A peer that drops its stake just before it cheats still has it here when the failed audit slashes it."""
    coordinator, holder, peer, _, now = swarm
    holder.sync([_record(peer, 4 * MICRO, now[0])])
    now[0] += 5
    assert holder.sync([_record(peer, 0, now[0])]) == {}  # announced 0: still held
    assert coordinator.slash(peer.peer_id, 3 * MICRO, "failed audit") == 3 * MICRO
    assert coordinator.stake_of(peer.peer_id) == MICRO
    now[0] += 3599
    holder.sync([_record(peer, None, now[0])])  # a node announces no stake at all at 0: read as 0
    assert coordinator.stake_of(peer.peer_id) == MICRO  # 3,599 s after it was first lowered: still bonded
    now[0] += 2
    assert holder.sync([_record(peer, None, now[0])]) == {peer.peer_id: 0}
    view = coordinator.balance(peer.peer_id)
    assert (view.stake, view.hydra) == (0, 2 * MICRO)  # 5 earned - 3 burned
    assert coordinator.ledger.audit().ok


def test_a_coordinator_that_restarted_still_releases_what_it_held_for_a_peer_that_unstaked(swarm):
    coordinator, holder, peer, _, now = swarm
    holder.sync([_record(peer, 2 * MICRO, now[0])])
    restarted = StakeHolder(coordinator, coordinator.peer_id, unbond_s=3600.0, clock=lambda: now[0])
    restarted.sync([_record(peer, None, now[0])])
    now[0] += 3601
    assert restarted.sync([_record(peer, None, now[0])]) == {peer.peer_id: 0}
    assert restarted.sync([_record(peer, None, now[0] + 1)]) == {}  # nothing held: no more ledger reads or writes


def test_the_held_stake_counts_in_this_coordinators_reputation(swarm, tmp_path):
    from openhydra.verification.config import ReputationConfig
    from openhydra.verification.reputation import ReputationStore

    coordinator, holder, peer, _, now = swarm
    store = ReputationStore(tmp_path / "rep.db", ReputationConfig(), stake_of=coordinator.stake_of)
    before = store.score(peer.peer_id)
    holder.sync([_record(peer, 5 * MICRO, now[0])])
    assert store.score(peer.peer_id) > before


@pytest.mark.slow
def test_a_peer_that_stakes_on_its_node_is_staked_with_the_coordinator_it_served(tiny_model_dirs, tmp_path):
    """Two real nodes (economy=hydra, privacy=encrypted): C [0, 4) coordinates, P [4, 8) serves. P earns HYDRA in C's
    ledger, stakes on its own node's API, and within a few announcements C's ledger holds that stake for P (what C's
    reputation reads and a failed audit of P would slash); when P unstakes, C keeps holding it (unbonding)."""
    import httpx
    import openai

    from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
    from openhydra.testing.wait import wait_until

    model_dir = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        nodes = [NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, tmp_path / name), "economy=hydra",
                              "privacy=encrypted", "verification=off"])
                 for name, (a, b) in {"C": (0, 4), "P": (4, 8)}.items()]
        c, p = nodes
        try:
            start_all(nodes)
            p_id = httpx.get(p.url + "/v1/account/balance", timeout=10).json()["peer_id"]

            def held() -> dict:  # P's account in C's ledger, micro-units
                return httpx.get(c.url + "/v1/account/balance", params={"peer_id": p_id}, timeout=10).json()["micro"]

            client = openai.OpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=24, temperature=0)
            assert reply.usage.total_tokens > 0
            wait_until(lambda: held()["hydra"] > 0, timeout_s=60, what="P earns HYDRA in C's ledger")
            earned = held()["hydra"]

            def own() -> dict:  # P's own ledger: C applies the settlement there after its own (a later RPC)
                return httpx.get(p.url + "/v1/account/balance", timeout=10).json()["micro"]

            wait_until(lambda: own()["hydra"] > 0, timeout_s=60, what="P earns HYDRA in its own ledger")
            amount = min(earned, own()["hydra"]) // 2
            assert amount > 0
            staked = httpx.post(p.url + "/v1/hydra/stake", json={"amount": f"{amount / 1e6:.6f}"}, timeout=10)
            assert staked.status_code == 200, staked.text
            wait_until(lambda: held()["stake"] > 0, timeout_s=60, what="C holds P's announced stake")
            view = held()
            assert (view["stake"], view["hydra"] + view["stake"]) == (amount, earned)
            unstaked = httpx.post(p.url + "/v1/hydra/unstake", json={"amount": f"{amount / 1e6:.6f}"}, timeout=10)
            assert unstaked.status_code == 200, unstaked.text
            deadline = time.monotonic() + 8  # four announcements of 0: C releases it only after UNBOND_S
            while time.monotonic() < deadline:
                assert held()["stake"] == amount
                time.sleep(0.5)
        finally:
            for node in nodes:
                node.stop()
