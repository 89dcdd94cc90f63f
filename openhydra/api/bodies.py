"""Turning request bodies into protocol models, with 400s that name the offending field.

The JSON accepted is RFC 8259's, read strictly: no ``NaN``/``Infinity`` literals (Python's ``json`` takes
them), no number that overflows a float or has more digits than any field could use, no nesting deeper
than :data:`MAX_JSON_DEPTH` (deep nesting otherwise surfaces as a ``RecursionError`` somewhere downstream),
and no string holding a lone UTF-16 surrogate (``"\\ud800"`` is legal JSON but no Unicode text: tokenizers and
encoders fail on it). Each is a 400 ``invalid_json`` / ``invalid_unicode`` naming the field where it can.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from openhydra.api.errors import bad_request

T = TypeVar("T", bound=BaseModel)

MAX_JSON_DEPTH = 64
"""Objects/arrays inside each other. OpenAI bodies need ~6 (tool schemas a few more)."""
MAX_INT_DIGITS = 40
"""Longer integer literals are refused before Python converts them (no field needs more than 2**64)."""


class _StrictJSONError(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _StrictJSONError(f"{name} is not a valid JSON value (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _StrictJSONError(f"number {text[:40]} is out of range for a 64-bit float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _StrictJSONError(f"integer with {len(text.lstrip('-'))} digits is too large (at most {MAX_INT_DIGITS})")
    return int(text)


def field_path(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _input_loc(data: Any, loc: tuple, *, missing: bool) -> tuple:
    """The part of a pydantic error location that exists in the request body: ``('prompt', 'str')`` (a union
    member's tag) -> ``('prompt',)``; a missing field's own name is kept."""
    out: list = []
    node = data
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif missing and i == len(loc) - 1 and isinstance(node, dict) and isinstance(part, str):
            pass  # a required field the body lacks
        else:
            continue  # a union tag ('str', 'list[str]', 'function-after[...]'): not in the body
        out.append(part)
    return tuple(out)


def has_lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(text: str, param: str | None) -> str:
    """``text`` itself, or a 400 if it holds a lone surrogate (for text that did not come through
    :func:`parse_body`, e.g. a path segment)."""
    if has_lone_surrogate(text):
        raise bad_request(f"{param or 'text'}: contains a lone UTF-16 surrogate (not valid Unicode text)",
                          param=param, code="invalid_unicode")
    return text


def check_structure(data: Any) -> None:
    """Depth and lone-surrogate checks over decoded JSON, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, loc, depth = stack.pop()
        if isinstance(value, str):
            if has_lone_surrogate(value):
                path = field_path(loc)
                raise bad_request(f"{path or 'body'}: contains a lone UTF-16 surrogate (not valid Unicode text)",
                                  param=path or None, code="invalid_unicode")
            continue
        if isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                path = field_path(loc)
                raise bad_request(f"request body is nested deeper than {MAX_JSON_DEPTH} levels",
                                  param=path or None, code="invalid_json")
            if isinstance(value, dict):
                for key, item in value.items():
                    if has_lone_surrogate(key):
                        raise bad_request("a key contains a lone UTF-16 surrogate (not valid Unicode text)",
                                          param=field_path(loc) or None, code="invalid_unicode")
                    stack.append((item, (*loc, key), depth + 1))
            else:
                stack.extend((item, (*loc, i), depth + 1) for i, item in enumerate(value))


def load_json(raw: bytes | None) -> Any:
    """Strict JSON (see the module docstring) or a 400 ``invalid_json``."""
    if not raw:
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise bad_request(f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, the hooks above
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    check_structure(data)
    return data


def _shown(given: Any) -> str:
    if isinstance(given, dict):
        return "an object"
    if isinstance(given, int | float | Decimal) and not isinstance(given, bool) and len(str(given)) > 20:
        return f"{given:.6g}"  # 1e308, not its 309 digits
    try:
        return json.dumps(given)[:80]
    except (TypeError, ValueError, RecursionError):
        return type(given).__name__


_DECIMAL_REPR = re.compile(r"Decimal\('([^']*)'\)")


def parse_body(raw: bytes | None, model: type[T]) -> T:
    data = load_json(raw)
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # the most telling problem: a broken constraint over a plain type mismatch (of a union's other member),
        # then the deepest ("messages[0].content[0].text" over "messages[0].content")
        constraints = [e for e in errors if not e["type"].endswith("_type")]
        first = max(constraints or errors, key=lambda e: len(e["loc"]))

        def path_of(error: dict) -> str:
            path = field_path(_input_loc(data, error["loc"], missing=error["type"] == "missing"))
            return path or (error.get("ctx") or {}).get("api_param", "")  # a model validator may name its field

        path = path_of(first)
        # other fields with a problem (a union's members each report one for the same field: counted once)
        others = {path_of(e) for e in errors} - {path}
        more = f" (and {len(others)} more field{'s' if len(others) > 1 else ''} with a problem)" if others else ""
        got = "" if first["type"] == "missing" else f" (got {_shown(first.get('input'))})"  # input: the parent
        shown_msg = _DECIMAL_REPR.sub(r"\1", first["msg"])  # "<= Decimal('9.5')" -> "<= 9.5"
        message = f"{path}: {shown_msg}{got}{more}" if path else f"{shown_msg}{more}"
        code = (first.get("ctx") or {}).get("api_code", "invalid_value")  # a validator may name its error code
        raise bad_request(message, param=path or None, code=code) from None



def parse_query(request: Any, model: type[T]) -> T:
    """The query string of a Sanic ``request`` as ``model`` (one value per name; an empty value is a value, not an
    absent one); a 400 naming the parameter otherwise."""
    args = request.get_args(keep_blank_values=True)
    data = {name: args.get(name) for name in model.model_fields if name in args}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else None
        raise bad_request(f"{name}: {first['msg']}" if name else first["msg"], param=name) from None
