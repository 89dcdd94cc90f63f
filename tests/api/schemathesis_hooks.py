"""schemathesis hooks for tests/api/test_schemathesis.py, loaded by the CLI through SCHEMATHESIS_HOOKS.

- NDJSON answers (Ollama streams) are read as the array of their lines, which is how the node's document
  describes them (api/openapi.py), so ``response_schema_conformance`` checks every line.
- About half the generated requests that name a model name the served one (OPENHYDRA_FUZZ_MODEL), so the
  fuzzer reaches generation and not only the 404 for an unknown model. Only a ``model`` that already is a
  valid name (a non-empty string) is swapped, so a case stays as valid or invalid as it was generated.
- One more check: an error body never shows a traceback or a server file path.
- Positive cases whose structured-output schema (Ollama ``format``, OpenAI
  ``response_format.json_schema.schema``) no JSON value satisfies are not sent. The document's meta-schema
  (api/protocol_features.SchemaSubset) cannot say "minItems <= maxItems" or "a required name is a property
  when additionalProperties is false" (JSON Schema compares no two values of an instance), so such a schema
  is valid by the document, and the node refuses it with a 400 ``unsupported_schema`` (there is nothing to
  generate). The filter asks the node's own compiler (router/schema_subset.compile_schema) which schemas
  those are, and drops only them; negative cases keep them (they are refused either way).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import schemathesis
from schemathesis import GenerationMode

from openhydra.router.schema_subset import UnsatisfiableSchema, UnsupportedSchema, compile_schema

SERVED = os.environ.get("OPENHYDRA_FUZZ_MODEL", "")


@schemathesis.deserializer("application/x-ndjson")
def ndjson_lines(ctx: Any, response: Any) -> list[Any]:
    return [json.loads(line) for line in response.content.decode("utf-8").splitlines() if line.strip()]


def _aim(value: Any) -> bool:
    """A deterministic coin flip per generated value, so a rerun with the same seed sends the same requests."""
    return zlib.crc32(repr(value).encode("utf-8", "replace")) % 2 == 0


def _output_schemas(body: Any) -> list[Any]:
    if not isinstance(body, dict):
        return []
    found = [body["format"]] if isinstance(body.get("format"), dict) else []
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        found.append(spec["schema"])
    return found


def unsatisfiable(schema: Any) -> bool:
    """Whether the node refuses ``schema`` because no JSON value satisfies it."""
    try:
        compile_schema(schema)
    except UnsatisfiableSchema:
        return True
    except UnsupportedSchema:
        return False  # outside the meta-schema: not a positive case's schema anyway
    return False


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    meta = getattr(case, "meta", None)
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return True
    return not any(unsatisfiable(schema) for schema in _output_schemas(case.body))


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
        error = response.json()["error"]
        message = str(error if isinstance(error, str) else error["message"])  # Ollama's shape, or OpenAI's
    except (ValueError, KeyError, TypeError):
        return None  # the document's error schema is checked by response_schema_conformance
    if "Traceback" in message or ".py\"" in message or ".py:" in message:
        raise AssertionError(f"error message leaks server internals: {message[:200]!r}")
    return None
