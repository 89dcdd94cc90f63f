"""The node as the official `openai` client sees it: completions, streams, usage, stops, n."""

from __future__ import annotations

import openai
import pytest

MODEL = "tiny-llama-8l"
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(tiny_node) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_node.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_greedy_chat_equals_transformers_generate(client, tiny_reference):
    expected = tiny_reference.greedy(tiny_reference.chat_ids(PROMPT), 24)
    assert len(set(expected)) > 8  # a varied continuation: equality below is not trivially true
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == tiny_reference.text(expected)
    assert reply.usage.prompt_tokens == len(tiny_reference.chat_ids(PROMPT))
    assert reply.usage.completion_tokens == 24
    assert reply.choices[0].finish_reason == "length"


def test_greedy_stream_equals_non_stream_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 16
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_endpoint_greedy_matches_generate(client, tiny_reference):
    prompt = "The capital of France is"
    ids = tiny_reference.tokenizer(prompt)["input_ids"]
    expected = tiny_reference.text(tiny_reference.greedy(ids, 12))
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(ids)


def test_max_completion_tokens_is_honoured(client):
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_completion_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5


def test_stop_string_is_matched_across_tokens_and_not_emitted(client):
    full = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    # a stop string that straddles the boundary between two generated tokens
    stop = text[len(text) // 2 - 2 : len(text) // 2 + 3]
    assert len(stop) == 5
    for stream in (False, True):
        if stream:
            out = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=24, temperature=0, stop=[stop], stream=True) if c.choices)
        else:
            reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0,
                                                   stop=stop)
            out = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop"
        assert out == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_choices(client):
    kw = dict(model=MODEL, messages=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw, n=3)
    b = client.chat.completions.create(**kw, n=3)
    texts_a = [c.message.content for c in a.choices]
    assert texts_a == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len(set(texts_a)) > 1  # different seeds per choice
    assert a.usage.completion_tokens == 36


def test_unknown_fields_are_tolerated(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=3, temperature=0,
        extra_body={"some_future_field": {"x": 1}, "logit_bias": {}},
    )
    assert reply.usage.completion_tokens == 3


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=3)
    assert err.value.body["code"] == "model_not_found"
