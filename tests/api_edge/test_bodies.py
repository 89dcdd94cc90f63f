"""Strict JSON at the API boundary, and the per-IP connection bookkeeping (pure parts; the real node's
behaviour is in test_hostile_corpus.py and test_connection_limits.py)."""

from __future__ import annotations

import json

import pytest

from openhydra.api.bodies import MAX_JSON_DEPTH, check_text, load_json, parse_body
from openhydra.api.connections import ConnectionGuard
from openhydra.api.errors import APIError
from openhydra.api.protocol_openai import CompletionRequest
from openhydra.api.ratelimit import TrustedProxies
from openhydra.config.schema import ApiConfig


def error(raw: bytes) -> dict:
    with pytest.raises(APIError) as exc:
        load_json(raw)
    assert exc.value.status == 400
    return exc.value.body()["error"]


@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity]", b'{"t": -Infinity}', b"1e999", b"[-1e400]",
                                 b"1" * 41, b"-" + b"9" * 5000, b"[" * 100_000 + b"]" * 100_000,
                                 b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b'"\xff"', b"",
                                 b'{"a": "\\ud800"}', b'["\\udfff"]', b'{"\\ud800": 1}'])
def test_refused_as_typed_400(raw: bytes) -> None:
    body = error(raw)
    assert body["code"] in ("invalid_json", "invalid_unicode")
    assert "sys.set_int_max_str_digits" not in body["message"]


def test_lone_surrogate_names_the_field() -> None:
    body = error(b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert body == {"message": "messages[0].content: contains a lone UTF-16 surrogate (not valid Unicode text)",
                    "type": "invalid_request_error", "param": "messages[0].content", "code": "invalid_unicode"}


def test_accepted() -> None:
    assert load_json(b'{"a": "\\ud83d\\ude00", "b": 1e308, "c": 5e-324, "d": ' + b"9" * 40 + b"}")["a"] == "\U0001f600"
    assert load_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert load_json(b'{"a": 1, "a": 2}') == {"a": 2}  # duplicate keys: the last wins
    assert parse_body(b'{"model": "m", "prompt": "x"}', CompletionRequest).prompt == "x"
    assert check_text("caf\u00e9", "model") == "caf\u00e9"
    with pytest.raises(APIError):
        check_text("\udcff", "model")


def test_error_messages_never_carry_a_lone_surrogate() -> None:
    error = APIError(404, "model '\udcff\ud800' is not served", param="\ud800")
    assert error.body()["error"]["message"] == "model '??' is not served" and error.param == "?"


def test_connection_guard_caps_per_ip_and_exempts_trusted_proxies() -> None:
    guard = ConnectionGuard(2, 5.0, TrustedProxies(["10.0.0.0/8"]))
    assert guard.admit("1.1.1.1") and guard.admit("1.1.1.1")
    assert not guard.admit("1.1.1.1") and guard.refused_total == 1
    assert guard.admit("2.2.2.2")
    guard.release("1.1.1.1")
    assert guard.admit("1.1.1.1")
    assert all(guard.admit("10.1.2.3") for _ in range(10))
    for _ in range(10):
        guard.release("10.1.2.3")
    assert dict(guard.open) == {"1.1.1.1": 2, "2.2.2.2": 1}
    for path in ("/v1/chat/completions", "/api/chat", "", "/health"):
        refusal = guard.refusal(path)
        assert refusal.startswith(b"HTTP/1.1 429 ") and b'"too_many_connections"' in refusal
        body = json.loads(refusal.split(b"\r\n\r\n", 1)[1])
        message = body["error"] if path.startswith("/api/") else body["error"]["message"]
        assert message == "too many open connections from this address (at most 2)", body
    assert "openhydra_http_connections_refused_total 1" in guard.metrics_text()
    with pytest.raises(ValueError):
        ConnectionGuard(0, 1.0)


def test_api_config_validates_trusted_proxies() -> None:
    assert ApiConfig(trusted_proxies=[" 10.0.0.0/8", "::1"]).trusted_proxies == ["10.0.0.0/8", "::1"]
    with pytest.raises(ValueError, match="not an IP network"):
        ApiConfig(trusted_proxies=["10.0.0.0/8", "proxy.example"])
    defaults = ApiConfig()
    assert defaults.body_timeout_s == 30 and defaults.max_connections_per_ip == 64
    assert defaults.probe_rate_limit_requests == 1200 and defaults.trusted_proxies == []


def test_messages_count_other_fields_not_union_members_and_print_numbers_shortly() -> None:
    """A probe read "(and 1 more problems)" for one bad field (a union's members each report it), an 80-digit
    number and Python's Decimal('...') in a 400."""
    from openhydra.api.protocol_ollama import OllamaGenerateRequest
    from openhydra.api.routes_economy import StakeBody

    def message(raw: bytes, model) -> str:
        with pytest.raises(APIError) as exc:
            parse_body(raw, model)
        return exc.value.body()["error"]["message"]

    one = message(b'{"model": "m", "keep_alive": [1]}', OllamaGenerateRequest)  # str | int | float | None: 4 errors
    assert one.startswith("keep_alive: ") and "more" not in one, one
    two = message(b'{"model": "m", "keep_alive": [1], "options": {"top_k": -1}}', OllamaGenerateRequest)
    assert two.endswith("(and 1 more field with a problem)"), two
    huge = message(b'{"amount": 1e308}', StakeBody)
    assert huge == "amount: Input should be less than or equal to 999999999.999999 (got 1e+308)", huge
