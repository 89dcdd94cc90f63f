"""Real gRPC peers on loopback holding three spans: exact generation, strict validation, blame on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.server import PeerServer
from openhydra.peer.wire import encode_tensor
from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.sampling import SamplingParams, sample
from openhydra.runtime.shard import ShardRuntime

SPLITS = [(0, 2), (2, 5), (5, 8)]  # qwen3_5: cuts linear|linear and full|linear
GREEDY = SamplingParams()


def _prompt(n: int = 14, seed: int = 0) -> list[int]:
    return torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _start_peers(model_dir: Path, splits, dtype=torch.float32) -> tuple[list[PeerServer], list[HopSpec]]:
    servers = [PeerServer(ShardRuntime(model_dir, a, b, dtype=dtype)) for a, b in splits]
    route = [HopSpec(address=s.start(), start=a, end=b) for s, (a, b) in zip(servers, splits, strict=True)]
    return servers, route


def _generate(client: PeerChainClient, session: str, prompt: list[int], n: int, sampling=GREEDY) -> list[int]:
    tokens: list[int] = []
    feed, pos = prompt, 0
    for step in range(n):
        token = client.step(session, feed, pos, sampling, step)
        tokens.append(token)
        pos += len(feed)
        feed = [token]
    return tokens


@pytest.fixture(scope="module")
def chain(tiny_model_dirs) -> Iterator[tuple[list[PeerServer], list[HopSpec], PeerChainClient]]:
    servers, route = _start_peers(tiny_model_dirs["qwen3_5"], SPLITS)
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0))
    yield servers, route, client
    client.shutdown()
    for server in servers:
        server.stop()


def _hf_greedy(model_dir: Path, prompt: list[int], n: int, dtype=torch.float32) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_greedy_tokens_equal_single_process_generate(tiny_model_dirs, chain) -> None:
    _, route, client = chain
    prompt = _prompt()
    expected = _hf_greedy(tiny_model_dirs["qwen3_5"], prompt, 16)
    assert _generate(client, "greedy", prompt, 16) == expected
    # Every hop served the session and holds exactly the positions fed so far.
    for hop in route:
        assert client.info(hop.address).active_sessions >= 1
    client.close("greedy")
    assert all(client.info(hop.address).active_sessions == 0 for hop in route)


def test_llama_bf16_peers_equal_generate(tiny_model_dirs) -> None:
    servers, route = _start_peers(tiny_model_dirs["llama"], [(0, 3), (3, 5), (5, 8)], torch.bfloat16)
    client = PeerChainClient(route, tunables=ClientTunables(forward_codec="lz4"))
    try:
        prompt = _prompt(11, 3)
        assert _generate(client, "bf16", prompt, 16) == _hf_greedy(tiny_model_dirs["llama"], prompt, 16, torch.bfloat16)
        assert client.info(route[1].address).dtype == pb.DTYPE_BFLOAT16
    finally:
        client.shutdown()
        for server in servers:
            server.stop()


def test_chunked_prefill_and_logits_match_local_spans(tiny_model_dirs, chain) -> None:
    _, route, client = chain
    model_dir = tiny_model_dirs["qwen3_5"]
    prompt = _prompt(23, 5)
    local = [ShardRuntime(model_dir, a, b) for a, b in SPLITS]
    expected = greedy_generate(local, torch.tensor(prompt), 8, session_id="ref", prefill_chunk=7)
    chunked = PeerChainClient(route, tunables=ClientTunables(prefill_chunk=7))
    try:
        assert _generate(chunked, "chunked", prompt, 8) == expected
        # Logits and top-k of a one-shot prefill equal the local chain's bit for bit.
        res = client.step_result("logits", prompt, 0, GREEDY, 0, return_logits=True, return_top_k=5)
        positions = torch.arange(len(prompt))
        h = local[0].forward("ref-logits", positions, input_ids=torch.tensor(prompt))
        for rt in local[1:]:
            h = rt.forward("ref-logits", positions, hidden_states=h)
        assert res.logits is not None and res.logits.shape == h.shape
        assert (res.logits - h).abs().max().item() == 0.0
        assert list(res.top_ids) == torch.topk(h[-1], 5).indices.tolist()
        assert res.token == res.top_ids[0] and res.last_hop == route[-1].address
    finally:
        chunked.shutdown()


def test_seeded_sampling_is_reproducible_and_matches_local_sample(tiny_model_dirs, chain) -> None:
    _, _, client = chain
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    prompt = _prompt(9, 8)
    first = _generate(client, "sample-a", prompt, 10, params)
    second = _generate(client, "sample-b", prompt, 10, params)
    assert first == second
    local = [ShardRuntime(tiny_model_dirs["qwen3_5"], a, b) for a, b in SPLITS]
    feed, pos, tokens = torch.tensor(prompt), 0, []
    for step in range(10):
        positions = torch.arange(pos, pos + feed.numel())
        h = local[0].forward("s", positions, input_ids=feed)
        for rt in local[1:]:
            h = rt.forward("s", positions, hidden_states=h)
        tokens.append(sample(h[-1], params, step))
        pos += feed.numel()
        feed = torch.tensor([tokens[-1]])
    assert first == tokens


def _raw_step(route: list[HopSpec], hop: int, tensor: pb.Tensor, n: int, reply_to: str, **overrides) -> pb.Step:
    step = pb.Step(
        session_id="raw",
        seq=0,
        start_position=0,
        num_positions=n,
        tensor=tensor,
        route=[pb.Hop(address=h.address, start=h.start, end=h.end) for h in route[hop:]],
        reply_to=reply_to,
    )
    for key, value in overrides.items():
        if key == "hops":
            del step.route[:]
            step.route.extend(value)
        elif isinstance(value, pb.Sampling):
            step.sampling.CopyFrom(value)
        else:
            setattr(step, key, value)
    return step


def _send(address: str, step: pb.Step) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.PeerStub(channel).Forward(iter([step]), timeout=10)
        except grpc.RpcError as exc:
            assert exc.details() and address in exc.details()  # the refusal names the refusing peer
            return exc.code()
    return grpc.StatusCode.OK


def test_malformed_steps_rejected_with_invalid_argument(chain) -> None:
    servers, route, client = chain
    middle = route[1].address
    reply = client.reply_address
    good_hidden = encode_tensor(torch.zeros(3, 64))
    bad = {
        "hidden size": _raw_step(route, 1, encode_tensor(torch.zeros(3, 63)), 3, reply),
        "position count": _raw_step(route, 1, good_hidden, 4, reply),
        "dtype": _raw_step(route, 1, encode_tensor(torch.zeros(3, 64, dtype=torch.int64)), 3, reply),
        "payload size": _raw_step(route, 1, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3, 64], raw_size=768), 3, reply),
        "wrong span": _raw_step(route, 0, good_hidden, 3, reply),  # route[0] is [0,2); this peer holds [2,5)
        "route gap": _raw_step(
            route,
            1,
            good_hidden,
            3,
            reply,
            hops=[pb.Hop(address=middle, start=2, end=5), pb.Hop(address=middle, start=6, end=8)],
        ),
        "incomplete route": _raw_step(route, 1, good_hidden, 3, reply, hops=[pb.Hop(address=middle, start=2, end=5)]),
        "no session": _raw_step(route, 1, good_hidden, 3, reply, session_id=""),
        "sampling": _raw_step(route, 1, good_hidden, 3, reply, sampling=pb.Sampling(temperature=-1.0)),
        "reply address": _raw_step(route, 1, good_hidden, 3, "not-an-address"),
        "non-finite": _raw_step(route, 1, encode_tensor(torch.full((3, 64), float("nan"))), 3, reply),
    }
    served_before = client.info(middle).steps_served
    for what, step in bad.items():
        assert _send(middle, step) == grpc.StatusCode.INVALID_ARGUMENT, what
    first_ids_as_float = _raw_step(route, 0, encode_tensor(torch.zeros(3)), 3, reply)
    assert _send(route[0].address, first_ids_as_float) == grpc.StatusCode.INVALID_ARGUMENT
    out_of_vocab = _raw_step(route, 0, encode_tensor(torch.tensor([1, 2, 10**9])), 3, reply)
    assert _send(route[0].address, out_of_vocab) == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing reached a runtime, and the peers keep serving.
    assert client.info(middle).steps_served == served_before
    assert servers[1].runtime.session_length("raw") == 0
    assert len(_generate(client, "after-bad", _prompt(5, 9), 3)) == 3


def test_wrong_route_is_blamed_on_the_refusing_hop(chain) -> None:
    _, route, _ = chain
    lying = [HopSpec(address=route[0].address, start=0, end=3), HopSpec(address=route[1].address, start=3, end=8)]
    client = PeerChainClient(lying)
    try:
        with pytest.raises(HopError) as info:
            client.step("lie", [5, 6, 7], 0, GREEDY, 0)
        assert info.value.address == route[0].address
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.shutdown()


def test_position_mismatch_reports_expected_length(chain) -> None:
    _, route, client = chain
    client.step("pos", [5, 6, 7, 8], 0, GREEDY, 0)
    with pytest.raises(HopError) as info:
        client.step("pos", [9], 3, GREEDY, 1)  # feeding position 3 again
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.address == route[0].address and info.value.expected_position == 4
    assert client.step("pos", [9], 4, GREEDY, 1) >= 0  # the session is intact and continues


def test_dead_next_hop_is_named(tiny_model_dirs) -> None:
    servers, route = _start_peers(tiny_model_dirs["qwen3_5"], SPLITS)
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=10.0))
    try:
        prompt = _prompt(6, 11)
        token = client.step("dead", prompt, 0, GREEDY, 0)
        servers[2].stop(grace_s=0)  # the last peer dies mid-generation
        with pytest.raises(HopError) as info:
            client.step("dead", [token], len(prompt), GREEDY, 1)
        assert info.value.address == route[2].address
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        servers[0].stop(grace_s=0)  # now the first hop is gone too
        with pytest.raises(HopError) as info:
            client.step("dead2", prompt, 0, GREEDY, 0)
        assert info.value.address == route[0].address
    finally:
        client.shutdown()
        for server in servers:
            server.stop()


def test_truncate_rolls_back_every_hop(tiny_model_dirs, chain) -> None:
    servers, route = _start_peers(tiny_model_dirs["qwen3"], [(0, 3), (3, 8)])
    client = PeerChainClient(route)
    try:
        prompt = _prompt(10, 12)
        expected = _generate(client, "clean", prompt, 6)
        first = client.step("spec", prompt, 0, GREEDY, 0)
        client.step("spec", [first, 11, 12], len(prompt), GREEDY, 1)  # a draft verified, then rejected
        client.truncate("spec", len(prompt))  # roll back to the prompt
        assert all(s.runtime.session_length("spec") == len(prompt) for s in servers)
        tokens, pos = [first], len(prompt)
        for step in range(1, 6):
            tokens.append(client.step("spec", [tokens[-1]], pos, GREEDY, step))
            pos += 1
        assert tokens == expected
        with pytest.raises(HopError) as info:
            client.truncate("spec", 999)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.address == route[0].address
    finally:
        client.shutdown()
        for server in servers:
            server.stop()
    # Hybrid spans refuse: their Gated-DeltaNet state cannot be cropped.
    _, hybrid_route, hybrid = chain
    hybrid.step("spec-hybrid", _prompt(6, 13), 0, GREEDY, 0)
    with pytest.raises(HopError) as info:
        hybrid.truncate("spec-hybrid", 3)
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED and info.value.address == hybrid_route[0].address
