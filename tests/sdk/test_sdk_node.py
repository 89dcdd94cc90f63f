"""The SDK against a real node process (tiny Llama, economy=hydra): network, economy and chat, sync and async.

Chat results are compared with the official ``openai`` client's answer to the same greedy request, and
the economy calls move real balances in the node's ledger.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from openhydra.crypto.identity import Identity
from openhydra.sdk import AsyncOpenHydra, BadRequestError, ConflictError, NotFoundError, OpenHydra
from openhydra.testing.processes import NodeProcess
from openhydra.testing.wait import wait_until

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something about rivers."}]


@pytest.fixture(scope="module")
def node(tiny_model_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("sdk")
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "economy=hydra",
                 f"node.data_dir={data}", "api.rate_limit_requests=100000"]
    with NodeProcess(overrides) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference(node) -> str:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny-llama-8l", messages=MESSAGES, max_tokens=16, temperature=0)
    return reply.choices[0].message.content


def test_network_and_models(node):
    with OpenHydra(node.url) as hydra:
        status = hydra.network_status()
        models = hydra.models()
    assert status.ready and status.model is not None and status.model.id == "tiny-llama-8l"
    assert status.model.num_layers == 8 and status.economy is not None and status.economy["mode"] == "hydra"
    assert "tiny-llama-8l" in models.ids and status.degradation_reason is None


def test_chat_plain_and_streamed_match_the_openai_client(node, reference):
    with OpenHydra(node.url + "/v1") as hydra:
        reply = hydra.chat(MESSAGES, max_tokens=16, temperature=0)  # model: the node's first model
        with hydra.chat_stream(MESSAGES, model="tiny-llama-8l", max_tokens=16, temperature=0) as stream:
            chunks = list(stream)
    assert reply.text == reference and reply.model == "tiny-llama-8l"
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.degradation_reason is None
    assert "".join(c.text for c in chunks) == reference
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_async_client_chat_and_balance(node, reference):
    async def run():
        async with AsyncOpenHydra(node.url) as hydra:
            reply, balance = await asyncio.gather(hydra.chat(MESSAGES, max_tokens=16, temperature=0), hydra.balance())
            stream = await hydra.chat_stream(MESSAGES, max_tokens=16, temperature=0)
            return reply, balance, await stream.text()

    reply, balance, streamed = asyncio.run(run())
    assert reply.text == reference == streamed
    assert balance.enabled and balance.mode == "hydra"


def _settled(hydra: OpenHydra, at_least: int = 0) -> int:
    """Settlements recorded once they stop moving (settlement runs after each answer) and reach ``at_least``:
    the count must be unchanged over three polls 0.5 s apart."""
    seen: list[int] = []

    def steady() -> list[int] | None:
        seen.append(hydra.network_status().economy["settlements"])
        last3 = seen[-3:]
        return last3[-1:] if len(last3) == 3 and len(set(last3)) == 1 and last3[-1] >= at_least else None

    try:
        return wait_until(steady, 120, 0.5, f"settlements to stop moving at >= {at_least}")[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; counts seen last: {seen[-5:]}") from None


def test_economy_stake_unstake_and_a_channel(node, reference):
    with OpenHydra(node.url) as hydra:
        me = hydra.balance().peer_id
        before = _settled(hydra)
        for _ in range(3):
            hydra.chat(MESSAGES, max_tokens=16, temperature=0)
        _settled(hydra, before + 3)
        have = hydra.balance().micro.hydra  # serving minted HYDRA (1 per 1,000 tokens)
        assert have >= 60_000
        with pytest.raises(ConflictError) as err:
            hydra.stake(1000)
        assert err.value.status_code == 409 and err.value.code == "insufficient_funds"
        assert "hydra, needs 1000" in err.value.error.message  # whole units, as the API speaks
        assert hydra.stake("0.02").staked == pytest.approx(0.02)
        assert hydra.unstake(0.005).staked == pytest.approx(0.015)
        balance = hydra.balance()
        assert balance.micro.stake == 15_000 and balance.micro.hydra == pytest.approx(have - 15_000, abs=1)
        channel = hydra.open_channel(Identity.generate().peer_id, 0.01)  # a payee must be a peer id
        assert (channel.payer, channel.deposit, channel.status) == (me, 10_000, "open")
        paid = hydra.update_channel(channel.channel_id, "0.004")
        assert (paid.paid, paid.nonce) == (4_000, 1)
        closed = hydra.close_channel(channel.channel_id)
        assert closed.status != "open" and closed.paid == 4_000
        with pytest.raises(ConflictError):
            hydra.close_channel(channel.channel_id)
        with pytest.raises(NotFoundError):
            hydra.close_channel("0" * 32)
        with pytest.raises(ValueError):
            hydra.update_channel(channel.channel_id)  # neither amount nor signed update


def test_bad_input_is_a_typed_error_with_the_field(node):
    with OpenHydra(node.url) as hydra:
        with pytest.raises(BadRequestError) as err:
            hydra.chat(MESSAGES, max_tokens=-3)
        assert err.value.error.param is not None and "max_tokens" in err.value.error.param
        with pytest.raises(NotFoundError) as missing:
            hydra.chat(MESSAGES, model="no-such-model", max_tokens=4)
        assert missing.value.code == "model_not_found"
        with pytest.raises(BadRequestError):
            hydra.stake("0.0000001")  # finer than a micro-unit: refused, not rounded
