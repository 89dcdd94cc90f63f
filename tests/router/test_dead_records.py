"""A peer that refused a connection is skipped until it announces again, not retried each time its short
ban lapses while its stale record lives on in discovery (docs/scale.md, "Bans shorter than the record TTL")."""

from __future__ import annotations

import time

import grpc
import pytest

from openhydra.router.bans import BanList, BanTunables
from openhydra.router.swarm import FailoverTunables, PipelineUnavailable, SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from tests.router.scripted import ScriptedClient, announcement


def test_refused_peer_stays_out_until_it_announces_again():
    now = time.time()
    records = [announcement("a", 0, 2, now), announcement("b", 2, 4, now), announcement("c", 2, 4, now)]
    client = ScriptedClient()
    clock = [0.0]  # the bans' clock, advanced by hand: no sleeping, and no race with a slow machine
    bans = BanList(BanTunables(initial_s=0.01, max_s=0.01), clock=lambda: clock[0])  # only the record rule counts
    swarm = SwarmPipeline("m", 4, lambda: list(records), client, bans=bans)
    first = swarm.step("s1", [1, 2], 0, SamplingParams(), 0)
    assert first == 7
    used = client.routes[-1][1]  # the replica chosen for layers [2, 4)
    dead_peer = next(r.peer_id for r in records if r.grpc_address == used)
    other = "c" if dead_peer == "b" else "b"
    client.dead[used] = grpc.StatusCode.UNAVAILABLE
    assert swarm.step("s1", [7], 2, SamplingParams(), 1) == 7  # failed over to the other replica
    assert bans.is_banned(dead_peer)
    clock[0] += 1.0  # the ban has lapsed; the dead peer's record is still in discovery
    assert not bans.is_banned(dead_peer)
    for i in range(5):
        swarm.step(f"n{i}", [1], 0, SamplingParams(), 0)
        assert used not in client.routes[-1]
    assert [r.peer_id for r in swarm.peers(refresh=True)] == ["a", other]

    # It restarts and announces again: it is routable once more.
    del client.dead[used]
    records[[r.peer_id for r in records].index(dead_peer)] = announcement(dead_peer, 2, 4, time.time() + 1)
    assert sorted(r.peer_id for r in swarm.peers(refresh=True)) == ["a", "b", "c"]


def _fail_the_chosen_replica(records, code: grpc.StatusCode, message: str = "down"):
    """Route a session over ``records`` (replicas b and c of [2, 4)), fail the replica it took with ``code`` and
    ``message`` at the next step (the session fails over to the other one), and let the short ban lapse."""
    client = ScriptedClient()
    clock = [0.0]  # the bans' clock, advanced by hand
    bans = BanList(BanTunables(initial_s=0.01, max_s=0.01), clock=lambda: clock[0])
    swarm = SwarmPipeline("m", 4, lambda: list(records), client, bans=bans)
    swarm.step("s1", [1, 2], 0, SamplingParams(), 0)
    used = client.routes[-1][1]
    client.dead[used], client.messages[used] = code, message
    assert swarm.step("s1", [7], 2, SamplingParams(), 1) == 7  # failed over to the other replica
    clock[0] += 1.0  # the short ban has lapsed
    return swarm, used


def _records(instance: str | None = None) -> list:
    now = time.time()
    return [announcement("a", 0, 2, now), *(announcement(p, 2, 4, now).model_copy(update={"instance": instance})
                                            for p in ("b", "c"))]


