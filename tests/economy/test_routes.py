"""The economy HTTP routes on a real Sanic server (a subprocess on a free loopback port), via httpx."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openhydra.crypto.identity import Identity
from openhydra.economy.channels import sign_update
from openhydra.economy.ledger import Ledger
from openhydra.economy.receipts import build_settlement
from openhydra.economy.units import MICRO
from openhydra.testing.wait import wait_until

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, mode: str) -> tuple[str, Identity, str, subprocess.Popen[bytes]]:
    key_file, db_url = tmp_path / f"{mode}.key", f"sqlite:///{tmp_path / 'ledger.db'}"
    node = Identity.load_or_create(key_file)
    if mode != "off":  # the node served 20,000 tokens before: 20 credits, 20 HYDRA
        led = Ledger(db_url)
        led.settle(build_settlement("earlier", "m", 20_000, [(node, 1)]))
        led.close()
    port = free_port()
    log_path = tmp_path / f"server-{mode}-{port}.log"  # a file, not a pipe nobody reads (a full pipe blocks)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.economy.econ_server", str(port), str(key_file), db_url, mode],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text(errors='replace')[-2000:]}")
        httpx.get(f"{base}/v1/network/status", timeout=2)
        return True

    try:
        wait_until(answering, 120, 0.1, f"the economy server on {base}", ignore=httpx.TransportError)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return base, node, db_url, proc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Identity, str]]:
    """One server for the module (start-up is seconds); tests assert deltas, so order does not matter."""
    base, node, db_url, proc = _start(tmp_path_factory.mktemp("econ"), "hydra")
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client, node, db_url
    proc.terminate()
    proc.wait(timeout=10)


def _error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code, err
    return err


def test_balance_and_status(server: tuple[httpx.Client, Identity, str]) -> None:
    client, node, db_url = server
    bal = client.get("/v1/account/balance").json()
    led = Ledger(db_url)
    direct = led.balance(node.peer_id)
    assert bal["peer_id"] == node.peer_id and bal["enabled"] is True and bal["mode"] == "hydra"
    assert (bal["micro"]["hydra"], bal["micro"]["stake"]) == (direct.hydra, direct.stake)
    assert bal["hydra"] == direct.hydra / MICRO
    assert abs(direct.credits - bal["micro"]["credits"]) < 1000  # credits decay ~12 micro/s at 20 credits
    assert bal["micro"]["hydra"] + bal["micro"]["stake"] + bal["micro"]["escrow"] <= 20 * MICRO
    other = client.get("/v1/account/balance", params={"peer_id": "someone-else"}).json()
    assert (other["credits"], other["hydra"]) == (0, 0)
    eco = client.get("/v1/network/status").json()["economy"]
    assert eco["enabled"] and eco["backend"] == "sqlite" and eco["settlements"] == 1
    assert eco["hydra"]["cap"] == 69_000_000 and eco["hydra"]["minted"] == 20.0
    assert eco["hydra"]["supply"] == led.totals().hydra_supply / MICRO
    led.close()


def test_stake_unstake_and_overspend(server: tuple[httpx.Client, Identity, str]) -> None:
    client, _, _ = server
    start = client.get("/v1/account/balance").json()["micro"]
    staked = client.post("/v1/hydra/stake", json={"amount": 1.5}).json()["staked"]
    assert staked == (start["stake"] + 1_500_000) / MICRO
    assert client.post("/v1/hydra/stake", json={"amount": "2.25"}).json()["staked"] == staked + 2.25
    before = client.get("/v1/account/balance").json()["micro"]
    _error(client.post("/v1/hydra/stake", json={"amount": 1000}), 409, "insufficient_funds")
    _error(client.post("/v1/hydra/unstake", json={"amount": 1000}), 409, "insufficient_funds")
    after = client.get("/v1/account/balance").json()["micro"]
    assert (after["hydra"], after["stake"], after["escrow"]) == (
        before["hydra"],
        before["stake"],
        before["escrow"],
    )
    client.post("/v1/hydra/unstake", json={"amount": 3.75}).raise_for_status()
    end = client.get("/v1/account/balance").json()["micro"]
    assert (end["hydra"], end["stake"]) == (start["hydra"], start["stake"])


@pytest.mark.parametrize(
    "body,param",
    [
        ({"amount": -1}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": "lots"}, "amount"),
        ({"amount": 0.0000001}, "amount"),
        ({"amount": 1, "extra": True}, "extra"),
        ({}, "amount"),
    ],
)
def test_bad_stake_input_is_400(server: tuple[httpx.Client, Identity, str], body: dict, param: str) -> None:
    client, _, _ = server
    assert _error(client.post("/v1/hydra/stake", json=body), 400)["param"] == param


def test_malformed_bodies_are_400(server: tuple[httpx.Client, Identity, str]) -> None:
    client, _, _ = server
    for raw in (b"", b"not json", b"[1, 2]", b'"amount"'):
        _error(client.post("/v1/hydra/stake", content=raw), 400)
    _error(client.get("/v1/account/balance", params={"peer_id": "x" * 200}), 400)


def test_channel_lifecycle(server: tuple[httpx.Client, Identity, str]) -> None:
    client, node, _ = server
    payee = Identity.generate()
    start = client.get("/v1/account/balance").json()["micro"]
    ch = client.post("/v1/hydra/channels/open", json={"payee": payee.peer_id, "deposit": 5})
    assert ch.status_code == 201, ch.text
    cid = ch.json()["channel_id"]
    assert ch.json()["deposit_hydra"] == 5.0 and ch.json()["status"] == "open"
    assert client.get("/v1/account/balance").json()["micro"]["escrow"] == start["escrow"] + 5 * MICRO

    paid = client.post("/v1/hydra/channels/update", json={"channel_id": cid, "amount": 1.25}).json()
    assert (paid["nonce"], paid["paid_hydra"]) == (1, 1.25)
    # A payer-signed update lodged as-is (what a payee would send).
    upd = sign_update(node, cid, 5, 2 * MICRO)
    signed = {"nonce": upd.nonce, "amount_micro": upd.amount, "signature": upd.signature}
    assert (
        client.post("/v1/hydra/channels/update", json={"channel_id": cid, "signed": signed}).json()["nonce"]
        == 5
    )
    _error(
        client.post("/v1/hydra/channels/update", json={"channel_id": cid, "signed": signed}), 409
    )  # replay
    forged = sign_update(payee, cid, 6, 5 * MICRO)  # the payee cannot pay itself
    body = {"nonce": 6, "amount_micro": forged.amount, "signature": forged.signature}
    _error(
        client.post("/v1/hydra/channels/update", json={"channel_id": cid, "signed": body}),
        400,
        "invalid_signature",
    )
    tampered = {**signed, "nonce": 7, "amount_micro": 4 * MICRO}
    _error(client.post("/v1/hydra/channels/update", json={"channel_id": cid, "signed": tampered}), 400)
    _error(
        client.post("/v1/hydra/channels/update", json={"channel_id": cid, "amount": 1, "signed": signed}), 400
    )
    _error(client.post("/v1/hydra/channels/update", json={"channel_id": cid, "amount": 6}), 400)  # > deposit

    closed = client.post("/v1/hydra/channels/close", json={"channel_id": cid}).json()
    assert (closed["status"], closed["paid_hydra"]) == ("closed", 2.0)
    _error(client.post("/v1/hydra/channels/close", json={"channel_id": cid}), 409, "channel_closed")
    _error(client.post("/v1/hydra/channels/close", json={"channel_id": "0" * 32}), 404)
    _error(client.post("/v1/hydra/channels/close", json={"channel_id": "nope"}), 400)
    bal = client.get("/v1/account/balance").json()
    assert (bal["micro"]["hydra"], bal["micro"]["escrow"]) == (start["hydra"] - 2 * MICRO, start["escrow"])
    assert client.get("/v1/account/balance", params={"peer_id": payee.peer_id}).json()["hydra"] == 2.0


def test_a_channel_opens_only_to_a_peer_id(server: tuple[httpx.Client, Identity, str]) -> None:
    """A probe escrowed a deposit to "notapeer": nobody could ever sign to close it."""
    client, _, _ = server

    def held() -> tuple[int, int]:  # HYDRA and escrow (credits decay with time)
        micro = client.get("/v1/account/balance").json()["micro"]
        return micro["hydra"], micro["escrow"]

    before = held()
    real = Identity.generate().peer_id
    for payee in ("notapeer", real[:-1], real + "1", real.replace("W", "0", 1),  # wrong lengths, not base58
                  "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"):  # an RSA key's id (no Ed25519 key to sign with)
        resp = client.post("/v1/hydra/channels/open", json={"payee": payee, "deposit": 0.01})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "payee", (payee, resp.text)
        assert resp.json()["error"]["message"].startswith("payee: not a peer id (an Ed25519 libp2p id"), resp.text
    assert held() == before  # nothing escrowed
    assert client.post("/v1/hydra/channels/open", json={"payee": real, "deposit": 0.01}).status_code == 201


def test_channel_limit_and_overdraft(server: tuple[httpx.Client, Identity, str]) -> None:
    client, _, db_url = server
    payee = Identity.generate().peer_id
    _error(
        client.post("/v1/hydra/channels/open", json={"payee": payee, "deposit": 21}),
        409,
        "insufficient_funds",
    )
    opened = []
    while client.get("/v1/account/balance").json()["open_channels"] < 8:
        resp = client.post("/v1/hydra/channels/open", json={"payee": payee, "deposit": 0.5})
        assert resp.status_code == 201, resp.text
        opened.append(resp.json()["channel_id"])
    _error(
        client.post("/v1/hydra/channels/open", json={"payee": payee, "deposit": 1}),
        409,
        "channel_limit_reached",
    )
    for cid in opened:
        assert client.post("/v1/hydra/channels/close", json={"channel_id": cid}).status_code == 200
    led = Ledger(db_url)
    assert led.audit().ok
    led.close()


def test_off_economy(tmp_path: Path) -> None:
    base, _, _, proc = _start(tmp_path, "off")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            bal = client.get("/v1/account/balance").json()
            assert bal["enabled"] is False and bal["mode"] == "off" and bal["credits"] == 0
            _error(client.post("/v1/hydra/stake", json={"amount": 1}), 409, "economy_disabled")
            _error(client.post("/v1/hydra/channels/open", json={"payee": Identity.generate().peer_id, "deposit": 1}),
                   409)
            assert client.get("/v1/network/status").json()["economy"] == {"enabled": False, "mode": "off"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not (tmp_path / "ledger.db").exists()  # off records nothing, not even a file
