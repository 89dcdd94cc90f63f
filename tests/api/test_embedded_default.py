"""No arguments on a machine without the hub: the node falls back to the embedded SmolLM2 and says so."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
import torch

from openhydra.testing.processes import NodeProcess

pytestmark = pytest.mark.slow

REQUESTED = "openhydra-qwen3.5-0.8b"
SERVED = "openhydra-smollm2-135m"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_node(smollm2_dir, tmp_path_factory):
    # Only the data dir, the model cache (OPENHYDRA_CACHE, set by NodeProcess) and the port differ from a bare
    # start; HF_HUB_OFFLINE makes the "hub unreachable" case certain rather than depending on the sandbox.
    data = tmp_path_factory.mktemp("default-node")
    with NodeProcess([f"node.data_dir={data}", "api.rate_limit_requests=100000"], threads=1,
                     env={"HF_HUB_OFFLINE": "1"}) as node:
        yield node


@pytest.fixture(scope="module")
def reference(smollm2_dir, default_node):
    from tests.api.conftest import Reference

    # hardware=auto picks the dtype per CPU (bf16 only where it is faster, hardware/dtype.py): compare in that dtype
    model = httpx.get(default_node.url + "/v1/network/status").json()["model"]
    assert model["dtype"] in ("float32", "bfloat16") and model["dtype_reason"]
    return Reference(smollm2_dir, getattr(torch, model["dtype"]))


def test_fallback_is_announced_everywhere(default_node):
    models = httpx.get(default_node.url + "/v1/models")
    reason = models.headers["X-OpenHydra-Degradation-Reason"]
    assert REQUESTED in reason and SERVED in reason
    ids = [m["id"] for m in models.json()["data"]]
    assert set(ids) == {REQUESTED, SERVED}
    assert all(m["openhydra"]["degradation_reason"] for m in models.json()["data"])
    assert "degraded" in default_node.log_text()
    health = httpx.get(default_node.url + "/health")
    assert "X-OpenHydra-Degradation-Reason" in health.headers


def test_openai_greedy_equals_generate_on_real_weights(default_node, reference):
    expected = reference.text(reference.greedy(reference.chat_ids(MESSAGES), 32))
    client = openai.OpenAI(base_url=default_node.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=REQUESTED, messages=MESSAGES, max_tokens=32,
                                                            temperature=0)
    assert "X-OpenHydra-Degradation-Reason" in raw.headers
    reply = raw.parse()
    assert reply.choices[0].message.content == expected
    assert "Paris" in expected
    stream = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=32, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_ollama_greedy_equals_generate_on_real_weights(default_node, reference):
    expected = reference.text(reference.greedy(reference.chat_ids(MESSAGES), 32))
    client = ollama.Client(host=default_node.url)
    reply = client.chat(model=SERVED, messages=MESSAGES, options={"num_predict": 32, "temperature": 0})
    assert reply.message.content == expected
    assert reply.done_reason == "stop"  # SmolLM2 ends its answer before 32 tokens
    assert reply.eval_count == len(reference.tokenizer(expected, add_special_tokens=False)["input_ids"])


def test_readme_curl_examples_work_as_written(default_node):
    """Every `curl` line in the README's API section runs against a default node and gets a 2xx."""
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    api_section = readme.split("## The API", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in api_section.splitlines() if line.startswith("curl ")]
    assert len(commands) >= 14
    for command in commands:
        local = command.replace("127.0.0.1:8080", f"127.0.0.1:{default_node.port}")
        local = re.sub(r"^curl ", "curl --fail-with-body -o /dev/null -w '%{http_code}' ", local)
        local = local.replace(" | head", "")
        out = subprocess.run(["bash", "-c", local], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert out.stdout.strip().startswith("2"), (command, out.stdout)