def test_a_slow_peer_is_only_banned_briefly():
    swarm, _ = _fail_the_chosen_replica(_records(), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len(swarm.peers(refresh=True)) == 3  # a timeout is not proof of death: its record still counts


def test_a_connection_that_timed_out_is_not_proof_of_death():
    """A SIGSTOPped peer's port still accepts the TCP connection, and gRPC gives up with UNAVAILABLE ("timed out
    before receiving SETTINGS"): that process is stopped, not gone. It is banned briefly, never marked dead, so
    once it is resumed and the other replica dies it can serve at once (the chaos run's 503s, 2026-12-04)."""
    swarm, _ = _fail_the_chosen_replica(_records(), grpc.StatusCode.UNAVAILABLE,
                                        "failed to connect to all addresses; last error: UNKNOWN: "
                                        "ipv4:127.0.0.1:46465: connection attempt timed out before receiving "
                                        "SETTINGS frame")
    assert len(swarm.peers(refresh=True)) == 3  # still routable


def test_a_refused_peer_that_announces_again_from_the_same_process_is_alive():
    """A dead mark belongs to what the peer announced before the refusal: an announcement made after it (the
    same instance, a later heartbeat) proves the process is alive, whatever made it refuse once."""
    records = _records(instance="0123abcd")
    swarm, used = _fail_the_chosen_replica(records, grpc.StatusCode.UNAVAILABLE)
    assert len(swarm.peers(refresh=True)) == 2  # refused: dead until it announces again
    i = [r.grpc_address for r in records].index(used)
    records[i] = records[i].model_copy(update={"announced_at": time.time() + 1})  # same instance, a later heartbeat
    assert len(swarm.peers(refresh=True)) == 3


def test_a_dead_peer_left_out_is_named_in_the_503_after_its_ban_lapses():
    """The span's only peer refused a connection: once its short ban lapses it is still skipped (a dead process),
    and the 503 says so, with its address and error, not only that its layers are a hole (an operator would look
    for a hole where a peer is configured)."""
    now = time.time()
    records = [announcement("a", 0, 2, now), announcement("b", 2, 4, now)]
    client = ScriptedClient()
    bans = BanList(BanTunables(initial_s=0.01, max_s=0.01))  # lapses within the 0.5 s the route is sought for
    swarm = SwarmPipeline("m", 4, lambda: list(records), client, bans=bans,
                          tunables=FailoverTunables(route_wait_s=0.5))
    swarm.step("s1", [1, 2], 0, SamplingParams(), 0)
    dead = records[1].grpc_address
    client.dead[dead], client.messages[dead] = grpc.StatusCode.UNAVAILABLE, "Connection refused"
    with pytest.raises(PipelineUnavailable) as err:
        swarm.step("s1", [7], 2, SamplingParams(), 1)
    message = str(err.value)
    assert "holes: [[2, 4]]" in message and "left out after failing" in message, message
    assert dead in message and "Connection refused" in message, message


def test_a_new_instance_lifts_a_ban_but_keeps_its_streak():
    """A restarted process (a new record instance) is routable at once. The instance is chosen by the peer itself:
    a banned peer that re-announces under a new one each time it fails must still see its bans grow (a red team:
    before, the new instance wiped the streak and every ban stayed at the initial length)."""
    now = time.time()
    records = [announcement("a", 0, 2, now), announcement("b", 2, 4, now).model_copy(update={"instance": "0" * 8})]
    client = ScriptedClient()
    clock = [0.0]
    bans = BanList(BanTunables(initial_s=1.0, multiplier=2.0, max_s=60.0), clock=lambda: clock[0])
    swarm = SwarmPipeline("m", 4, lambda: list(records), client, bans=bans,
                          tunables=FailoverTunables(max_failovers_per_step=1, route_wait_s=0.0))
    client.dead[records[1].grpc_address], client.messages[records[1].grpc_address] = (
        grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
    lengths = []
    for i in range(3):
        with pytest.raises(PipelineUnavailable):
            swarm.step(f"s{i}", [1, 2], 0, SamplingParams(), 0)
        lengths.append(bans.remaining_s("b"))
        records[1] = records[1].model_copy(update={"instance": f"{i + 1:08x}", "announced_at": time.time()})
        swarm.peers(refresh=True)
        assert not bans.is_banned("b")  # the "restarted" peer is routable at once
    assert lengths == [1.0, 2.0, 4.0], lengths
