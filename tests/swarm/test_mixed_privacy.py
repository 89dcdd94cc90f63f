"""A swarm runs one privacy level. A coordinator on privacy=off sends plaintext steps; a peer on privacy=encrypted (the
default) refuses them. The client's 503 names that refusal instead of only "holes" for layers a running peer holds
(found by the swarm audit: the user looked for a missing peer)."""

from __future__ import annotations

import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow


def test_a_plaintext_coordinator_is_told_why_an_encrypted_peer_is_left_out(tiny_model_dirs, tmp_path_factory):
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        coordinator = NodeProcess([*swarm_node_overrides(model, dht.url, 0, 4, tmp_path_factory.mktemp("off")),
                                   "privacy=off"])
        encrypted = NodeProcess(swarm_node_overrides(model, dht.url, 4, 8, tmp_path_factory.mktemp("enc")))
        nodes = [coordinator, encrypted]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
            assert refused.value.status_code == 503
            message = refused.value.body["message"]
            assert "holes: [[4, 8]]" in message, message
            assert "left out after failing" in message and "requires encrypted steps" in message, message
        finally:
            for node in nodes:
                node.stop()
