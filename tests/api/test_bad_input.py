"""Bad input gets a clear JSON error with the right status, never a 5xx, and the node stays up."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

MODEL = "tiny-llama-8l"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def http(tiny_node):
    with httpx.Client(base_url=tiny_node.url, timeout=30) as client:
        yield client


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def ollama_error_of(response: httpx.Response) -> str:
    """Ollama's shape, which its Go and Python clients parse: {"error": "<message>"}, our type/param/code beside."""
    body = response.json()
    assert set(body) == {"error", "type", "param", "code"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (CHAT, b"{not json", 400, None),
        (CHAT, b"[1, 2, 3]", 400, None),
        (CHAT, b'["a", "b"]', 400, None),
        (CHAT, b"", 400, None),
        (CHAT, json.dumps({"model": MODEL}).encode(), 400, "messages"),
        (CHAT, json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "messages[0].role"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(),
         400, "max_tokens"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
         .encode(), 400, "temperature"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9})
         .encode(), 400, "max_tokens"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), 400,
         "n"),
        (CHAT, json.dumps({"model": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt"),
        ("/api/generate", json.dumps({"model": MODEL, "prompt": "x", "options": {"num_predict": -7}}).encode(), 400,
         "options.num_predict"),
        ("/api/chat", json.dumps({"model": MODEL, "messages": [{"role": "user"}], "options": []}).encode(), 400,
         "options"),
        (CHAT, json.dumps({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
        ("/api/chat", json.dumps({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
         "model"),
    ],
)
def test_bad_requests_get_typed_errors(http, path, body, status, param):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if path.startswith("/api/"):
        message = ollama_error_of(response)
        assert response.json()["param"] == param
    else:
        error = error_of(response)
        assert error["param"] == param
        message = error["message"]
    assert "Traceback" not in message and "/work" not in message


def test_body_over_limit_is_413(http):
    response = http.post(CHAT, content=b"x" * (2 << 20))
    assert response.status_code == 413
    error_of(response)


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    error_of(http.get("/v1/nothing"))
    response = http.get(CHAT)
    assert response.status_code == 405
    error_of(response)


def test_context_overflow_is_400(http):
    long_text = "word " * 5000
    response = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded"


def test_health_readyz_metrics(http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert http.get("/readyz").status_code == 200
    http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("openhydra_http_requests_total", "openhydra_http_request_duration_seconds_bucket",
                 "openhydra_tokens_generated_total", "openhydra_time_to_first_token_seconds_bucket"):
        assert name in text
    assert 'status="400"' in text  # the bad requests above were counted, not crashed on


def _active_sessions(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("openhydra_active_sessions "):
            return float(line.split()[1])
    raise AssertionError("no openhydra_active_sessions metric")


def test_client_disconnect_mid_stream_frees_the_session(tiny_node, http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=tiny_node.url, timeout=30) as own, own.stream("POST", CHAT, json=body) as stream:
        lines = stream.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert _active_sessions(http) == 1
    deadline = time.monotonic() + 10
    while _active_sessions(http) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _active_sessions(http) == 0
    assert "openhydra_client_disconnects_total" in http.get("/metrics").text
    assert http.get("/health").status_code == 200


def test_concurrent_requests_do_not_cross_streams(tiny_node, http):
    prompts = [f"Write about topic number {i}." for i in range(6)]

    def ask(prompt: str, stream: bool) -> str:
        # seeded sampling: each request has its own deterministic, distinct output
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                "temperature": 1.0, "seed": len(prompt) + ord(prompt[-2]), "stream": stream}
        with httpx.Client(base_url=tiny_node.url, timeout=60) as c:
            if not stream:
                return c.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
            text = ""
            with c.stream("POST", CHAT, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        for choice in json.loads(line[6:])["choices"]:
                            text += choice["delta"].get("content") or ""
            return text

    sequential = [ask(p, False) for p in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i], i % 2 == 0)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == sequential
    assert len(set(sequential)) == len(prompts)


def test_rate_limit_headers_on_every_response(http):
    # probes and the dashboard's poll count against their own budget (api.probe_rate_limit_requests, default 1200),
    # the API against its own
    for path, limit in (("/health", "1200"), ("/v1/dashboard/summary", "1200"), ("/v1/models", "100000"),
                        ("/v1/nothing", "100000")):
        response = http.get(path)
        assert response.headers["X-RateLimit-Limit"] == limit
        assert int(response.headers["X-RateLimit-Remaining"]) >= 0
        assert int(response.headers["X-RateLimit-Reset"]) > 1_700_000_000  # epoch seconds


# ---- what an audit of the API with a user's mistakes found (2026-12-06) -------------------------------------------

USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"modalities": 5}, "modalities", "invalid_value"),  # was a 500: iterated as a list
    ({"modalities": True}, "modalities", "invalid_value"),
    ({"modalities": "text"}, "modalities", "invalid_value"),  # was "text only", read letter by letter
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions", "unsupported_parameter"),
    ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
    ({"min_p": 0.1}, "min_p", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "invalid_value"),
])
def test_chat_fields_a_node_cannot_honour_are_refused_by_name(http, fields, param, code):
    response = http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code), error


def test_neutral_values_of_unsupported_knobs_are_accepted(http):
    fields = {"modalities": ["text"], "presence_penalty": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    response = http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2, **fields})
    assert response.status_code == 200, response.text


def test_a_too_long_prompt_names_the_field_that_holds_it(http):
    long_text = "word " * 5000
    completion = http.post("/v1/completions", json={"model": MODEL, "prompt": long_text, "max_tokens": 2})
    assert completion.status_code == 400
    assert (error_of(completion)["param"], error_of(completion)["code"]) == ("prompt", "context_length_exceeded")
    chat = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
    assert error_of(chat)["param"] == "messages"
    generate = http.post("/api/generate", json={"model": MODEL, "prompt": long_text, "stream": False})
    assert generate.status_code == 400 and "context length" in ollama_error_of(generate)


def test_messages_name_the_problem(http):
    missing = error_of(http.post(CHAT, json={"messages": USER}))
    assert missing["param"] == "model" and missing["message"] == "model: Field required", missing
    ids = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]}))
    assert ids["code"] == "unsupported_parameter" and "token-id prompts are not supported" in ids["message"]
    show = http.post("/api/show", json={})
    assert show.status_code == 400 and ollama_error_of(show) == "model: Field required"
    images = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "images": ["aGk="], "stream": False})
    assert images.status_code == 400 and ollama_error_of(images) == "this model takes no images"


