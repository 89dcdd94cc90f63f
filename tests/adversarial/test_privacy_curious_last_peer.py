"""What ``privacy=onion`` does not hide from the last peer (docs/security.md, README's privacy table).

Under onion the last peer returns its final hidden states and the coordinator applies the head and samples, so no
token id reaches the last peer. But the model is public: a curious last peer (``verification.fault.mode=curious``,
real node processes, honest answers) applies the model's own final norm and head to the hidden states it returns and
reads every greedy token the user gets. The README's table says so; this test keeps that sentence true.
"""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_TOKENS = 8


def test_under_onion_a_curious_last_peer_reads_the_greedy_tokens(tiny_model_dirs, tmp_path) -> None:
    model_dir = tiny_model_dirs["llama"]
    spy = tmp_path / "spy"
    with DhtProcess() as dht:
        coordinator = NodeProcess([*swarm_node_overrides(model_dir, dht.url, 0, 4, tmp_path / "coordinator"),
                                   "privacy=onion"])
        curious = NodeProcess([*swarm_node_overrides(model_dir, dht.url, 4, 8, tmp_path / "curious"), "privacy=onion",
                               "verification.fault.mode=curious", f"verification.fault.spy_dir={spy}"])
        nodes = [coordinator, curious]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
            answer = client.completions.create(model=model_dir.name, prompt="Name two rivers.", max_tokens=MAX_TOKENS,
                                               temperature=0, extra_body={"ignore_eos": True})
        finally:
            for n in nodes:
                n.stop()
    files = list(spy.iterdir())
    assert len(files) == 1, files  # one session
    read = [tuple(map(int, line.split())) for line in files[0].read_text().splitlines()]
    tokens = [token for _, token in read]
    assert len(tokens) >= MAX_TOKENS, read  # one token per step: the prompt's last position, then each decode step
    text = AutoTokenizer.from_pretrained(model_dir).decode(tokens[:MAX_TOKENS])
    print(f"\nthe user got {answer.choices[0].text!r}; the last peer read {text!r}")
    assert text == answer.choices[0].text
