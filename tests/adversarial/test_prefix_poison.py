"""A hop that read a coordinator's prompt-block hashes cannot poison another hop's prefix cache for that coordinator.

The attack (a privacy red team, 2026-12-07): every hop of a keyed session reads its prompt-block hashes. A peer that
served a coordinator once opens a session of its own, as a stranger coordinator, through a fresh honest peer, with
those hashes and another prompt: the honest peer files the junk KV under the hashes (the first write wins), and every
later warm session of the victim through it returned wrong tokens, though the attacker was not on its route.

Now a keyed hop files a session's blocks under ``HMAC(salt, hash)``, with a salt that the coordinator derives per hop
and puts in that hop's onion layer (peer/privacy.py ``prefix_salt``): the attacker knows the hashes and its own salts,
never the victim's salt at another hop, so its junk lands under names the victim never asks for. Real gRPC peers,
tiny Llama, onion routing, greedy sampling."""

from __future__ import annotations

import pytest
import torch

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.errors import HopError
from openhydra.peer.privacy import ChainPrivacy
from openhydra.runtime.prefix_cache import PrefixCache, PrefixKey, block_hashes
from openhydra.runtime.sampling import SamplingParams
from tests.peer.privacy_helpers import start_keyed_peers

BLOCK = 4
GREEDY = SamplingParams()


@pytest.fixture
def keyed(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    servers, hops = start_keyed_peers(model_dir, [(0, 2), (2, 5), (2, 5), (5, 8)])
    for server in servers:
        rt = server.service.runtime
        rt.prefix_cache = PrefixCache(rt.layer_types, 16 << 20, BLOCK)
    embedder = load_embedder(model_dir)
    clients: list[PeerChainClient] = []

    def coordinator() -> PeerChainClient:
        clients.append(PeerChainClient([], tunables=ClientTunables(step_timeout_s=30.0),
                                       privacy=ChainPrivacy(encrypt=True, onion=True), embedder=embedder))
        return clients[-1]

    yield servers, hops, coordinator
    for client in clients:
        client.shutdown()
    for server in servers:
        server.stop()


def _generate(client: PeerChainClient, session: str, route, prompt: list[int], skip: int, key: PrefixKey,
              n: int = 6) -> list[int]:
    tokens = [client.step_result(session, prompt[skip:], skip, GREEDY, 0, route=route, prefix=key).token]
    for i in range(1, n):
        tokens.append(client.step_result(session, [tokens[-1]], len(prompt) + i - 1, GREEDY, i, route=route).token)
    return tokens


def test_a_hop_that_saw_the_hashes_cannot_seed_junk_into_another_hops_cache(keyed):
    servers, (first, honest, fresh, last), coordinator = keyed
    victim = coordinator()
    prompt = torch.randint(3, 4000, (13,), generator=torch.Generator().manual_seed(11)).tolist()
    key = PrefixKey(tuple(block_hashes(prompt, BLOCK, b"victim-coordinator-secret-32byte")), BLOCK)
    cold = _generate(victim, "cold", [first, honest, last], prompt, 0, key)
    # the salted names still reuse the victim's own prefix: a warm session through the same hops gives the same tokens
    hits_before = servers[1].service.runtime.prefix_cache.stats.hits
    assert _generate(victim, "warm", [first, honest, last], prompt, 2 * BLOCK, key) == cold
    assert servers[1].service.runtime.prefix_cache.stats.hits > hits_before

    # the first hop read the hashes; as a coordinator of its own it sends them through the fresh peer with junk
    attacker = coordinator()
    junk = torch.randint(3, 4000, (13,), generator=torch.Generator().manual_seed(99)).tolist()
    attacker.step_result("attack", junk, 0, GREEDY, 0, route=[first, fresh, last], prefix=key)
    assert servers[2].service.runtime.prefix_cache.stats.inserted_blocks > 0  # it did store the junk

    # the victim's warm session through the fresh peer finds nothing under its names there: refused, never wrong
    with pytest.raises(HopError, match="position"):
        _generate(victim, "warm-after-attack", [first, fresh, last], prompt, 2 * BLOCK, key)
    assert _generate(victim, "cold-fresh", [first, fresh, last], prompt, 0, key) == cold  # it starts over at 0
    assert _generate(victim, "warm-fresh", [first, fresh, last], prompt, 2 * BLOCK, key) == cold  # and reuses it