@pytest.mark.parametrize(("fields", "needle"), [
    ({"options": {"presence_penalty": 1.5}}, "options.presence_penalty"),
    ({"options": {"frequency_penalty": 0.5}}, "options.frequency_penalty"),
    ({"options": {"repeat_penalty": 1.3}}, "options.repeat_penalty"),
    ({"options": {"presence_penalty": True}}, "options.presence_penalty"),
    ({"options": {"mirostat": 2}}, "options.mirostat"),
    ({"options": {"min_p": 0.05}}, "options.min_p"),
    ({"options": {"num_ctx": "big"}}, "options.num_ctx"),
    ({"suffix": "end"}, "suffix"),
    ({"template": "{{ .Prompt }}"}, "template"),
    ({"context": [1, 2, 3]}, "context"),
    ({"think": True}, "think"),
    ({"think": "yes"}, "think"),
])
def test_ollama_options_a_node_cannot_honour_are_refused(http, fields, needle):
    for path, body in (("/api/generate", {"prompt": "x"}), ("/api/chat", {"messages": USER})):
        if path == "/api/chat" and needle in ("suffix", "context"):
            continue
        response = http.post(path, json={"model": MODEL, "stream": False, **body, **fields})
        assert response.status_code == 400, (path, response.text)
        assert needle.split(".")[-1] in ollama_error_of(response)


def test_ollama_options_that_change_no_output_are_accepted(http):
    # num_ctx past the context: Ollama clamps it, clients send 32768 by habit; repeat_penalty 1.1: Ollama's default
    options = {"num_predict": 2, "num_thread": 1, "num_ctx": 999_999, "use_mmap": True, "repeat_penalty": 1.1}
    response = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False, "think": False,
                                                "options": options})
    assert response.status_code == 200, response.text


def test_ollama_errors_have_ollamas_shape_for_its_client(tiny_node):
    import ollama

    client = ollama.Client(host=tiny_node.url)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="ghost", messages=USER)
    assert caught.value.status_code == 404
    assert isinstance(caught.value.error, str) and "ghost" in caught.value.error


@pytest.mark.parametrize("path", ["/", "/health", "/readyz", "/v1/models", "/api/tags", "/api/version"])
def test_head_answers_every_get_route_without_a_body(http, path):
    got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_method_not_allowed_lists_head_with_get(http):
    response = http.delete("/v1/models")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "HEAD"}


def _metric(http, name: str, **labels: str) -> float:
    """A labelled counter's value in /metrics (0 before its first increment)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    return 0.0


def test_a_client_gone_before_the_answer_is_a_disconnect_not_a_500(tiny_node, http):
    import socket

    route = "v1/completions"
    before = (_metric(http, "openhydra_http_requests_total", route=route, status="500"),
              _metric(http, "openhydra_client_disconnects_total", route=route))
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": 2000, "temperature": 0}).encode()
    host, port = tiny_node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10  # wait until the generation runs, then go away
        while _active_sessions(http) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _active_sessions(http) == 1
    deadline = time.monotonic() + 10
    while _metric(http, "openhydra_client_disconnects_total", route=route) == before[1]:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    assert _metric(http, "openhydra_http_requests_total", route=route, status="500") == before[0]
    assert _metric(http, "openhydra_http_requests_total", route=route, status="499") >= 1
    deadline = time.monotonic() + 10
    while _active_sessions(http) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _active_sessions(http) == 0


def test_think_false_reaches_the_chat_template(tiny_llama):
    """Ollama's ``think: false`` is honoured, not ignored: templates that can think read ``enable_thinking``."""
    from transformers import AutoTokenizer

    from openhydra.api.protocol_ollama import OllamaChatRequest
    from openhydra.api.routes_ollama import template_variables
    from openhydra.router.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %} no-think{% endif %}")
    engine = Engine(tokenizer, None, eos_token_ids=set(), context_length=4096)  # only its prompt rendering
    asks = {think: OllamaChatRequest.model_validate({"model": MODEL, "messages": USER,
                                                     **({} if think is None else {"think": think})})
            for think in (None, False)}
    plain = tokenizer.decode(engine.chat_prompt_ids(USER, **template_variables(asks[None])))
    no_think = tokenizer.decode(engine.chat_prompt_ids(USER, **template_variables(asks[False])))
    assert (plain, no_think) == ("x", "x no-think")


