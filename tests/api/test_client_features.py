"""What clients ask for is done, or refused with a 400 that says so: logprobs, echo, structured output, tools.

Official `openai` and `ollama` clients against real node processes: the tiny random Llama for shapes and
mechanics (its random weights make free text endless, so the schemas here are ones a random model finishes),
the real SmolLM2 (slow) for schema-valid JSON and logprob consistency.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import jsonschema_rs
import ollama
import openai
import pytest

from openhydra.testing.processes import NodeProcess

MODEL = "tiny-llama-8l"
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
FINITE_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["alpha", "beta", 3, None]},
        "n": {"type": "integer"},
        "empty": {"type": "null"},
    },
    "required": ["ok", "kind", "n"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}},
                   "required": ["unit", "days"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(tiny_node) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check_entry(entry, top_n: int, greedy: bool) -> None:
    assert entry.bytes == list(entry.token.encode("utf-8")) or entry.token.startswith("\\x")
    assert entry.logprob <= 0.0
    assert len(entry.top_logprobs) == top_n
    lps = [t.logprob for t in entry.top_logprobs]
    assert lps == sorted(lps, reverse=True)
    assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-4
    if greedy and top_n:
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


def test_chat_logprobs_match_tokens_and_stream(client):
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    for entry in content:
        _check_entry(entry, 3, greedy=True)
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined.rstrip("\ufffd") == reply.choices[0].message.content.rstrip("\ufffd")  # a cut-off character

    stream = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_sampled_token_logprob_is_reported_when_not_top(client):
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=16, temperature=1.5, seed=7,
                                           logprobs=True, top_logprobs=0)
    content = reply.choices[0].logprobs.content
    assert len(content) == 16
    assert all(e.top_logprobs == [] and e.logprob <= 0.0 for e in content)
    assert len({round(e.logprob, 4) for e in content}) > 1  # real per-token values, not one constant


def test_completion_logprobs_shape_and_stream(client):
    reply = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=10, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(token_lp, abs=1e-5)
        assert token in top
    stream = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=10, temperature=0, logprobs=2,
                                       stream=True)
    tokens, offsets = [], []
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset


def _stops_inside(text: str, tokens: list[str]) -> list[str]:
    """Stop strings that end a greedy answer mid-way: one that starts where a token starts, and one that starts
    inside a token (that token gave content a character, so its logprob stays)."""
    starts = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    at_token = next(st for st in starts[3:] if text[st:st + 2].strip() and text.find(text[st:st + 2]) == st)
    inside = next(st + 1 for st, t in zip(starts[3:], tokens[3:], strict=True)
                  if len(t) > 1 and text.find(text[st + 1:st + 3]) == st + 1)
    return [text[at_token:at_token + 2], text[inside:inside + 2]]


def test_logprobs_spell_the_content_when_a_stop_string_ends_it(client):
    """The tokens that only spell a stop string are left out of the logprobs, as the string is out of the content:
    chat and legacy completions, streamed and not."""
    full = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=24, temperature=0, logprobs=0)
    for stop in _stops_inside(full.choices[0].text, full.choices[0].logprobs.tokens):
        cut = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=24, temperature=0, logprobs=0,
                                        stop=[stop])
        text, lp = cut.choices[0].text, cut.choices[0].logprobs
        assert cut.choices[0].finish_reason == "stop" and text == full.choices[0].text[:full.choices[0].text.find(stop)]
        assert text.startswith("".join(lp.tokens[:-1])) and "".join(lp.tokens).startswith(text), (stop, lp.tokens)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
        assert lp.tokens == full.choices[0].logprobs.tokens[:len(lp.tokens)]
        assert sum(len(t) for t in lp.tokens[:-1]) < len(text)  # the last token kept gave content a character
        chunks = list(client.completions.create(model=MODEL, prompt="The sea is", max_tokens=24, temperature=0,
                                                logprobs=0, stop=[stop], stream=True))
        assert [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens] == lp.tokens
        assert "".join(ch.text for c in chunks for ch in c.choices) == text

    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0,
                                           logprobs=True)
    tokens = [e.token for e in reply.choices[0].logprobs.content]
    for stop in _stops_inside(reply.choices[0].message.content, tokens):
        for stream in (False, True):
            kw = dict(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0, logprobs=True, stop=stop)
            if stream:
                chunks = list(client.chat.completions.create(**kw, stream=True))
                content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                kept = [e.token for c in chunks if c.choices and c.choices[0].logprobs
                        for e in c.choices[0].logprobs.content]
            else:
                cut = client.chat.completions.create(**kw)
                content, kept = cut.choices[0].message.content, [e.token for e in cut.choices[0].logprobs.content]
            assert content.startswith("".join(kept[:-1])) and "".join(kept).startswith(content), (stop, kept)
            assert kept == tokens[:len(kept)] and sum(len(t) for t in kept[:-1]) < len(content)


def test_negative_seeds_and_seeds_of_several_choices(client):
    """OpenAI's seed is an int64 (a negative one is a seed like any other); Ollama's default options send -1, its
    "random". The choices of nearby seeds are not each other's (choice 1 of seed s was choice 0 of seed s+1)."""
    kw = dict(model=MODEL, messages=PROMPT, max_tokens=12, temperature=1.0)
    negative = [client.chat.completions.create(**kw, seed=-5).choices[0].message.content for _ in range(2)]
    assert negative[0] == negative[1]
    assert client.chat.completions.create(**kw, seed=-(2**63)).choices[0].message.content
    one = [c.message.content for c in client.chat.completions.create(**kw, seed=1, n=3).choices]
    two = [c.message.content for c in client.chat.completions.create(**kw, seed=2, n=3).choices]
    assert one[0] == client.chat.completions.create(**kw, seed=1).choices[0].message.content  # choice 0: the seed
    assert not set(one) & set(two), (one, two)


