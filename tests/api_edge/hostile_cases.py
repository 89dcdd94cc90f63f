"""The hostile-request corpus: what an attacker (or a broken client) sends to a node's HTTP port.

Each :class:`Case` is the exact bytes of one request and what it must get: a given status (and error code),
or, where several answers are fine, any 2xx or typed 4xx. Never a 5xx, a dropped connection, or silence.
The requests carry the corpus node's bearer token unless the case is about auth. Generated programmatically
where a list would be long (wrong types for every field, every method on every route).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.api_edge.rawhttp import request_bytes

MODEL = "tiny-llama-8l"
TOKEN = "s3cret-token-for-hostile-corpus-0123"
MAX_TOKENS_LIMIT = 16  # the corpus node's api.max_tokens_limit (bounds every generation the corpus starts)
BODY_TIMEOUT_S = 2.0  # the corpus node's api.body_timeout_s
AUTH = {"Authorization": f"Bearer {TOKEN}"}

CHAT, COMPLETIONS, GENERATE, OLLAMA_CHAT, SHOW = (
    "/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat", "/api/show")
ECONOMY_POSTS = ("/v1/hydra/stake", "/v1/hydra/unstake", "/v1/hydra/channels/open", "/v1/hydra/channels/update",
                 "/v1/hydra/channels/close")
JSON_ROUTES = (CHAT, COMPLETIONS, GENERATE, OLLAMA_CHAT, SHOW, *ECONOMY_POSTS)
"""Every POST route of the node (the test checks this against /openapi.json)."""
GET_ROUTES = ("/health", "/readyz", "/metrics", "/v1/models", f"/v1/models/{MODEL}", "/api/tags", "/api/ps",
              "/api/version", "/v1/network/status", "/openapi.json", "/", "/dashboard/app.js",
              "/v1/dashboard/summary", "/v1/account/balance")
PROBES = ("/health", "/readyz", "/metrics")

VALID: dict[str, dict[str, Any]] = {
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    GENERATE: {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    OLLAMA_CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                  "options": {"num_predict": 2}},
    SHOW: {"model": MODEL},
}
FIELDS: dict[str, tuple[str, ...]] = {  # dotted: a field inside an object of the valid body
    CHAT: ("model", "messages", "messages.0", "messages.0.role", "messages.0.content", "max_tokens",
           "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
           "stream_options", "user", "ignore_eos", "tools", "response_format", "logprobs"),
    COMPLETIONS: ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                  "echo", "suffix"),
    GENERATE: ("model", "prompt", "system", "raw", "images", "stream", "options", "options.num_predict",
               "options.temperature", "options.top_p", "options.top_k", "options.seed", "options.stop",
               "keep_alive", "format", "template", "context"),
    OLLAMA_CHAT: ("model", "messages", "messages.0", "messages.0.role", "messages.0.content", "messages.0.images",
                  "stream", "options", "options.num_predict", "options.stop", "keep_alive", "format", "tools"),
    SHOW: ("model", "name", "verbose"),
}
WRONG_VALUES: tuple[Any, ...] = (None, True, -1, 1.5, "x", "", [], {}, ["x"], [None], {"a": 1}, 2**63, -(2**63) - 1)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: tuple[int, ...] = ()
    """Allowed statuses; empty: any 2xx or 4xx."""
    code: str | None = None
    """The error code a 4xx must carry, when it matters."""
    timeout_s: float = 30.0


def post(path: str, body: bytes | str | Any, headers: dict[str, str] | None = None, *, auth: bool = True,
         content_type: str | None = "application/json", extra: bytes = b"", content_length: int | None = None) -> bytes:
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    hdrs = {**(AUTH if auth else {}), **({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return request_bytes("POST", path, body, hdrs, extra_header_lines=extra, content_length=content_length)


def get(path: str, headers: dict[str, str] | None = None, *, auth: bool = True, method: str = "GET",
        extra: bytes = b"") -> bytes:
    return request_bytes(method, path, None, {**(AUTH if auth else {}), **(headers or {})}, extra_header_lines=extra)


def _replace(body: dict, dotted: str, value: Any) -> dict:
    body = json.loads(json.dumps(body))
    *parents, last = dotted.split(".")
    target: Any = body
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


def _raw_json(template: dict, field: str, literal: str) -> str:
    """``template`` as JSON with ``field`` set to a literal that json.dumps would not write (NaN, 1e999...)."""
    marker = "__LITERAL__"
    return json.dumps(_replace(template, field, marker)).replace(f'"{marker}"', literal)


def surrogate_cases() -> list[Case]:
    lone = "\\ud800"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "__S__"}], "max_tokens": 2}
    bodies = {
        "completions-prompt": (COMPLETIONS, {"model": MODEL, "prompt": "__S__", "max_tokens": 2}),
        "completions-prompt-list": (COMPLETIONS, {"model": MODEL, "prompt": ["a__S__b"], "max_tokens": 2}),
        "chat-content": (CHAT, chat),
        "chat-content-part": (CHAT, {"model": MODEL, "max_tokens": 2,
                                     "messages": [{"role": "user", "content": [{"type": "text", "text": "__S__"}]}]}),
        "chat-model": (CHAT, {**chat, "model": "__S__", "messages": [{"role": "user", "content": "x"}]}),
        "chat-stop": (CHAT, {**chat, "messages": [{"role": "user", "content": "x"}], "stop": ["__S__"]}),
        "chat-unknown-key": (CHAT, {**chat, "messages": [{"role": "user", "content": "x"}], "__S__": 1}),
        "generate-prompt": (GENERATE, {"model": MODEL, "prompt": "__S__", "stream": False}),
        "generate-system": (GENERATE, {"model": MODEL, "prompt": "x", "system": "__S__", "stream": False}),
        "generate-raw": (GENERATE, {"model": MODEL, "prompt": "__S__", "raw": True, "stream": False}),
        "generate-low": (GENERATE, {"model": MODEL, "prompt": "x__L__y", "stream": False}),
        "ollama-chat-content": (OLLAMA_CHAT, {"model": MODEL, "stream": False,
                                              "messages": [{"role": "user", "content": "__S__"}]}),
        "ollama-chat-stop": (OLLAMA_CHAT, {**VALID[OLLAMA_CHAT], "options": {"stop": ["__S__"], "num_predict": 2}}),
        "show-model": (SHOW, {"model": "__S__"}),
        "stake-amount": ("/v1/hydra/stake", {"amount": "__S__"}),
    }
    cases = [Case(f"surrogate-{name}", post(path, json.dumps(body).replace("__S__", lone).replace("__L__", "\\udfff")),
                  (400,), "invalid_unicode") for name, (path, body) in bodies.items()]
    # a valid pair is one character (U+1F600), not an error
    cases.append(Case("surrogate-pair-ok", post(COMPLETIONS, json.dumps(VALID[COMPLETIONS]).replace(
        '"hi"', '"\\ud83d\\ude00"')), (200,)))
    return cases


def nesting_cases() -> list[Case]:
    cases = []
    for path in JSON_ROUTES:
        name = path.strip("/").replace("/", "-")
        cases.append(Case(f"deep-array-1000-{name}", post(path, "[" * 1000 + "]" * 1000), (400,), "invalid_json"))
        cases.append(Case(f"deep-object-1000-{name}", post(path, '{"a":' * 1000 + "1" + "}" * 1000), (400,),
                          "invalid_json"))
        cases.append(Case(f"deep-array-100k-{name}", post(path, "[" * 100_000 + "]" * 100_000), (400,),
                          "invalid_json"))
    inner = "[" * 1000 + "]" * 1000
    for path in (CHAT, COMPLETIONS, GENERATE, OLLAMA_CHAT):
        body = json.dumps({**VALID[path], "extra": "__DEEP__"}).replace('"__DEEP__"', inner)
        cases.append(Case(f"deep-in-extra-field-{path.strip('/').replace('/', '-')}", post(path, body), (400,),
                          "invalid_json"))
    deep_content = json.dumps({**VALID[CHAT], "messages": "__DEEP__"}).replace('"__DEEP__"', inner)
    cases.append(Case("deep-messages", post(CHAT, deep_content), (400,), "invalid_json"))
    return cases


def auth_cases() -> list[Case]:
    values = [b"Bearer \xff\xfe", b"\xc3\xa9", b"Bearer " + TOKEN.encode() + b"\x80", b"Basic \xff",
              b"Bearer \xe9t\xe9", b"Bearer", b"Bearer  ", b"", b"Bearer " + b"A" * 8000,
              b"bearer " + TOKEN.upper().encode(),
              b"Bearer " + TOKEN.encode()[:-1] + b"\xc3\xa9"]
    cases = []
    for i, value in enumerate(values):
        line = b"Authorization: " + value + b"\r\n"
        for path in ("/v1/models", "/api/tags", "/v1/dashboard/summary", "/openapi.json"):
            cases.append(Case(f"auth-{i}-get{path.replace('/', '-')}", get(path, auth=False, extra=line), (401,),
                              "invalid_api_key"))
        for path in JSON_ROUTES:
            cases.append(Case(f"auth-{i}-post{path.replace('/', '-')}",
                              post(path, VALID.get(path, {}), auth=False, extra=line), (401,), "invalid_api_key"))
        for path in PROBES:
            cases.append(Case(f"auth-{i}-probe{path.replace('/', '-')}", get(path, auth=False, extra=line), (200,)))
    cases.append(Case("auth-none", get("/v1/models", auth=False), (401,), "invalid_api_key"))
    cases.append(Case("auth-two-headers", get("/v1/models", extra=b"Authorization: Bearer \xff\r\n"), ()))
    return cases


def encoding_cases() -> list[Case]:
    chat = json.dumps(VALID[CHAT]).encode()
    return [
        Case("utf8-invalid-byte", post(CHAT, chat.replace(b'"hi"', b'"h\xffi"')), (400,), "invalid_json"),
        Case("utf8-overlong", post(CHAT, chat.replace(b'"hi"', b'"\xc0\xaf"')), (400,), "invalid_json"),
        Case("utf8-encoded-surrogate", post(CHAT, chat.replace(b'"hi"', b'"\xed\xa0\x80"')), (400,)),
        Case("utf8-truncated", post(CHAT, chat.replace(b'"hi"', b'"\xe2\x82"')), (400,), "invalid_json"),
        Case("utf8-in-key", post(CHAT, chat.replace(b'"model"', b'"mo\xfedel"')), (400,), "invalid_json"),
        Case("utf8-bom", post(CHAT, b"\xef\xbb\xbf" + chat), ()),
        Case("utf16-body", post(CHAT, chat.decode().encode("utf-16")), ()),
        Case("latin1-body", post(COMPLETIONS, json.dumps(VALID[COMPLETIONS], ensure_ascii=False)
                                 .replace("hi", "caf\xe9").encode("latin-1")), (400,), "invalid_json"),
        Case("nul-escaped-in-content", post(CHAT, chat.replace(b'"hi"', b'"a\\u0000b"')), ()),
        Case("nul-escaped-in-model", post(CHAT, chat.replace(b'"tiny', b'"\\u0000tiny')), (404,), "model_not_found"),
        Case("nul-raw-in-body", post(CHAT, chat.replace(b'"hi"', b'"a\x00b"')), (400,), "invalid_json"),
        Case("nul-raw-after-body", post(CHAT, chat + b"\x00"), (400,), "invalid_json"),
        Case("control-chars-escaped", post(CHAT, chat.replace(b'"hi"', b'"\\u0001\\u001f\\u007f\\u2028"')), ()),
    ]


def number_cases() -> list[Case]:
    chat, gen = VALID[CHAT], VALID[GENERATE]
    cases = []
    for literal in ("NaN", "Infinity", "-Infinity", "nan", "inf", "1e999", "-1e999", "1" * 5000, "-" + "9" * 400):
        for field in ("temperature", "top_p", "max_tokens", "seed"):
            cases.append(Case(f"number-{literal[:12]}-{field}", post(CHAT, _raw_json(chat, field, literal)), (400,),
                              None if literal in ("nan", "inf") else "invalid_json"))
        cases.append(Case(f"number-{literal[:12]}-options.temperature",
                          post(GENERATE, _raw_json(gen, "options.temperature", literal)), (400,)))
    for value in ("1e308", "-0.0", "5e-324", "1e-320", "0.0000001", "2.0000000001", "1.0", "1E1", "-0", "0e0"):
        for field in ("temperature", "top_p", "max_tokens", "n", "top_k"):
            cases.append(Case(f"number-{value}-{field}", post(CHAT, _raw_json(chat, field, value)), ()))
    for value in (0, -1, -(2**63), 2**63, 10**18, MAX_TOKENS_LIMIT + 1):
        cases.append(Case(f"max_tokens-{value}", post(CHAT, {**chat, "max_tokens": value}), (400,)))
        cases.append(Case(f"max_completion_tokens-{value}", post(CHAT, {**chat, "max_completion_tokens": value}),
                          (400,)))
        cases.append(Case(f"completions-max_tokens-{value}",
                          post(COMPLETIONS, {**VALID[COMPLETIONS], "max_tokens": value}), (400,)))
    for value in (0, -1, -2, MAX_TOKENS_LIMIT, 1):
        cases.append(Case(f"num_predict-{value}", post(GENERATE, {**gen, "options": {"num_predict": value}}), (200,)))
    for value in (-3, -(2**63), 10**18, MAX_TOKENS_LIMIT + 1):
        cases.append(Case(f"num_predict-{value}", post(GENERATE, {**gen, "options": {"num_predict": value}}), (400,)))
    for amount in ("1e999", "NaN", "-1", "0", "1e-7", '"1e5"', '"NaN"', '"-1"', '"0x10"', '"1\\n"', '"1\\n\\n"',
                   "1" * 300):
        cases.append(Case(f"stake-amount-{amount[:12]}", post("/v1/hydra/stake", f'{{"amount": {amount}}}'), (400,)))
    return cases


def wrong_type_cases() -> list[Case]:
    cases = []
    for path, fields in FIELDS.items():
        for field in fields:
            for i, value in enumerate(WRONG_VALUES):
                body = _replace(VALID[path], field, value)
                cases.append(Case(f"type-{path.strip('/').replace('/', '-')}-{field}-{i}", post(path, body), ()))
    return cases


def shape_cases() -> list[Case]:
    cases = []
    for path in JSON_ROUTES:
        name = path.strip("/").replace("/", "-")
        for i, body in enumerate((b"[]", b"[{}]", b'"x"', b"1", b"null", b"true", b"{}", b"", b" ", b"\n\t",
                                  b"{", b"}", b'{"model"}', b"{'model': 1}", b"{,}", b'{"a":1,}', b"[1,]",
                                  b'{"model": "x"} {"model": "y"}', b"//\n{}", b"{} trailing")):
            expect = () if body == b"{}" and path == SHOW else (400,)
            cases.append(Case(f"shape-{name}-{i}", post(path, body), expect))
    chat = VALID[CHAT]
    for i, messages in enumerate(([["user", "hi"]], ["hi"], [None], [1], {"role": "user", "content": "hi"},
                                  [{"role": "user", "content": "hi"}] * 0, "hi", None)):
        cases.append(Case(f"shape-chat-messages-{i}", post(CHAT, {**chat, "messages": messages}), (400,)))
    for i, content in enumerate((5, True, {"text": "x"}, [1], [None], [{"type": "text", "text": 5}], [{"text": "x"}],
                                 [[{"type": "text", "text": "x"}]])):
        cases.append(Case(f"shape-chat-content-{i}",
                          post(CHAT, {**chat, "messages": [{"role": "user", "content": content}]}), (400,)))
    for i, content in enumerate(([{"type": "image_url", "image_url": {"url": "data:,"}}],
                                 [{"type": "text", "text": "a"}] * 2000, None, "")):
        cases.append(Case(f"shape-chat-content-ok-{i}",
                          post(CHAT, {**chat, "messages": [{"role": "user", "content": content}]}), ()))
    ochat = VALID[OLLAMA_CHAT]
    for i, content in enumerate((5, [], {"text": "x"}, ["x"])):
        cases.append(Case(f"shape-ollama-content-{i}",
                          post(OLLAMA_CHAT, {**ochat, "messages": [{"role": "user", "content": content}]}), (400,)))
    # null reads as empty, as Ollama's own server reads it
    cases.append(Case("shape-ollama-content-null",
                      post(OLLAMA_CHAT, {**ochat, "messages": [{"role": "user", "content": None}]}), ()))
    for i, options in enumerate(([], "x", 5, [{"num_predict": 2}])):
        cases.append(Case(f"shape-options-{i}", post(GENERATE, {**VALID[GENERATE], "options": options}), (400,)))
    for i, opts in enumerate(([], "x", 5)):
        cases.append(Case(f"shape-stream_options-{i}", post(CHAT, {**chat, "stream_options": opts}), (400,)))
    # duplicate keys: the last one wins (as in every JSON parser that does not refuse them)
    cases.append(Case("dup-model", post(CHAT, json.dumps(chat).replace('"model"', '"model": "ghost", "model"', 1)),
                      (200,)))
    cases.append(Case("dup-messages-bad-last", post(CHAT, json.dumps(chat)[:-1] + ', "messages": "x"}'), (400,)))
    cases.append(Case("dup-1000-keys", post(CHAT, json.dumps(chat)[:-1] + ', "x": 1' * 1000 + "}"), (200,)))
    return cases


def role_and_list_cases() -> list[Case]:
    chat, ochat = VALID[CHAT], VALID[OLLAMA_CHAT]
    cases = []
    for role in ("wizard", "", "USER", "System", None, 5, ["user"], "function", "user\x00"):
        cases.append(Case(f"role-openai-{role!r}", post(CHAT, {**chat, "messages": [{"role": role, "content": "x"}]}),
                          (400,)))
        cases.append(Case(f"role-ollama-{role!r}",
                          post(OLLAMA_CHAT, {**ochat, "messages": [{"role": role, "content": "x"}]}), (400,)))
    cases.append(Case("role-openai-missing", post(CHAT, {**chat, "messages": [{"content": "x"}]}), (400,)))
    cases.append(Case("role-ollama-developer", post(OLLAMA_CHAT, {**ochat, "messages": [
        {"role": "developer", "content": "x"}]}), (400,)))
    for role in ("tool", "assistant", "system", "developer"):
        cases.append(Case(f"role-openai-only-{role}", post(CHAT, {**chat, "messages": [
            {"role": role, "content": "x"}]}), ()))
    for role in ("tool", "assistant", "system"):
        cases.append(Case(f"role-ollama-only-{role}", post(OLLAMA_CHAT, {**ochat, "messages": [
            {"role": role, "content": "x"}]}), ()))
    cases.append(Case("messages-10000", post(CHAT, {**chat, "messages": [{"role": "user", "content": "x"}] * 10000}),
                      (400,), "context_length_exceeded"))
    cases.append(Case("ollama-messages-5000", post(OLLAMA_CHAT, {**ochat, "messages": [
        {"role": "user", "content": "x"}] * 5000}), (400,), "context_length_exceeded"))
    # stop lists
    cases.append(Case("stop-5000-openai", post(CHAT, {**chat, "stop": [f"s{i}" for i in range(5000)]}), (400,)))
    cases.append(Case("stop-16-long", post(CHAT, {**chat, "stop": ["x" * 10_000] * 16}), (200,)))
    cases.append(Case("stop-empty-string", post(CHAT, {**chat, "stop": [""]}), ()))
    cases.append(Case("stop-empty-list", post(CHAT, {**chat, "stop": []}), (200,)))
    cases.append(Case("stop-5000-ollama", post(GENERATE, {**VALID[GENERATE], "options": {
        "num_predict": 2, "stop": [f"s{i}" for i in range(5000)]}}), ()))
    cases.append(Case("stop-ollama-huge-string", post(GENERATE, {**VALID[GENERATE], "options": {
        "num_predict": 2, "stop": "y" * 200_000}}), ()))
    cases.append(Case("prompt-huge", post(COMPLETIONS, {**VALID[COMPLETIONS], "prompt": "word " * 150_000}), (400,)))
    cases.append(Case("n-8-stream", post(CHAT, {**chat, "n": 8, "stream": True, "max_tokens": 1}), (200,)))
    cases.append(Case("n-9", post(CHAT, {**chat, "n": 9}), (400,)))
    cases.append(Case("stream-usage", post(CHAT, {**chat, "stream": True, "stream_options": {"include_usage": True}}),
                      (200,)))
    cases.append(Case("ollama-stream", post(GENERATE, {**VALID[GENERATE], "stream": True}), (200,)))
    cases.append(Case("ollama-format-json", post(GENERATE, {**VALID[GENERATE], "format": "json"}), ()))
    cases.append(Case("ollama-format-schema-deep", post(GENERATE, json.dumps({**VALID[GENERATE], "format": "__D__"})
                                                        .replace('"__D__"', '{"a":' * 500 + "1" + "}" * 500)),
                      (400,), "invalid_json"))
    cases.append(Case("ollama-images-junk", post(GENERATE, {**VALID[GENERATE], "images": ["%%%"]}), (400,)))
    cases.append(Case("ollama-empty-prompt", post(GENERATE, {"model": MODEL, "stream": False}), (200,)))
    return cases


def traversal_cases() -> list[Case]:
    names = ["../../../../etc/passwd", "..\\..\\..\\windows\\win.ini", "/etc/passwd", f"{MODEL}/../../../etc/passwd",
             "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "file:///etc/passwd", f"{MODEL}:../../x", "~/.ssh/id_rsa",
             "/proc/self/environ", "....//....//etc/passwd", "\u0000", "a" * 100_000, "*", ".", ".."]
    cases = []
    for i, name in enumerate(names):
        cases.append(Case(f"show-traversal-{i}", post(SHOW, {"model": name}), (404, 400)))
        cases.append(Case(f"show-traversal-name-{i}", post(SHOW, {"name": name}), (404, 400)))
        cases.append(Case(f"chat-model-traversal-{i}", post(CHAT, {**VALID[CHAT], "model": name}), (404, 400)))
    for i, path in enumerate(("/v1/models/..%2F..%2F..%2Fetc%2Fpasswd", "/v1/models/../../../etc/passwd",
                              "/v1/models/%2e%2e/%2e%2e/etc/passwd", "/dashboard/..%2F..%2F..%2Fpyproject.toml",
                              "/dashboard/../../../etc/passwd", "/dashboard/%2e%2e%2fapp.py", "//etc/passwd",
                              "/../../../../etc/passwd", "/dashboard/app.js%00.html", "/v1/models/%00",
                              "/v1/models/%ff%fe", "/v1/models/%ED%A0%80", "/dashboard/%ED%A0%80",
                              "/dashboard/..", "/dashboard/", "/v1/models/" + "a/" * 2000)):
        cases.append(Case(f"path-traversal-{i}", get(path), (404, 400, 413, 414)))
    return cases


def method_cases() -> list[Case]:
    cases = []
    for path in (*JSON_ROUTES, *GET_ROUTES, "/nowhere"):
        for method in ("HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "FOO", "get", "POST" if path in GET_ROUTES
                       else "GET"):
            cases.append(Case(f"method-{method}-{path}", get(path, method=method), ()))
    cases.append(Case("method-CONNECT", b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n", ()))
    return cases


def protocol_cases() -> list[Case]:
    chat = json.dumps(VALID[CHAT]).encode()
    big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chat), chat)
    te = {"Transfer-Encoding": "chunked"}
    return [
        Case("header-huge", get("/health", extra=big), (431,)),
        Case("header-many", get("/health", extra=many), (431,)),
        Case("header-no-colon", get("/health", extra=b"NoColonHere\r\n"), (400,)),
        Case("header-space-before-colon", get("/health", extra=b"X-A : b\r\n"), ()),
        Case("header-obs-fold", get("/health", extra=b"X-A: b\r\n  folded\r\n"), ()),
        Case("header-nul", get("/health", extra=b"X-A: a\x00b\r\n"), ()),
        Case("header-nul-name", get("/health", extra=b"X-\x00: a\r\n"), ()),
        Case("header-bytes", get("/v1/models", extra=b"X-\xff: \xfe\r\n"), ()),
        Case("header-bare-lf", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n", ()),
        Case("request-line-nul", b"GET /hea\x00lth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ()),
        Case("request-line-bytes", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ()),
        Case("request-line-garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100 + b"\r\n\r\n", ()),
        Case("request-line-no-version", b"GET /health\r\n\r\n", ()),
        Case("request-line-http2", b"GET /health HTTP/2.0\r\nHost: x\r\nConnection: close\r\n\r\n", ()),
        Case("request-line-http10", b"GET /health HTTP/1.0\r\n\r\n", (200,)),
        Case("request-line-absolute",
             b"GET http://evil.example/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ()),
        Case("request-line-star", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ()),
        Case("url-huge", get("/health?" + "a" * 20_000), (431,)),  # the request line is part of the head
        Case("query-junk", get("/v1/models?%zz=%&&=&a[]=1&" + "b=%ff" * 50), ()),
        Case("no-host", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n", ()),
        Case("cl-negative", post(CHAT, chat, content_length=-1), (400,)),
        Case("cl-text", post(CHAT, chat, extra=b"Content-Length: abc\r\n", content_length=None), ()),
        Case("cl-huge", post(CHAT, b"", content_length=10**20), (413, 400)),
        Case("cl-over-limit", post(CHAT, b"", content_length=(1 << 20) + 1), (413,)),
        Case("cl-two-values", post(CHAT, chat, extra=b"Content-Length: 5\r\n"), (400,)),
        Case("cl-and-te", post(CHAT, chunked, headers=te, content_length=len(chunked)), (400,)),
        Case("te-chunked-ok", post(CHAT, chunked, headers=te, content_length=None).replace(
            b"Content-Length: %d\r\n" % len(chunked), b""), (200,)),
        Case("te-bad-size", request_bytes("POST", CHAT, None, {**AUTH, **te}) + b"zz\r\n{}\r\n0\r\n\r\n", (400,)),
        Case("te-negative", request_bytes("POST", CHAT, None, {**AUTH, **te}) + b"-5\r\n{}\r\n0\r\n\r\n", (400,)),
        Case("te-huge-chunk", request_bytes("POST", CHAT, None, {**AUTH, **te}) + b"fffffffffffffff\r\n{}\r\n",
             (413, 400)),
        Case("te-gzip", post(CHAT, chat, headers={"Transfer-Encoding": "gzip"}), ()),
        Case("expect-continue", post(CHAT, chat, headers={"Expect": "100-continue"}), (200,)),
        Case("content-type-text", post(CHAT, chat, content_type="text/plain"), ()),
        Case("content-type-none", post(CHAT, chat, content_type=None), ()),
        Case("content-type-form", post(CHAT, b"model=x&messages=y", content_type="application/x-www-form-urlencoded"),
             (400,)),
        Case("content-type-multipart",
             post(CHAT, b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--',
                  content_type="multipart/form-data; boundary=b"), (400,)),
        Case("content-type-bad-charset", post(CHAT, chat, content_type="application/json; charset=ebcdic"), ()),
        Case("content-encoding-gzip", post(CHAT, chat, headers={"Content-Encoding": "gzip"}), ()),
        Case("slow-body", post(CHAT, b"0123456789", content_length=1000), (408,), timeout_s=BODY_TIMEOUT_S + 15),
        Case("xff-junk", get("/v1/models", headers={"X-Forwarded-For": "not-an-ip, \xff, 1.2.3.4:5, [::1]:8"}), (200,)),
        Case("get-with-body", request_bytes("GET", "/v1/models", b"{}" * 100, AUTH), (200,)),
    ]


def all_cases() -> list[Case]:
    cases = [*surrogate_cases(), *nesting_cases(), *auth_cases(), *encoding_cases(), *number_cases(),
             *wrong_type_cases(), *shape_cases(), *role_and_list_cases(), *traversal_cases(), *method_cases(),
             *protocol_cases()]
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"duplicate case names: {sorted(duplicates)[:5]}")
    return cases
