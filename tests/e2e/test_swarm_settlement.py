"""Requests served through a real 3-node swarm are settled: every peer signs, every ledger holds the receipt.

The README's swarm (DHT + three node processes, tiny Llama, layers [0,3), [3,5), [5,8); see conftest.py),
requests through node 0 with the official ``openai`` client; then each node's ``/v1/account/balance``
shows credits in proportion to the layers it ran, the three ledgers hold the same verified receipts (a hop's
paying only that hop's share, the coordinator's every hop's), the
requester paid what the policy says, and a replayed or tampered receipt is refused by every peer.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from openhydra.economy.peer_settlement import Claim
from openhydra.economy.receipts import ServedShare, SettlementRequest
from openhydra.economy.settlement_wire import claim_to_pb, receipt_to_pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def _get(url: str, path: str) -> dict:
    return httpx.get(url + path, timeout=10).json()


def _db(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True)


def _settlements(data_dir: Path) -> dict[str, tuple]:
    """request id -> (receipt id, model, tokens, [(peer, key, layers, signature, credits), ...])."""
    with _db(data_dir) as db:
        rows = db.execute("SELECT request_id, receipt_id, model_id, tokens_served FROM econ_settlement").fetchall()
        shares = db.execute("SELECT s.request_id, s.peer_id, a.public_key, s.layers_served, s.signature, s.credits "
                            "FROM econ_receipt_share s JOIN econ_account a USING (peer_id)").fetchall()
    return {rid: (receipt, model, tokens, sorted(s[1:] for s in shares if s[0] == rid))
            for rid, receipt, model, tokens in rows}


def _spent(data_dir: Path) -> dict[str, int]:
    with _db(data_dir) as db:
        return dict(db.execute("SELECT ref, -delta FROM econ_journal WHERE op = 'spend'").fetchall())


@pytest.fixture(scope="module")
def served(readme_swarm):
    """Three requests (two plain, one streamed) through node 0; returns their usage, the settlement status
    before and after, and the request ids settled before them."""
    nodes = readme_swarm.nodes
    first = _get(nodes[0].url, "/v1/network/status")["settlement"]
    while first["queued"]:  # an earlier test's settlement still running
        time.sleep(0.2)
        first = _get(nodes[0].url, "/v1/network/status")["settlement"]
    known = set(_settlements(readme_swarm.data_dirs[0]))
    client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    usages = []
    for text in ("Count to five.", "Name a colour."):
        reply = client.chat.completions.create(model=readme_swarm.model, messages=[{"role": "user", "content": text}],
                                               max_tokens=24, temperature=0)
        usages.append((reply.usage.total_tokens, reply.choices[0].finish_reason))
    stream = client.chat.completions.create(model=readme_swarm.model, max_tokens=16, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Hello there"}],
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    usages.append((chunks[-1].usage.total_tokens, next(c.choices[0].finish_reason for c in chunks
                                                        if c.choices and c.choices[0].finish_reason)))
    deadline = time.monotonic() + 60  # settlement runs after the answer, off the request path
    while (status := _get(nodes[0].url, "/v1/network/status")["settlement"])["completed"] < first["completed"] + 3:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return usages, first, status, known


def test_each_node_earns_in_proportion_to_its_layers(readme_swarm, served):
    nodes, dirs = readme_swarm.nodes, readme_swarm.data_dirs
    usages, first, status, known = served
    delta = {k: status[k] - first[k] for k in ("settled", "failed", "peer_applied", "peer_failed")}
    assert delta == {"settled": 3, "failed": 0, "peer_applied": 6, "peer_failed": 0}
    ledgers = [_settlements(d) for d in dirs]
    balances = [_get(n.url, "/v1/account/balance") for n in nodes]
    ids = [b["peer_id"] for b in balances]
    for rid, (receipt, model, tokens, shares) in ledgers[0].items():  # every ledger holds the same receipts, each
        assert {p for p, *_ in shares} == set(ids)  # once; the coordinator's pays every hop, a hop's only itself
        for ledger, peer in zip(ledgers[1:], ids[1:], strict=True):
            assert ledger[rid] == (receipt, model, tokens, [s for s in shares if s[0] == peer])
    assert ledgers[1].keys() == ledgers[2].keys() == ledgers[0].keys()
    layers = [b - a for a, b in readme_swarm.spans]
    earned = dict.fromkeys(ids, 0)
    for _, _, tokens, shares in ledgers[0].values():
        credits = {peer: c for peer, _, _, _, c in shares}
        assert sum(credits.values()) == tokens * 1000  # 1,000 tokens = 1 credit = 10^6 micro, split exactly
        for peer, n in zip(ids, layers, strict=True):  # in proportion to layers, to the micro-credit
            assert abs(credits[peer] - tokens * 1000 * n / sum(layers)) <= 1
            earned[peer] += credits[peer]
    # the new settlements are ours: the tokens settled are the positions every hop computed, i.e. prompt +
    # completion, less the last sampled token when it was not fed back (length stop)
    ours = sorted(t for rid, (_, _, t, _) in ledgers[0].items() if rid not in known)
    assert len(ours) == 3
    assert sum(t - (reason == "length") for t, reason in usages) <= sum(ours) <= sum(t for t, _ in usages)
    # nodes 1 and 2 only earned; node 0 (the requester) also paid for the others' layers whenever its
    # credits covered them, else used the free tier (docs/economy.md "Who pays")
    for balance, peer in zip(balances[1:], ids[1:], strict=True):
        assert balance["micro"]["credits"] == pytest.approx(earned[peer], rel=1e-4)  # decay over seconds only
    spent = _spent(dirs[0])
    for ref, amount in spent.items():
        _, _, _, shares = ledgers[0][ref.removeprefix("request:")]
        assert amount == sum(c for peer, _, _, _, c in shares if peer != ids[0])
    assert status["charged"] == len(spent) and status["charged"] + status["free_tier_requests"] == status["settled"]
    assert balances[0]["micro"]["credits"] == pytest.approx(earned[ids[0]] - sum(spent.values()), rel=1e-4, abs=2)
    for own in balances[1:]:  # node 0's ledger shows the others as their own ledgers do
        seen = _get(nodes[0].url, f"/v1/account/balance?peer_id={own['peer_id']}")["micro"]["credits"]
        assert seen == pytest.approx(own["micro"]["credits"], rel=1e-4)
    metrics = httpx.get(nodes[0].url + "/metrics", timeout=10).text
    assert f'openhydra_swarm_settlements_total{{outcome="settled"}} {status["settled"]}' in metrics


def test_a_prompt_seeded_from_the_prefix_cache_settles_what_the_hops_computed(readme_swarm, served):
    """The second request of the same long prompt starts past its cached blocks on every hop (prefix cache, 32-token
    blocks): it settles the positions the hops computed, not the whole prompt again (a hop now signs for no more:
    a red team had seeded sessions signed for positions they never computed), and the settlement does not fail."""
    nodes, dirs = readme_swarm.nodes, readme_swarm.data_dirs
    client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    text = "Rivers: " + ", ".join(f"river number {i}" for i in range(40))  # several 32-token blocks
    known, settled, usages = set(_settlements(dirs[0])), [], []
    for _ in range(2):
        before = _get(nodes[0].url, "/v1/network/status")["settlement"]
        reply = client.chat.completions.create(model=readme_swarm.model, messages=[{"role": "user", "content": text}],
                                               max_tokens=4, temperature=0)
        usages.append(reply.usage)
        deadline = time.monotonic() + 60
        while (status := _get(nodes[0].url, "/v1/network/status")["settlement"])["completed"] <= before["completed"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["failed"] == before["failed"] and status["settled"] == before["settled"] + 1, status
        new = {rid: v for rid, v in _settlements(dirs[0]).items() if rid not in known}
        assert len(new) == 1, new
        known |= set(new)
        settled.append(next(iter(new.values()))[2])
    cold, warm = settled
    assert usages[0].prompt_tokens == usages[1].prompt_tokens > 3 * 32
    assert usages[0].total_tokens - 1 <= cold <= usages[0].total_tokens  # the whole prompt and the completion
    assert warm <= cold - 3 * 32, (cold, warm)  # at least three blocks came from the cache on every hop


def _receipts(readme_swarm) -> list[SettlementRequest]:
    order = {_get(n.url, "/v1/account/balance")["peer_id"]: i for i, n in enumerate(readme_swarm.nodes)}
    receipts = []
    for request_id, (receipt_id, model_id, tokens, shares) in _settlements(readme_swarm.data_dirs[0]).items():
        shares = sorted(shares, key=lambda s: order[s[0]])  # pipeline order: by span
        receipt = SettlementRequest(
            request_id=request_id, model_id=model_id, tokens_served=tokens,
            shares=[ServedShare(peer_id=p, public_key=k, layers_served=n, signature=sig)
                    for p, k, n, sig, _ in shares],
        )
        receipt.verify()  # all three Ed25519 signatures over the whole pipeline
        assert receipt.receipt_id == receipt_id and model_id == readme_swarm.model
        receipts.append(receipt)
    return receipts


def test_receipts_verify_and_a_replay_is_refused(readme_swarm, served):
    nodes = readme_swarm.nodes
    receipts = _receipts(readme_swarm)
    assert len(receipts) >= 3
    before = [_get(n.url, "/v1/account/balance")["micro"]["credits"] for n in nodes]
    for node, span in zip(nodes, readme_swarm.spans, strict=True):
        address = _get(node.url, "/v1/network/status")["swarm"]["peer"]["grpc_address"]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.PeerStub(channel)
            with pytest.raises(grpc.RpcError) as replay:  # settles an encrypted session: only its coordinator's
                stub.ApplySettlement(receipt_to_pb(receipts[0]), timeout=10)  # tagged call is heard (a replay of
            assert replay.value.code() == grpc.StatusCode.PERMISSION_DENIED  # that: ALREADY_EXISTS, economy tests)
            tampered = receipt_to_pb(receipts[1])
            tampered.tokens_served += 1000
            with pytest.raises(grpc.RpcError) as bad:  # another body: not a receipt this peer signed, refused before
                stub.ApplySettlement(tampered, timeout=10)  # any signature is checked (a stranger's calls cost nothing)
            assert bad.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "did not sign" in bad.value.details()
            # a claim about a session this peer never served is not signed
            claim = Claim("no-such-session", "r-x", receipts[0].model_id, 10, *span, ())
            with pytest.raises(grpc.RpcError) as refused:
                stub.SignSettlement(claim_to_pb(claim), timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = [_get(n.url, "/v1/account/balance")["micro"]["credits"] for n in nodes]
    assert after == pytest.approx(before, rel=1e-4)  # nothing paid twice (only decay moves)