def test_ollama_default_options_are_accepted(tiny_node):
    c = ollama.Client(host=tiny_node.url, timeout=120)
    # what Ollama's own DefaultOptions send, seed -1 ("random") and all
    defaults = {"num_predict": 6, "seed": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1,
                "num_ctx": 2048, "mirostat": 0, "num_gpu": -1}
    assert c.generate(model=MODEL, prompt="Once upon a time", options=defaults).done
    hot = c.generate(model=MODEL, prompt="Once upon a time", options={"num_predict": 6, "temperature": 5.0, "seed": 3})
    assert hot.eval_count == 6  # over OpenAI's bound of 2 (Ollama sets none; this node takes up to 10)
    hot_json = c.generate(model=MODEL, prompt="Once upon a time", format="json",
                          options={"num_predict": 6, "temperature": 10.0, "top_k": 260})
    assert hot_json.eval_count >= 1  # the sampler's own bound, with constrained decoding too (was a 500 at 62)
    for too_hot in (10.5, 62.0, 1e308):
        with pytest.raises(ollama.ResponseError, match="temperature") as err:
            c.generate(model=MODEL, prompt="Once upon a time", options={"num_predict": 2, "temperature": too_hot})
        assert err.value.status_code == 400
    # an assistant turn with "content": null (one that only called tools), as Ollama's own server reads it: empty
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
             {"role": "user", "content": "Go"}]
    reply = httpx.post(f"{tiny_node.url}/api/chat", timeout=120, json={
        "model": MODEL, "messages": turns, "stream": False, "options": {"num_predict": 3, "temperature": 0}})
    empty = httpx.post(f"{tiny_node.url}/api/chat", timeout=120, json={
        "model": MODEL, "messages": [{**t, "content": t["content"] or ""} for t in turns], "stream": False,
        "options": {"num_predict": 3, "temperature": 0}})
    assert reply.status_code == empty.status_code == 200, reply.text
    assert reply.json()["message"]["content"] == empty.json()["message"]["content"]


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    stream = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.text for chunk in stream for c in chunk.choices) == echoed.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_validates(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "finite", "schema": FINITE_SCHEMA}}
    texts = []
    for seed in (1, 2, 3):
        kw = dict(model=MODEL, messages=PROMPT, max_tokens=200, temperature=1.0, seed=seed, response_format=fmt)
        if stream:
            chunks = client.chat.completions.create(**kw, stream=True)
            texts.append("".join(c.delta.content or "" for chunk in chunks for c in chunk.choices))
        else:
            reply = client.chat.completions.create(**kw)
            assert reply.choices[0].finish_reason == "stop"
            texts.append(reply.choices[0].message.content)
    validator = jsonschema_rs.validator_for(FINITE_SCHEMA)
    for text in texts:
        validator.validate(json.loads(text))
    assert len(set(texts)) > 1  # sampled, not one canned answer


def test_json_schema_with_logprobs_reports_the_masked_distribution(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "finite", "schema": FINITE_SCHEMA}}
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=200, temperature=0,
                                           response_format=fmt, logprobs=True, top_logprobs=2)
    json.loads(reply.choices[0].message.content)
    for entry in reply.choices[0].logprobs.content:
        _check_entry(entry, len(entry.top_logprobs), greedy=True)
        assert 1 <= len(entry.top_logprobs) <= 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_complete_json_value_ends_the_output_under_ignore_eos(client, stream):
    # Found by the schemathesis run: once the value was complete only EOS fits, and with ignore_eos the EOS was
    # counted and asked for again without end (the request never answered and its worker spun).
    quick = client.with_options(timeout=30)
    kwargs = {"model": MODEL, "prompt": "1", "max_tokens": 8, "temperature": 0,  # " {}" first on the tiny model
              "extra_body": {"ignore_eos": True, "response_format": {"type": "json_object"}}}
    if stream:
        chunks = list(quick.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices and c.choices[0].finish_reason)
    else:
        answer = quick.completions.create(**kwargs)
        text, finish = answer.choices[0].text, answer.choices[0].finish_reason
    assert finish == "stop", (finish, text)  # this prompt's value completes within 8 tokens on the tiny model
    assert isinstance(json.loads(text), dict)


