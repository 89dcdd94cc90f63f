"""schemathesis hooks for tests/api/test_schemathesis.py, loaded by the CLI through SCHEMATHESIS_HOOKS.

- NDJSON answers (Ollama streams) are read as the array of their lines, which is how the node's document
  describes them (api/openapi.py), so ``response_schema_conformance`` checks every line.
- About half the generated requests that name a model name the served one (OPENHYDRA_FUZZ_MODEL), so the
  fuzzer reaches generation and not only the 404 for an unknown model. Only a ``model`` that already is a
  valid name (a non-empty string) is swapped, so a case stays as valid or invalid as it was generated.
- One more check: an error body never shows a traceback or a server file path.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import schemathesis

SERVED = os.environ.get("OPENHYDRA_FUZZ_MODEL", "")


@schemathesis.deserializer("application/x-ndjson")
def ndjson_lines(ctx: Any, response: Any) -> list[Any]:
    return [json.loads(line) for line in response.content.decode("utf-8").splitlines() if line.strip()]


def _aim(value: Any) -> bool:
    """A deterministic coin flip per generated value, so a rerun with the same seed sends the same requests."""
    return zlib.crc32(repr(value).encode("utf-8", "replace")) % 2 == 0


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if not SERVED:
        return case
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] and _aim(body):
        body["model"] = SERVED
    params = case.path_parameters
    if params and isinstance(params.get("model_id"), str) and params["model_id"] and _aim(params):
        params["model_id"] = SERVED
    return case


@schemathesis.check
def error_body_is_clean(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 400:
        return None
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None  # the document's error schema is checked by response_schema_conformance
    if "Traceback" in message or ".py\"" in message or ".py:" in message:
        raise AssertionError(f"error message leaks server internals: {message[:200]!r}")
    return None
