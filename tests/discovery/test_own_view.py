"""OwnView (discovery/own_view.py): a coordinator's lookups always carry its own current record; a failed lookup, a
backed-off DHT and the recovery after an outage (an empty or partial answer) route over the known records, each for
no longer than ``max_keep_s``. The swarm-level test is tests/swarm/test_dht_outage.py."""

from __future__ import annotations

import threading

import pytest

from openhydra.discovery.base import DiscoveryError
from openhydra.discovery.own_view import BACKOFF_S, OwnView
from openhydra.discovery.records import PeerAnnouncement

NOW = 1_000_000.0
KEEP_S = 180.0


def record(peer: str, start: int, end: int, announced_at: float = NOW, ttl_s: float = 60.0,
           address: str = "127.0.0.1:50051") -> PeerAnnouncement:
    return PeerAnnouncement(peer_id=peer, model_id="org/model", start=start, end=end, total_layers=8,
                            grpc_address=address, announced_at=announced_at, ttl_s=ttl_s)


class Dht:
    def __init__(self, records: list[PeerAnnouncement]) -> None:
        self.records = records
        self.down = False
        self.asked = 0

    def __call__(self) -> list[PeerAnnouncement]:
        self.asked += 1
        if self.down:
            raise DiscoveryError("no DHT server answered")
        return list(self.records)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def spans(records: list[PeerAnnouncement]) -> list[tuple[str, int, int]]:
    return sorted((r.peer_id, r.start, r.end) for r in records)


def view_of(dht: Dht, clock: Clock, own=lambda: record("me", 0, 4)) -> OwnView:
    """Retries of a failing DHT run at once, inside the call (the default runs them on a thread: tested below)."""
    return OwnView(dht, own, "me", max_keep_s=KEEP_S, clock=clock, monotonic=clock, background=lambda task: task())


def test_a_lookup_lacking_the_nodes_own_record_gets_it() -> None:
    view = view_of(Dht([record("tail", 4, 8)]), Clock())
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]
    assert view.status() == {"dht": "reachable", "last_error": None, "carried_records": 0, "lookups": 1,
                             "lookups_lacking_own_record": 1, "lookups_without_dht": 0}


def test_the_dhts_record_of_this_peer_id_gives_way_to_the_current_one() -> None:
    """After a restart on another port, the DHT may still hold the previous process's record for a while."""
    stale = record("me", 0, 4, announced_at=NOW - 30, address="127.0.0.1:40000")
    view = view_of(Dht([stale, record("tail", 4, 8)]), Clock(), own=lambda: record("me", 0, 4, address="10.0.0.1:1"))
    mine = [r for r in view() if r.peer_id == "me"]
    assert [r.grpc_address for r in mine] == ["10.0.0.1:1"]
    assert view.status()["lookups_lacking_own_record"] == 0


def test_a_failing_dht_is_bridged_with_known_records_and_backed_off() -> None:
    clock = Clock()
    dht = Dht([record("tail", 4, 8, ttl_s=60.0), record("brief", 4, 8, ttl_s=5.0)])
    view = view_of(dht, clock)
    assert len(view()) == 3
    dht.down = True
    clock.t = NOW + 10  # "brief" has expired, "tail" has not
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]
    status = view.status()
    assert status["dht"] == "unreachable" and "no DHT server answered" in status["last_error"]
    asked = dht.asked
    clock.t += BACKOFF_S[0] / 2  # backed off: answered at once, without asking the DHT
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)] and dht.asked == asked
    clock.t += BACKOFF_S[0]  # asked again, failed again: the wait doubles
    view()
    assert dht.asked == asked + 1
    clock.t += BACKOFF_S[0] * 1.5
    view()
    assert dht.asked == asked + 1  # within 2 s of the second failure
    clock.t = NOW + 61  # "tail" expired too: this node's own span only
    assert spans(view()) == [("me", 0, 4)]
    assert view.status()["lookups_without_dht"] >= 4


def test_a_record_is_kept_no_longer_than_max_keep_s_whatever_its_ttl() -> None:
    clock = Clock()
    dht = Dht([record("tail", 4, 8, ttl_s=86_400.0)])  # a day: as long as a record may say
    view = view_of(dht, clock)
    view()
    dht.down = True
    clock.t = NOW + KEEP_S - 1
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]
    clock.t = NOW + KEEP_S + 1
    assert spans(view()) == [("me", 0, 4)]


