"""Sessions belong to their coordinator (issue 16 §1, docs/security.md "Sessions"): one test per attack, against
real peer processes (tests/adversarial/keyed_peer.py) on loopback; the coordinator runs in this process.

The attacker is a stranger who can reach every peer's and the coordinator's gRPC port and reads session ids and
seq numbers off the wire (they travel in the clear), or records whole messages on the path.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from openhydra.crypto.identity import Identity, public_key_from_peer_id
from openhydra.economy.factory import build_economy
from openhydra.economy.peer_settlement import Claim
from openhydra.economy.receipts import PipelineEntry, SettlementRequest
from openhydra.economy.settlement_wire import claim_to_pb
from openhydra.economy.swarm_settlement import SwarmSettler
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.messages import HopSpec
from openhydra.peer.node_privacy import PrivacyStatus
from openhydra.peer.outbound import CHANNEL_OPTIONS
from openhydra.peer.privacy import ChainPrivacy, CoordinatorRoute
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.runtime.sampling import SamplingParams
from tests.adversarial.keyed_peer import SETTLE_MODEL, keyed_peers
from tests.peer.privacy_helpers import ManInTheMiddle

pytestmark = pytest.mark.slow
SPLITS = [(0, 4), (4, 8)]
ENCRYPTED = ChainPrivacy(encrypt=True)
TUNABLES = ClientTunables(step_timeout_s=20.0)
GREEDY = SamplingParams()
PROMPT = [11, 402, 93, 1770, 5, 318, 2048, 77]
JUNK_HANDSHAKES = 10_000
LIVE_SESSIONS = 8
PIDS: dict[str, int] = {}  # peer address -> its process id
LEDGERS: dict[str, Path] = {}  # peer address -> its ledger's folder (the peers settle what they serve)


@pytest.fixture(scope="module")
def route(tiny_model_dirs, tmp_path_factory) -> Iterator[list[HopSpec]]:
    ledgers = [tmp_path_factory.mktemp(f"hop{i}") for i in range(len(SPLITS))]
    with keyed_peers(tiny_model_dirs["llama"], SPLITS,  # llama: full attention: Truncate works
                     flags=[["--ledger-dir", str(d)] for d in ledgers]) as (hops, procs):
        PIDS.update({hop.address: proc.pid for hop, proc in zip(hops, procs, strict=True)})
        LEDGERS.update({hop.address: d for hop, d in zip(hops, ledgers, strict=True)})
        yield hops


@pytest.fixture
def settler(client, tmp_path) -> Iterator[SwarmSettler]:
    """The coordinator's settler, with a ledger of its own (it serves no span: every hop is paid)."""
    economy = build_economy(identity=Identity.generate(), data_dir=str(tmp_path))
    settling = SwarmSettler(economy, client, SETTLE_MODEL)
    yield settling
    settling.shutdown()
    economy.close()


@pytest.fixture
def client(route) -> Iterator[PeerChainClient]:
    chain = PeerChainClient(route, tunables=TUNABLES, privacy=ENCRYPTED)
    yield chain
    chain.shutdown()


def _run(client: PeerChainClient, session: str, n: int) -> list[int]:
    """Prompt then n - 1 greedy decode steps; the tokens."""
    tokens = [client.step(session, PROMPT, 0, GREEDY, 0)]
    for step in range(1, n):
        tokens.append(client.step(session, [tokens[-1]], len(PROMPT) + step - 1, GREEDY, step))
    return tokens


def _stranger(address: str) -> tuple[grpc.Channel, pb_grpc.PeerStub]:
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return channel, pb_grpc.PeerStub(channel)


def _info(address: str) -> pb.InfoReply:
    channel, stub = _stranger(address)
    with channel:
        return stub.Info(pb.InfoRequest(), timeout=10)


