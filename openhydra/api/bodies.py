"""Turning request bodies into protocol models, with 400s that name the offending field."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from openhydra.api.errors import bad_request

T = TypeVar("T", bound=BaseModel)


def field_path(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_body(raw: bytes | None, model: type[T]) -> T:
    if not raw:
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        path = field_path(tuple(p for p in first["loc"] if not str(p).startswith("function-")))
        given = first.get("input")
        shown = json.dumps(given)[:80] if not isinstance(given, dict) else "an object"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        message = f"{path}: {first['msg']} (got {shown}){more}" if path else f"{first['msg']}{more}"
        raise bad_request(message, param=path or None) from None