def test_unsupported_schema_keyword_is_a_400_naming_it(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=5, response_format=fmt)
    assert "'pattern'" in err.value.body["message"] and err.value.body["code"] == "unsupported_schema"


def test_requests_that_cannot_be_honoured_are_400(client):
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    cases = [
        dict(messages=image),
        dict(messages=PROMPT, tools=[WEATHER_TOOL]),  # SmolLM2's template renders no tools
        dict(messages=PROMPT, frequency_penalty=0.5),
        dict(messages=PROMPT, top_logprobs=2),  # without logprobs=True
    ]
    expected = ["image_url", "cannot express tools", "frequency_penalty", "top_logprobs"]
    for kw, needle in zip(cases, expected, strict=True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, max_tokens=4, **kw)
        assert needle in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, echo=True, logprobs=1)


def test_ollama_format_schema_and_json(tiny_node):
    c = ollama.Client(host=tiny_node.url, timeout=120)
    reply = c.chat(model=MODEL, messages=PROMPT, format=FINITE_SCHEMA, options={"temperature": 0.7, "seed": 3})
    jsonschema_rs.validator_for(FINITE_SCHEMA).validate(json.loads(reply.message.content))
    streamed = "".join(part.message.content for part in c.chat(
        model=MODEL, messages=PROMPT, format=FINITE_SCHEMA, options={"temperature": 0.7, "seed": 3}, stream=True))
    assert streamed == reply.message.content
    gen = c.generate(model=MODEL, prompt="Say hi", format=FINITE_SCHEMA, options={"temperature": 0})
    jsonschema_rs.validator_for(FINITE_SCHEMA).validate(json.loads(gen.response))
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model=MODEL, messages=PROMPT, tools=[WEATHER_TOOL])
    assert err.value.status_code == 400 and "cannot express tools" in str(err.value.error)


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions: <tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools> Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hermes_node(tiny_llama: Path, tmp_path_factory):
    """The tiny Llama with a Hermes-style chat template that renders tools."""
    folder = tmp_path_factory.mktemp("hermes") / "tiny-hermes"
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path_factory.mktemp("hermes-data")
    overrides = ["model=local", f"model.path={folder}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={data}", "api.rate_limit_requests=100000"]
    with NodeProcess(overrides, threads=1) as node:
        yield node


@pytest.mark.slow
def test_forced_tool_calls_are_parsed_and_streamed(hermes_node):
    c = openai.OpenAI(base_url=hermes_node.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    tools = [WEATHER_TOOL, TIME_TOOL]
    reply = c.chat.completions.create(model=model, messages=PROMPT, tools=tools, tool_choice="required",
                                      max_tokens=120, temperature=0.8, seed=5)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    jsonschema_rs.validator_for(spec).validate(json.loads(call.function.arguments))
    assert call.id.startswith("call_")

    named = {"type": "function", "function": {"name": "get_time"}}
    stream = c.chat.completions.create(model=model, messages=PROMPT, tools=tools, tool_choice=named,
                                       max_tokens=120, temperature=0.8, seed=5, stream=True)
    name, args, finish, ids = "", "", None, set()
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                assert tc.index == 0
                ids.add(tc.id) if tc.id else None
                name += tc.function.name or ""
                args += tc.function.arguments or ""
    assert finish == "tool_calls" and name == "get_time" and len(ids) == 1
    jsonschema_rs.validator_for(TIME_TOOL["function"]["parameters"]).validate(json.loads(args))

    o = ollama.Client(host=hermes_node.url, timeout=120)
    plain = o.chat(model=model, messages=PROMPT, tools=tools, options={"num_predict": 8, "temperature": 0})
    assert plain.message.tool_calls is None  # the random model writes text: nothing is invented as a call


@pytest.mark.slow
def test_smollm2_json_schema_and_logprob_consistency(smollm2_dir, tmp_path):
    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
        "coastal": {"type": "boolean"}, "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["city", "country", "population", "coastal"], "additionalProperties": False}
    overrides = ["model=local", f"model.path={smollm2_dir}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={tmp_path}", "api.rate_limit_requests=100000"]
    with NodeProcess(overrides, threads=1) as node:
        c = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = c.models.list().data[0].id
        messages = [{"role": "user", "content": "Describe Lisbon as JSON with city, country, population, coastal "
                                                "and languages."}]
        reply = c.chat.completions.create(
            model=model, messages=messages, max_tokens=150, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        value = json.loads(reply.choices[0].message.content)
        jsonschema_rs.validator_for(schema).validate(value)
        short = [{"role": "user", "content": "Give a JSON object with the name and age of Alice, who is 30."}]
        obj = c.chat.completions.create(model=model, messages=short, max_tokens=200, temperature=0,
                                        response_format={"type": "json_object"})
        assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
        assert isinstance(json.loads(obj.choices[0].message.content), dict)

        reply = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)
        content = reply.choices[0].logprobs.content
        assert content
        for entry in content:
            _check_entry(entry, 5, greedy=True)