def test_stranger_cannot_close_a_session(client, route) -> None:
    session = uuid.uuid4().hex
    tokens = _run(client, session, 3)
    denied_before = [_info(h.address).crypto_rejections.get("control_denied", 0) for h in route]
    for hop in route:  # the stranger knows the session id: it travels in the clear
        forged = pb.CloseRequest(session_id=session)  # a made-up tag is no better than none
        forged.auth.hop_index, forged.auth.counter, forged.auth.tag = 0, 10**9, os.urandom(32)
        channel, stub = _stranger(hop.address)
        with channel:
            for request in (pb.CloseRequest(session_id=session), forged):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.CloseSession(request, timeout=10)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    denied_after = [_info(h.address).crypto_rejections.get("control_denied", 0) for h in route]
    assert [b - a for a, b in zip(denied_before, denied_after, strict=True)] == [2, 2]  # counted (-> /metrics)
    # The session lives on: the next token comes from the caches the stranger failed to drop.
    assert client.step(session, [tokens[-1]], len(PROMPT) + 2, GREEDY, 3) >= 0
    text = PrivacyStatus("encrypted", None, None).metrics_text()
    assert 'openhydra_crypto_rejections_total{side="peer",reason="control_denied"}' in text
    active = [_info(h.address).active_sessions for h in route]
    client.close(session)  # the coordinator itself still can
    assert [_info(h.address).active_sessions for h in route] == [n - 1 for n in active]