def test_a_complete_constrained_value_under_ignore_eos_reports_its_eos_logprob(http):
    """Found by schemathesis (2026-12-06): logprobs + a constraint + ignore_eos was a 500 once the value was complete
    (the forced EOS was counted as a token but reported with no logprob of its own)."""
    schema = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {"type": "boolean"}}}
    response = http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 8, "ignore_eos": True,
                                     "logprobs": True, "top_logprobs": 2, "response_format": schema})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"].strip() in ("true", "false")
    entries = choice["logprobs"]["content"]
    assert len(entries) == response.json()["usage"]["completion_tokens"] and entries[-1]["logprob"] == 0.0


def test_null_reads_as_the_default_as_openai_and_ollama_read_it(http):
    """Clients and proxies send unset fields as JSON null; OpenAI's and Ollama's servers read them as left out. A
    probe found n, stream and logprobs refused with 400 for null (stream: null must not stream, n: null is one
    choice)."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    nulls = {"n": None, "stream": None, "logprobs": None, "ignore_eos": None, "stream_options": {"include_usage": None}}
    given = http.post(CHAT, json={**base, **nulls})
    plain = http.post(CHAT, json=base)
    assert given.status_code == 200 and given.headers["content-type"].startswith("application/json"), given.text
    assert len(given.json()["choices"]) == 1 and given.json()["choices"][0].get("logprobs") is None
    assert given.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    done = http.post("/v1/completions", json={**completion, "echo": None, "n": None, "stream": None})
    assert done.status_code == 200, done.text  # echo null: the prompt is not echoed
    plain_text = http.post("/v1/completions", json=completion).json()["choices"][0]["text"]
    assert done.json()["choices"][0]["text"] == plain_text
    # Ollama: stream null is Ollama's default (a stream of NDJSON lines); raw null is false (the template applies)
    streamed = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": None, "raw": None,
                                                "options": {"num_predict": 2, "temperature": 0}})
    lines = [json.loads(line) for line in streamed.text.splitlines() if line.strip()]
    assert streamed.status_code == 200 and len(lines) >= 2 and lines[-1]["done"] is True, streamed.text
    assert http.post(CHAT, json={**base, "n": 0}).status_code == 400  # a value still has to be valid


def test_a_length_past_the_context_names_the_field_the_client_sent(http):
    """OpenAI's routes name max_tokens, Ollama's options.num_predict (a probe: an Ollama user was told about a
    max_tokens it never sent)."""
    context = next(m["openhydra"]["context_length"] for m in http.get("/v1/models").json()["data"] if m["id"] == MODEL)
    too_many = min(context, 8192)  # api.max_tokens_limit's default: a larger one is refused by that limit instead
    chat = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": too_many})
    assert (error_of(chat)["param"], error_of(chat)["code"]) == ("max_tokens", "context_length_exceeded")
    assert f"+ max_tokens ({too_many}) exceeds" in error_of(chat)["message"]
    for path, body in (("/api/generate", {"prompt": "hi"}), ("/api/chat", {"messages": [{"role": "user",
                                                                                          "content": "hi"}]})):
        answer = http.post(path, json={"model": MODEL, **body, "stream": False, "options": {"num_predict": too_many}})
        assert answer.status_code == 400 and answer.json()["param"] == "options.num_predict", answer.text
        assert f"+ options.num_predict ({too_many}) exceeds" in ollama_error_of(answer)


def test_ollamas_keep_alive_is_a_duration_as_ollama_reads_it(http):
    """Numbers (seconds) and Go durations are taken; anything else is a 400 naming the field, as Ollama answers
    (a probe: "banana" was taken)."""
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    for keep_alive in ("5m", "1h30m", "0", "0s", "-1", "-1h", "300ms", 0, -1, 2.5):
        answer = http.post("/api/generate", json={**body, "keep_alive": keep_alive})
        assert answer.status_code == 200, (keep_alive, answer.text)
    for keep_alive in ("banana", "", "5 m", "1x", "ms"):
        answer = http.post("/api/generate", json={**body, "keep_alive": keep_alive})
        assert answer.status_code == 400 and answer.json()["param"] == "keep_alive", (keep_alive, answer.text)
        assert "a duration such as" in ollama_error_of(answer)
