"""The HTTP DHT table: TTL from the server clock, bounds that keep existing peers refreshable."""

from __future__ import annotations

import pytest

from openhydra.discovery.records import PeerAnnouncement
from openhydra.discovery.store import AnnouncementStore, StaleRecord, StoreFull, StoreLimits


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def rec(peer: str, model: str = "m", ttl: float = 10.0, at: float = 1.0) -> PeerAnnouncement:
    return PeerAnnouncement(
        peer_id=peer,
        model_id=model,
        start=0,
        end=2,
        total_layers=2,
        grpc_address="127.0.0.1:1",
        announced_at=at,
        ttl_s=ttl,
    )


def test_ttl_expiry_uses_server_clock_and_refresh_extends():
    clock = Clock()
    store = AnnouncementStore(clock=clock)
    assert store.put(rec("a", ttl=10)) == 10  # announced_at=1.0 (long ago) does not matter
    clock.t += 9
    store.put(rec("b", ttl=10))
    assert {r.peer_id for r in store.get("m")} == {"a", "b"}
    clock.t += 2
    assert [r.peer_id for r in store.get("m")] == ["b"] and len(store) == 1
    store.put(rec("b", ttl=10, at=2.0))  # a newer record refreshes
    clock.t += 9
    assert [r.peer_id for r in store.get("m")] == ["b"]


def test_ttl_capped():
    store = AnnouncementStore(StoreLimits(max_ttl_s=5))
    assert store.put(rec("a", ttl=3600)) == 5


def test_full_table_refuses_newcomers_but_refreshes_and_sweeps():
    clock = Clock()
    store = AnnouncementStore(StoreLimits(max_records=2, max_per_model=2), clock=clock)
    store.put(rec("a", ttl=5))
    store.put(rec("b", ttl=50))
    with pytest.raises(StoreFull):
        store.put(rec("c"))
    store.put(rec("a", ttl=5, at=2.0))  # refresh of a known peer is fine
    clock.t += 6  # a expires: room for c
    store.put(rec("c"))
    assert {r.peer_id for r in store.get("m")} == {"b", "c"}
    assert store.models() == {"m": 2}


def test_per_model_and_model_count_limits_and_remove():
    store = AnnouncementStore(StoreLimits(max_records=10, max_per_model=1, max_models=2))
    store.put(rec("a", model="m1"))
    with pytest.raises(StoreFull, match="m1"):
        store.put(rec("b", model="m1"))
    store.put(rec("b", model="m2"))
    with pytest.raises(StoreFull, match="models"):
        store.put(rec("c", model="m3"))
    assert store.remove("m1", "a") and not store.remove("m1", "a")
    store.put(rec("c", model="m3"))
    assert store.models() == {"m2": 1, "m3": 1}


def test_older_or_replayed_records_never_replace_newer_ones_even_after_expiry_or_withdraw():
    clock, wall = Clock(), Clock()
    wall.t = 1000.0
    store = AnnouncementStore(clock=clock, wall=wall)
    store.put(rec("a", ttl=10, at=1000.0))
    assert store.put(rec("a", ttl=10, at=1000.0)) == 10  # the same record twice: accepted, no longer life
    store.put(rec("a", ttl=10, at=1001.0))
    with pytest.raises(StaleRecord):
        store.put(rec("a", ttl=10, at=1000.0))  # rollback to the older record
    clock.t += 11  # the record expires from the table; its floor stays while 1000.0 could still verify
    assert store.get("m") == []
    with pytest.raises(StaleRecord):
        store.put(rec("a", ttl=10, at=1000.5))
    store.put(rec("a", ttl=10, at=1002.0))
    with pytest.raises(StaleRecord):
        store.withdraw("m", "a", withdrawn_at=1001.5)  # a withdrawal older than the record: a replay
    assert store.withdraw("m", "a", withdrawn_at=1003.0)
    with pytest.raises(StaleRecord):
        store.put(rec("a", ttl=10, at=1002.0))  # the withdrawn record cannot be posted again
    store.put(rec("a", ttl=10, at=1004.0))  # a newer announcement brings the peer back
    wall.t += 80  # past every lifetime (1004 + 10 + 60 s): the floor is forgotten, the table stays bounded
    store.put(rec("a", ttl=10, at=1.0))


def test_one_source_cannot_fill_a_model_with_throwaway_identities():
    """A red team filled a model's 20,000 records from one address in 90 s: honest newcomers were refused and every
    lookup became a 9.5 MB answer. One source keeps at most ``max_peers_per_source`` peers; others are unaffected,
    its own peers can always refresh, and room comes back as its records expire or are withdrawn."""
    from openhydra.discovery.store import SourceQuota, source_of

    clock = Clock()
    store = AnnouncementStore(StoreLimits(max_peers_per_source=3), clock=clock)
    for peer in ("a", "b", "c"):
        store.put(rec(peer, ttl=10), source="203.0.113.7")
    with pytest.raises(SourceQuota, match=r"203\.0\.113\.7 already announces 3 peers"):
        store.put(rec("d", ttl=10), source="203.0.113.7")
    with pytest.raises(SourceQuota):  # another model does not open a second quota
        store.put(rec("d", model="other", ttl=10), source="203.0.113.7")
    store.put(rec("a", ttl=10, at=2.0), source="203.0.113.7")  # a refresh of its own peer
    store.put(rec("e", ttl=10), source="198.51.100.1")  # another machine joins
    assert {r.peer_id for r in store.get("m")} == {"a", "b", "c", "e"}
    assert store.remove("m", "b")
    store.put(rec("d", ttl=10), source="203.0.113.7")  # the withdrawn peer's place
    clock.t += 11  # all expire: the source's quota is free again
    for peer in ("f", "g", "h"):
        store.put(rec(peer, ttl=10), source="203.0.113.7")
    # An IPv6 host counts per /64 (it commonly holds all of it), a mapped IPv4 address as the IPv4 address.
    assert source_of("2001:db8:1:2::5") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::5") != source_of("2001:db8:1:2::5")
    assert source_of("::ffff:203.0.113.7") == "203.0.113.7" and source_of("not-an-ip") == "not-an-ip"


def test_a_withdrawal_is_told_to_readers_until_its_floor_lapses():
    """``withdrawn`` (in every lookup answer) names the peers that withdrew and have not announced since, so a reader
    that kept their records drops them; a new record clears it, and it lasts only as long as the floor."""
    clock = Clock()
    wall = [1000.0]
    store = AnnouncementStore(clock=clock, wall=lambda: wall[0])
    store.put(rec("a", ttl=10, at=1000.0))
    store.put(rec("b", ttl=10, at=1000.0))
    assert store.withdraw("m", "a", 1001.0) and store.withdrawn("m") == {"a": 1001.0}
    assert store.withdrawn("other") == {} and [r.peer_id for r in store.get("m")] == ["b"]
    store.put(rec("a", ttl=10, at=1002.0))  # back: no longer withdrawn
    assert store.withdrawn("m") == {}
    assert store.withdraw("m", "a", 1003.0) and store.withdrawn("m") == {"a": 1003.0}
    wall[0] = 1002.0 + 10 + 60 + 1  # past what its last record could still pass (announced + ttl + slack)
    assert store.withdrawn("m") == {}
