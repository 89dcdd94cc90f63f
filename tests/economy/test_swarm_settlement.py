"""Requests served through a real 3-node swarm are settled: every peer signs, every ledger holds the receipt.

DHT + three node processes (tiny Llama, layers [0,2), [2,4), [4,8)), requests through one node with the
official ``openai`` client; then each node's ``/v1/account/balance`` shows credits in proportion to the
layers it ran, the three ledgers hold the same verified receipts, and a replayed receipt is refused.
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from openhydra.economy.peer_settlement import Claim
from openhydra.economy.receipts import ServedShare, SettlementRequest
from openhydra.economy.settlement_wire import claim_to_pb, receipt_to_pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow

SPLITS = [(0, 2), (2, 4), (4, 8)]


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        dirs = [tmp_path_factory.mktemp(f"settle{a}") for a, _ in SPLITS]
        nodes = [NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, d))
                 for (a, b), d in zip(SPLITS, dirs, strict=True)]
        try:
            start_all(nodes)
            yield model_dir.name, nodes, dirs
        finally:  # stop all at once: each node's clean shutdown takes seconds
            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(NodeProcess.stop, nodes))


def _get(node: NodeProcess, path: str) -> dict:
    return httpx.get(node.url + path, timeout=10).json()


def _ledger_rows(data_dir: Path) -> dict[str, tuple]:
    with sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT request_id, receipt_id, model_id, tokens_served FROM econ_settlement").fetchall()
        shares = db.execute("SELECT s.request_id, s.peer_id, a.public_key, s.layers_served, s.signature "
                            "FROM econ_receipt_share s JOIN econ_account a USING (peer_id)").fetchall()
    out = {}
    for request_id, receipt_id, model_id, tokens in rows:
        mine = [s[1:] for s in shares if s[0] == request_id]
        out[request_id] = (receipt_id, model_id, tokens, mine)
    return out


@pytest.fixture(scope="module")
def served(swarm):
    """Three requests (two plain, one streamed) through node 0, settled everywhere."""
    model, nodes, _ = swarm
    client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    usages = []
    for text in ("Count to five.", "Name a colour."):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                               max_tokens=24, temperature=0)
        usages.append((reply.usage.total_tokens, reply.choices[0].finish_reason))
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    usages.append((chunks[-1].usage.total_tokens, next(c.choices[0].finish_reason for c in chunks
                                                        if c.choices and c.choices[0].finish_reason)))
    deadline = time.monotonic() + 60  # settlement runs after the answer, off the request path
    while time.monotonic() < deadline:
        status = _get(nodes[0], "/v1/network/status")["settlement"]
        if status["completed"] >= 3:
            break
        time.sleep(0.2)
    return usages, status


def _earned_and_spent(data_dir: Path) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """From one ledger: credits earned per peer, per request per peer, and what the owner spent per request."""
    with sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True) as db:
        shares = db.execute("SELECT request_id, peer_id, credits FROM econ_receipt_share").fetchall()
        spent = dict(db.execute("SELECT ref, -delta FROM econ_journal WHERE op = 'spend'").fetchall())
    earned: dict[str, int] = {}
    per_request: dict[str, int] = {}
    for request_id, peer, credits in shares:
        earned[peer] = earned.get(peer, 0) + credits
        per_request[f"{request_id}/{peer}"] = credits
    return earned, per_request, spent


def test_each_node_earns_in_proportion_to_its_layers(swarm, served):
    _, nodes, dirs = swarm
    usages, status = served
    assert (status["settled"], status["failed"], status["peer_applied"], status["peer_failed"]) == (3, 0, 6, 0)
    balances = [_get(n, "/v1/account/balance") for n in nodes]
    ids = [b["peer_id"] for b in balances]
    earned, per_request, spent = _earned_and_spent(dirs[0])
    assert [_earned_and_spent(d)[0] for d in dirs[1:]] == [earned, earned]  # every ledger: the same receipts
    layers = [b - a for a, b in SPLITS]
    for peer, n in zip(ids, layers, strict=True):  # 2 : 2 : 4, to the micro-credit (largest remainder)
        assert earned[peer] / earned[ids[0]] == pytest.approx(n / layers[0], abs=1e-3)
    # 1,000 tokens = 1 credit = 10^6 micro: the tokens settled are the positions every hop computed,
    # i.e. prompt + completion, less the last sampled token when it was not fed back (length stop)
    low = sum(t - (reason == "length") for t, reason in usages) * 1000
    assert low <= sum(earned.values()) <= sum(t for t, _ in usages) * 1000
    # peers 1 and 2 only earned; node 0 (the requester) earned its share and paid for the others' layers
    # whenever its credits covered them (docs/economy.md "Who pays"), else used the free tier
    for balance, peer in zip(balances[1:], ids[1:], strict=True):
        assert balance["micro"]["credits"] == pytest.approx(earned[peer], rel=1e-4)  # decay over seconds only
    for ref, amount in spent.items():
        request_id = ref.removeprefix("request:")
        assert amount == per_request[f"{request_id}/{ids[1]}"] + per_request[f"{request_id}/{ids[2]}"]
    assert status["charged"] == len(spent) and status["charged"] + status["free_tier_requests"] == 3
    assert balances[0]["micro"]["credits"] == pytest.approx(earned[ids[0]] - sum(spent.values()), rel=1e-4, abs=2)
    # node 0's ledger shows the same balances for the others as their own ledgers do
    for own in balances[1:]:
        seen = _get(nodes[0], f"/v1/account/balance?peer_id={own['peer_id']}")["micro"]["credits"]
        assert seen == pytest.approx(own["micro"]["credits"], rel=1e-4)
    metrics = httpx.get(nodes[0].url + "/metrics", timeout=10).text
    assert 'openhydra_swarm_settlements_total{outcome="settled"} 3' in metrics


def _receipts(swarm) -> list[SettlementRequest]:
    model, nodes, dirs = swarm
    order = {_get(n, "/v1/account/balance")["peer_id"]: i for i, n in enumerate(nodes)}
    ledgers = [_ledger_rows(d) for d in dirs]
    assert len(ledgers[0]) == 3 and ledgers[0] == ledgers[1] == ledgers[2]  # the same receipts everywhere
    receipts = []
    for request_id, (receipt_id, model_id, tokens, shares) in ledgers[0].items():
        shares = sorted(shares, key=lambda s: order[s[0]])  # pipeline order: by span
        receipt = SettlementRequest(
            request_id=request_id, model_id=model_id, tokens_served=tokens,
            shares=[ServedShare(peer_id=p, public_key=k, layers_served=n, signature=sig) for p, k, n, sig in shares],
        )
        receipt.verify()  # all three Ed25519 signatures over the whole pipeline
        assert receipt.receipt_id == receipt_id and model_id == model
        assert [s.layers_served for s in receipt.shares] == [2, 2, 4]
        receipts.append(receipt)
    return receipts


def test_receipts_verify_and_a_replay_is_refused(swarm, served):
    _, nodes, _ = swarm
    receipts = _receipts(swarm)
    before = [_get(n, "/v1/account/balance")["micro"]["credits"] for n in nodes]
    for node in nodes:
        address = _get(node, "/v1/network/status")["swarm"]["peer"]["grpc_address"]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.PeerStub(channel)
            with pytest.raises(grpc.RpcError) as replay:
                stub.ApplySettlement(receipt_to_pb(receipts[0]), timeout=10)
            assert replay.value.code() == grpc.StatusCode.ALREADY_EXISTS
            tampered = receipt_to_pb(receipts[1])
            tampered.tokens_served += 1000
            with pytest.raises(grpc.RpcError) as bad:
                stub.ApplySettlement(tampered, timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a claim about a session this peer never served is not signed
            claim = Claim("no-such-session", "r-x", receipts[0].model_id, 10, *SPLITS[nodes.index(node)], ())
            with pytest.raises(grpc.RpcError) as refused:
                stub.SignSettlement(claim_to_pb(claim), timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = [_get(n, "/v1/account/balance")["micro"]["credits"] for n in nodes]
    assert after == pytest.approx(before, rel=1e-4)  # nothing paid twice (only decay moves)
