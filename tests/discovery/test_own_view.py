"""OwnView: a coordinator's lookups include its own span whatever the DHT says; a DHT outage routes over the last
good lookup's unexpired records (discovery/own_view.py). The swarm-level test is tests/swarm/test_dht_outage.py."""

from __future__ import annotations

import pytest

from openhydra.discovery.base import DiscoveryError
from openhydra.discovery.own_view import OwnView
from openhydra.discovery.records import PeerAnnouncement

NOW = 1_000_000.0


def record(peer: str, start: int, end: int, announced_at: float = NOW, ttl_s: float = 60.0) -> PeerAnnouncement:
    return PeerAnnouncement(peer_id=peer, model_id="org/model", start=start, end=end, total_layers=8,
                            grpc_address="127.0.0.1:50051", announced_at=announced_at, ttl_s=ttl_s)


class Dht:
    def __init__(self, records: list[PeerAnnouncement]) -> None:
        self.records = records
        self.down = False

    def __call__(self) -> list[PeerAnnouncement]:
        if self.down:
            raise DiscoveryError("no DHT server answered")
        return list(self.records)


def spans(records: list[PeerAnnouncement]) -> list[tuple[str, int, int]]:
    return sorted((r.peer_id, r.start, r.end) for r in records)


def test_a_lookup_lacking_the_nodes_own_record_gets_it() -> None:
    mine = record("me", 0, 4, announced_at=NOW + 5)
    dht = Dht([record("tail", 4, 8)])
    view = OwnView(dht, lambda: mine, "me", clock=lambda: NOW)
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]
    assert view.status() == {"dht": "reachable", "last_error": None, "lookups": 1, "lookups_lacking_own_record": 1,
                             "lookups_without_dht": 0}


def test_the_dhts_own_record_is_kept_as_is_when_present() -> None:
    announced = record("me", 0, 4, announced_at=NOW - 10)
    dht = Dht([announced, record("tail", 4, 8)])
    built: list[PeerAnnouncement] = []  # own() builds and signs a record: only where a lookup needs it
    view = OwnView(dht, lambda: built.append(record("me", 0, 4, announced_at=NOW)) or built[-1], "me",
                   clock=lambda: NOW)
    got = view()
    assert [r for r in got if r.peer_id == "me"] == [announced]
    assert built == []
    assert view.status()["lookups_lacking_own_record"] == 0


def test_a_failed_lookup_routes_over_the_last_good_ones_unexpired_records_and_own() -> None:
    clock = [NOW]
    dht = Dht([record("me", 0, 4), record("tail", 4, 8, ttl_s=60.0), record("brief", 4, 8, ttl_s=5.0)])
    view = OwnView(dht, lambda: record("me", 0, 4, announced_at=clock[0]), "me", clock=lambda: clock[0])
    assert len(view()) == 3
    dht.down = True
    clock[0] = NOW + 10  # "brief" has expired, "tail" has not
    got = view()
    assert spans(got) == [("me", 0, 4), ("tail", 4, 8)]
    assert [r.announced_at for r in got if r.peer_id == "me"] == [NOW + 10]  # the node's fresh record, not the DHT's
    clock[0] = NOW + 61  # "tail" expired too: the node's own span only
    assert spans(view()) == [("me", 0, 4)]
    assert view.status()["lookups_without_dht"] == 2
    assert view.status()["dht"] == "unreachable" and "no DHT server answered" in view.status()["last_error"]
    dht.down = False
    dht.records = [record("other", 4, 8, announced_at=NOW + 61)]  # back: the DHT's view again, plus own
    assert spans(view()) == [("me", 0, 4), ("other", 4, 8)]
    assert view.status()["dht"] == "reachable" and view.status()["last_error"] is None


def test_a_failed_lookup_with_nothing_to_offer_raises() -> None:
    dht = Dht([record("tail", 4, 8)])
    view = OwnView(dht, lambda: None, "me", clock=lambda: NOW)  # not announcing (unreachable, or shutting down)
    dht.down = True
    with pytest.raises(DiscoveryError):
        view()  # no good lookup yet, no own record
    dht.down = False
    assert spans(view()) == [("tail", 4, 8)]  # nothing added where the node announces nothing
    dht.down = True
    assert spans(view()) == [("tail", 4, 8)]  # an unexpired record of the last lookup
