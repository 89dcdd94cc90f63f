"""The node as the official `ollama` client sees it."""

from __future__ import annotations

import ollama
import pytest

MODEL = "tiny-llama-8l"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(tiny_node) -> ollama.Client:
    return ollama.Client(host=tiny_node.url, timeout=60)


def test_chat_greedy_equals_transformers_generate(client, tiny_reference):
    expected = tiny_reference.text(tiny_reference.greedy(tiny_reference.chat_ids(MESSAGES), 20))
    reply = client.chat(model=MODEL, messages=MESSAGES, options={"num_predict": 20, "temperature": 0})
    assert reply.message.content == expected
    assert reply.done and reply.done_reason == "length"
    assert reply.eval_count == 20
    assert reply.prompt_eval_count == len(tiny_reference.chat_ids(MESSAGES))
    assert reply.total_duration > 0 and reply.eval_duration > 0


def test_chat_stream_is_ndjson_and_matches_non_stream(client):
    options = {"num_predict": 12, "temperature": 0}
    full = client.chat(model=MODEL, messages=MESSAGES, options=options)
    parts = list(client.chat(model=MODEL, messages=MESSAGES, options=options, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].eval_count == 12


def test_generate_with_system_and_stop(client, tiny_reference):
    options = {"num_predict": 16, "temperature": 0}
    full = client.generate(model=MODEL, prompt="Tell me about the sea.", options=options)
    text = full.response
    stop = text[3:8]
    cut = client.generate(model=MODEL, prompt="Tell me about the sea.", options={**options, "stop": [stop]})
    assert cut.response == text[: text.index(stop)]
    assert cut.done_reason == "stop"
    streamed = "".join(p.response for p in client.generate(model=MODEL, prompt="Tell me about the sea.",
                                                             options=options, stream=True))
    assert streamed == text


def test_seeded_sampling_reproducible(client):
    options = {"num_predict": 10, "temperature": 0.9, "seed": 7, "top_k": 20}
    a = client.generate(model=MODEL, prompt="Once upon a time", options=options).response
    b = client.generate(model=MODEL, prompt="Once upon a time", options=options).response
    assert a == b


def test_tags_show_ps_version(client, tiny_llama):
    names = [m.model for m in client.list().models]
    assert names == [f"{MODEL}:latest"]
    shown = client.show(MODEL)
    assert shown.details.family == "llama"
    assert "im_start" in shown.template
    assert [m.model for m in client.ps().models] == [f"{MODEL}:latest"]
    import httpx

    version = httpx.get(str(client._client.base_url) + "/api/version").json()
    assert version["version"]
    info = httpx.post(str(client._client.base_url) + "/api/show", json={"model": MODEL}).json()["model_info"]
    from openhydra.hardware.dtype import span_parameter_count

    assert info["general.parameter_count"] == span_parameter_count(tiny_llama, 0, None)  # the checkpoint's count
    tags = httpx.get(str(client._client.base_url) + "/api/tags").json()["models"][0]
    assert tags["size"] == sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors")) - _header_bytes(tiny_llama)


def _header_bytes(model_dir) -> int:
    """What a safetensors file holds beyond its tensors: the 8-byte length and the JSON header."""
    import struct

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += 8 + struct.unpack("<Q", fh.read(8))[0]
    return total


def test_unknown_model_raises_response_error(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=MESSAGES)
    assert err.value.status_code == 404