@pytest.mark.parametrize("after_failure", [True, False], ids=["after an outage", "an empty answer"])
def test_known_peers_are_carried_until_the_dht_answers_with_them(after_failure) -> None:
    """A DHT restarted empty answers before the peers re-announce; a Kademlia node cut off from its neighbours answers
    with nothing. Either way the peers it knew stay routable until they are in an answer again."""
    clock = Clock()
    dht = Dht([record("tail", 4, 8), record("mid", 4, 6), record("end", 6, 8)])
    view = view_of(dht, clock)
    view()
    if after_failure:
        dht.down = True
        view()
        clock.t += BACKOFF_S[0] + 1
        dht.down = False
    dht.records = []  # back (or cut off), and empty
    assert spans(view()) == [("end", 6, 8), ("me", 0, 4), ("mid", 4, 6), ("tail", 4, 8)]
    assert view.status()["dht"] == "recovering" and view.status()["carried_records"] == 3
    dht.records = [record("tail", 4, 8, announced_at=clock.t)]  # one re-announced
    assert spans(view()) == [("end", 6, 8), ("me", 0, 4), ("mid", 4, 6), ("tail", 4, 8)]
    assert view.status()["carried_records"] == 2
    dht.records += [record("mid", 4, 6, announced_at=clock.t), record("end", 6, 8, announced_at=clock.t)]
    assert spans(view()) == [("end", 6, 8), ("me", 0, 4), ("mid", 4, 6), ("tail", 4, 8)]
    assert view.status()["dht"] == "reachable" and view.status()["carried_records"] == 0
    dht.records = dht.records[:2]  # recovered: a peer that leaves now leaves the view at once (a withdrawal)
    assert spans(view()) == [("me", 0, 4), ("mid", 4, 6), ("tail", 4, 8)]


def test_a_peer_the_answer_says_withdrew_is_not_carried() -> None:
    """The only other peer of a 2-node swarm stops with Ctrl-C and withdraws: the answer holds none of the peers
    the view knew, as after a DHT restart, but it says the peer withdrew, so the view drops it at once (an operator's
    probe: /readyz said 200 and requests waited for it ~165 s). A peer that withdrew before its latest record (it
    announced again since) is kept."""
    clock = Clock()
    dht = Dht([record("tail", 4, 8)])
    gone: dict[str, float] = {}
    view = OwnView(dht, lambda: record("me", 0, 4), "me", max_keep_s=KEEP_S, clock=clock, monotonic=clock,
                   background=lambda task: task(), withdrawn=lambda: dict(gone))
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]
    dht.records = []
    gone["tail"] = NOW - 1  # a withdrawal older than the record the view holds: not this record's
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)] and view.status()["dht"] == "recovering"
    gone["tail"] = NOW + 5
    assert spans(view()) == [("me", 0, 4)]
    assert view.status()["dht"] == "reachable" and view.status()["carried_records"] == 0


def test_with_nothing_to_offer_a_failure_raises_and_the_dht_is_asked_every_time() -> None:
    clock = Clock()
    dht = Dht([record("tail", 4, 8)])
    view = view_of(dht, clock, own=lambda: None)  # not announcing (unreachable, or shutting down)
    dht.down = True
    for asked in (1, 2):  # no back-off: there is nothing to answer with meanwhile
        with pytest.raises(DiscoveryError):
            view()
        assert dht.asked == asked
    dht.down = False
    assert spans(view()) == [("tail", 4, 8)]  # nothing added where the node announces nothing


def test_concurrent_lookups_count_every_call() -> None:
    clock = Clock()
    dht = Dht([record("tail", 4, 8)])
    view = view_of(dht, clock)

    def many() -> None:
        for _ in range(200):
            assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert view.status()["lookups"] == 800 and view.status()["lookups_lacking_own_record"] == 800


def test_a_hung_dht_is_asked_again_off_the_requests_time() -> None:
    """A DHT that accepts connections and never answers: once its back-off is over, a request routes over the known
    records at once while one retry waits for the DHT on a thread of its own (a fault probe: before, every request
    that met an expired back-off waited the lookup's whole 5 s timeout); a second request meanwhile starts no second
    retry; when the DHT answers again, the view is fresh and reachable."""
    clock = Clock()
    dht = Dht([record("tail", 4, 8)])
    answer, asked = threading.Event(), threading.Event()
    hung = {"on": False}

    def fetch() -> list[PeerAnnouncement]:
        if hung["on"]:
            asked.set()
            if not answer.wait(timeout=30):
                raise DiscoveryError("read timeout")
            return [record("tail", 4, 8), record("new", 4, 8)]
        return dht()

    retries: list[threading.Thread] = []

    def background(task) -> None:
        retries.append(threading.Thread(target=task, daemon=True))
        retries[-1].start()

    view = OwnView(fetch, lambda: record("me", 0, 4), "me", max_keep_s=KEEP_S, clock=clock, monotonic=clock,
                   background=background)
    view()
    dht.down = True
    view()  # the first lookup that meets the outage fails (here at once; a hung one waits its timeout)
    hung["on"], dht.down = True, False
    clock.t += BACKOFF_S[0] + 0.1
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)]  # answered while the retry still waits for the DHT
    assert asked.wait(timeout=10) and len(retries) == 1 and retries[0].is_alive()
    assert spans(view()) == [("me", 0, 4), ("tail", 4, 8)] and len(retries) == 1  # one retry at a time
    answer.set()
    retries[0].join(timeout=10)
    assert view.status()["dht"] in ("reachable", "recovering") and view.status()["last_error"] is None
    assert ("new", 4, 8) in spans(view())