def test_stranger_cannot_truncate_a_session(client, route) -> None:
    reference = _run(client, uuid.uuid4().hex, 6)
    session = uuid.uuid4().hex
    tokens = _run(client, session, 5)
    for hop in route:
        channel, stub = _stranger(hop.address)
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.Truncate(pb.TruncateRequest(session_id=session, length=1), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Untouched caches: the sixth token equals an unattacked run's.
    assert client.step(session, [tokens[-1]], len(PROMPT) + 4, GREEDY, 5) == reference[5]
    # The coordinator's own (authenticated) truncate still works: crop the last token and recompute it.
    client.truncate(session, len(PROMPT) + 4)
    assert client.step(session, [tokens[-1]], len(PROMPT) + 4, GREEDY, 5) == reference[5]
    client.close(session)


def test_stranger_cannot_sign_or_apply_a_sessions_settlement(client, route, settler) -> None:
    """Settlement comes after the close. A stranger who read the session id asks each hop who it is, then for a
    signature on a claim of its own (before the fix: answered, and the hop, now bound to the stranger's request,
    refused the coordinator's claim); it sends the receipt it saw go by to every hop before the coordinator does,
    and replays the coordinator's own ApplySettlement afterwards. All refused (PERMISSION_DENIED, counted); the
    coordinator's settlement completes and every ledger holds its one receipt with the credits the layers earn."""
    session, request_id = uuid.uuid4().hex, f"req-{uuid.uuid4().hex[:12]}"
    _run(client, session, 3)
    client.close(session)
    positions = len(PROMPT) + 2  # every hop computed the prompt and the two tokens fed back
    denied_before = [_info(h.address).crypto_rejections.get("control_denied", 0) for h in route]
    pipeline = tuple(PipelineEntry(peer_id=h.peer_id, public_key=public_key_from_peer_id(h.peer_id).hex(),
                                   layers_served=h.end - h.start) for h in route)  # peer ids are announced
    for hop in route:
        who = claim_to_pb(Claim(session, "stolen", SETTLE_MODEL, positions, hop.start, hop.end, ()))
        claim = claim_to_pb(Claim(session, "stolen", SETTLE_MODEL, positions, hop.start, hop.end, pipeline))
        claim.auth.hop_index, claim.auth.counter, claim.auth.tag = route.index(hop), 10**9, os.urandom(32)
        channel, stub = _stranger(hop.address)
        with channel:
            for forged in (who, claim):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.SignSettlement(forged, timeout=10)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
    seen: list[tuple[str, pb.SignedSettlement]] = []  # the coordinator's ApplySettlement calls, as sent
    first: list[grpc.StatusCode] = []  # what the stranger's earlier copies got
    honest_calls = client.peer_calls

    def on_the_path(calls):
        for address, method, message in calls:
            if method == "ApplySettlement":
                seen.append((address, message))
                untagged = pb.SignedSettlement()
                untagged.CopyFrom(message)
                untagged.ClearField("auth")
                channel, stub = _stranger(address)
                with channel:
                    try:
                        stub.ApplySettlement(untagged, timeout=10)
                        first.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        first.append(exc.code())
        return honest_calls(calls)

    client.peer_calls = on_the_path
    result = settler.submit(request_id, session, positions, route).result(timeout=120)
    status = settler.network_status()
    assert result is not None, status
    assert first == [grpc.StatusCode.PERMISSION_DENIED] * len(route)
    assert (status["settled"], status["failed"], status["peer_applied"], status["peer_replayed"]) == (1, 0, 2, 0)
    for address, message in seen:  # a recorded, tagged ApplySettlement does not play twice either
        channel, stub = _stranger(address)
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.ApplySettlement(message, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    denied_after = [_info(h.address).crypto_rejections.get("control_denied", 0) for h in route]
    assert [b - a for a, b in zip(denied_before, denied_after, strict=True)] == [4, 4]
    # Exactly what an unattacked settlement gives: 1,000 tokens = 1 credit = 10^6 micro, split 4:4 by layers,
    # in the coordinator's ledger and, once, each hop's own share in its own.
    earned = {h.peer_id: positions * 1000 * (h.end - h.start) // 8 for h in route}
    assert result.credits == earned
    for hop in route:
        assert _ledger_credits(LEDGERS[hop.address], request_id) == [(result.receipt_id,
                                                                      {hop.peer_id: earned[hop.peer_id]})]


def test_onion_settlement_survives_a_strangers_claim(route, tiny_model_dirs, tmp_path) -> None:
    """privacy=onion: each hop signs a receipt naming only itself when the close (sealed under its key) reaches it.
    A stranger's SignSettlement on the live session is refused (before the fix it was signed, and the hop then had
    no receipt for the coordinator: its work went unpaid); the receipts come back and the settlement is whole."""
    client = PeerChainClient(route, tunables=TUNABLES, privacy=ChainPrivacy(encrypt=True, onion=True),
                             embedder=load_embedder(tiny_model_dirs["llama"]))
    economy = build_economy(identity=Identity.generate(), data_dir=str(tmp_path))
    settling = SwarmSettler(economy, client, SETTLE_MODEL)
    try:
        session = uuid.uuid4().hex
        _run(client, session, 3)
        positions = len(PROMPT) + 2
        for i, hop in enumerate(route):
            mine = (PipelineEntry(peer_id=hop.peer_id, public_key=public_key_from_peer_id(hop.peer_id).hex(),
                                  layers_served=hop.end - hop.start),)
            channel, stub = _stranger(hop.address)
            with channel, pytest.raises(grpc.RpcError) as refused:
                stub.SignSettlement(claim_to_pb(Claim(session, f"stolen#{i}", SETTLE_MODEL, positions, hop.start,
                                                      hop.end, mine)), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
        client.close(session)
        receipts = [blob for _, blob in client.onion_receipts[session]]
        assert all(blob is not None for blob in receipts), receipts
        result = settling.submit(f"req-{session[:8]}", session, positions, route).result(timeout=120)
        status = settling.network_status()
        assert (status["settled"], status["failed"], status["peer_applied"], status["peer_failed"]) == (1, 0, 2, 0)
        assert result is not None
        for hop, blob in zip(route, receipts, strict=True):
            receipt = SettlementRequest.model_validate_json(blob)
            assert receipt.tokens_served == positions and receipt.shares[0].peer_id == hop.peer_id
            assert _ledger_credits(LEDGERS[hop.address], receipt.request_id) == [
                (receipt.receipt_id, {hop.peer_id: positions * 1000 * (hop.end - hop.start) // 8})]
    finally:
        settling.shutdown()
        economy.close()
        client.shutdown()


def test_forged_failure_blames_no_hop(client, route) -> None:
    for _attempt in range(3):  # a step that ends before the forgeries can be sent gives no verdict: say so, again
        session = uuid.uuid4().hex
        outcome = _forge_while_pending(client, route, session)
        if outcome is not None:
            break
    else:
        raise AssertionError("the step never stayed pending long enough to be forged against (3 attempts)")
    assert "error" not in outcome, outcome.get("error")
    assert isinstance(outcome["token"], int) and outcome["token"] >= 0
    assert client.crypto_rejections["forged_failure"] == 2
    assert client.crypto_rejections["forged_result"] == 2
    client.close(session)


def _forge_while_pending(client: PeerChainClient, route: list[HopSpec], session: str) -> dict[str, object] | None:
    """Hold a step in flight (the last hop stopped), deliver four forged results for it to the coordinator, resume;
    the step's outcome, or None (with a warning saying why) if the step ended before the forgeries were sent."""
    tokens = _run(client, session, 2)
    last = psutil.Process(PIDS[route[-1].address])
    outcome: dict[str, object] = {}

    def step() -> None:
        try:
            outcome["token"] = client.step(session, [tokens[-1]], len(PROMPT) + 1, GREEDY, 2)
        except Exception as exc:  # the attack's effect on the current code: a HopError naming an honest hop
            outcome["error"] = exc

    last.suspend()  # hold the step in flight so the forgeries find it pending
    try:
        worker = threading.Thread(target=step)
        worker.start()
        seq = _wait_pending(client, session, worker)  # the stranger reads (session id, seq) off the wire
        if seq is None:
            warnings.warn(f"the step ended before it was seen pending (last hop {last.status()}): {outcome!r}",
                          stacklevel=1)
            client.close(session)
            return None
        forged = [
            pb.Result(session_id=session, seq=seq, failure=pb.Failure(
                hop_address=route[0].address, code=grpc.StatusCode.UNAVAILABLE.value[0], message="it died",
                expected_position=-1)),
            pb.Result(session_id=session, seq=seq, token=7, last_hop=route[-1].address),  # unsealed
            pb.Result(session_id=session, seq=seq, sealed=os.urandom(80)),
        ]
        tagged = pb.Result()
        tagged.CopyFrom(forged[0])
        tagged.failure_auth.hop_index, tagged.failure_auth.tag = 1, os.urandom(32)
        forged.append(tagged)
        with grpc.insecure_channel(client.reply_address, options=CHANNEL_OPTIONS) as channel:
            assert pb_grpc.CoordinatorStub(channel).Deliver(iter(forged), timeout=10).results == len(forged)
    finally:
        last.resume()
    worker.join(timeout=60)
    return outcome


def test_junk_handshake_flood_evicts_no_live_session(client, route) -> None:
    sessions = [uuid.uuid4().hex for _ in range(LIVE_SESSIONS)]
    last = {sid: _run(client, sid, 2)[-1] for sid in sessions}
    target = route[0]
    began = time.perf_counter()
    outcomes = asyncio.run(_flood(target, JUNK_HANDSHAKES))
    took = time.perf_counter() - began
    lost = 0
    for sid in sessions:
        try:
            client.step(sid, [last[sid]], len(PROMPT) + 1, GREEDY, 2)
        except Exception:
            lost += 1
    info = _info(target.address)
    print(f"\n{JUNK_HANDSHAKES} junk handshakes to {target.address} in {took:.1f} s "
          f"({JUNK_HANDSHAKES / took:.0f}/s; load average {os.getloadavg()[0]:.1f}): {outcomes}; "
          f"live sessions lost: {lost} of {LIVE_SESSIONS}; peer holds {info.active_sessions} caches; "
          f"rejections {dict(info.crypto_rejections)}")
    assert lost == 0
    assert sum(outcomes.values()) == JUNK_HANDSHAKES and outcomes.get("OK", 0) == 0
    for sid in sessions:
        client.close(sid)


def test_replayed_first_message_after_close_gets_no_compute(route) -> None:
    mitm = ManInTheMiddle(route[0].address, lambda _i, step, _seen: [step])  # records what the coordinator sends
    watched = [route[0].model_copy(update={"address": mitm.address}), *route[1:]]
    client = PeerChainClient(watched, tunables=TUNABLES, privacy=ENCRYPTED)
    try:
        session = uuid.uuid4().hex
        _run(client, session, 3)
        client.close(session)
        first = mitm.seen[0]
        assert first.onion and first.sealed and first.session_id == session
        served = [_info(h.address).steps_served for h in route]
        replayed = _info(route[0].address).crypto_rejections.get("replayed", 0)
        channel, stub = _stranger(route[0].address)
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.Forward(iter(mitm.seen), timeout=20)  # the whole recorded stream, after the close
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
        assert _info(route[0].address).crypto_rejections.get("replayed", 0) == replayed + 1
        assert [_info(h.address).steps_served for h in route] == served  # no compute anywhere
    finally:
        client.shutdown()
        mitm.stop()


# ---- helpers ---------------------------------------------------------------------------------------------------


def _ledger_credits(ledger_dir: Path, request_id: str) -> list[tuple[str, dict[str, int]]]:
    """A hop's ledger (SQLite, read-only while the peer runs): (receipt id, credits by peer) per settlement of
    ``request_id``."""
    with sqlite3.connect(f"file:{ledger_dir / 'ledger.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT receipt_id FROM econ_settlement WHERE request_id = ?", (request_id,)).fetchall()
        shares = db.execute("SELECT peer_id, credits FROM econ_receipt_share WHERE request_id = ?",
                            (request_id,)).fetchall()
    return [(receipt, dict(shares)) for (receipt,) in rows]


def _wait_pending(client: PeerChainClient, session: str, worker: threading.Thread,
                  timeout_s: float = 30.0) -> int | None:
    """The seq of the session's pending step; None if the step ended first (``worker`` is the thread that runs it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = [seq for sid, seq in list(client._pending) if sid == session]
        if pending:
            return pending[0]
        if not worker.is_alive():
            return None
        time.sleep(0.01)
    raise AssertionError(f"the step never became pending in {timeout_s:.0f} s")


async def _flood(hop: HopSpec, count: int, concurrency: int = 64) -> dict[str, int]:
    """``count`` junk handshakes on fresh Forward streams: a third random onions, a third onions the stranger
    built for real with a junk sealed step, a third whole authentic stranger sessions whose step is invalid.
    Returns how many streams ended with each status code."""
    outcomes: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(hop.address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.PeerStub(channel)

        def junk(i: int) -> pb.Step:
            sid, kind = uuid.uuid4().hex, i % 3
            if kind == 0:
                return pb.Step(session_id=sid, seq=0, onion=os.urandom(2048), sealed=os.urandom(64))
            stranger = CoordinatorRoute.build(sid, [hop], ENCRYPTED, "127.0.0.1:9")
            message = stranger.seal_step(pb.Step(session_id=sid, seq=0, start_position=0, num_positions=1))
            if kind == 1:  # the onion is real, the sealed step is not
                message.sealed = os.urandom(len(message.sealed))
            return message  # kind 2: authentic, but no tensor and no route: INVALID_ARGUMENT after admission

        async def one(i: int) -> None:
            async with gate:
                message = junk(i)  # built only once it can be sent, so in-flight calls are not starved
                call = stub.Forward(timeout=30)
                try:
                    await call.write(message)
                    await call.done_writing()
                    await call
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
            outcomes[code] = outcomes.get(code, 0) + 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return outcomes
