"""Base classes for request models: JSON's types, read the way JSON Schema reads them.

pydantic's default (lax) mode coerces ``"4"`` and ``true`` into an int and ``0`` into a bool, which
OpenAI's schema (and ours, served at /openapi.json) says are invalid. Strict mode refuses them, but
also refuses ``4.0`` for an integer, which JSON Schema counts as one (an integer is a number with no
fractional part, whatever its spelling). So: strict, after turning integral floats into ints.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


def integral_floats_as_ints(value: Any) -> Any:
    """``4.0`` -> ``4`` anywhere inside decoded JSON; every other value as it is."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {key: integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_floats_as_ints(item) for item in value]
    return value


class JsonModel(BaseModel):
    """Strict JSON types: no ``"4"`` or ``true`` for an integer, no ``0`` for a boolean, ``4.0`` is ``4``."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data: Any) -> Any:
        return integral_floats_as_ints(data) if isinstance(data, dict) else data


class Tolerant(JsonModel):
    """An inbound protocol model: strict types, unknown fields kept (clients send new ones)."""

    model_config = ConfigDict(extra="allow")


def null_is_default(*fields: str) -> Any:
    """A field validator for ``fields`` (typed ``X | None``, with a default): JSON ``null`` reads as if the field
    were left out, as OpenAI's and Ollama's servers read it (clients and proxies send unset fields as null). The
    document says null is allowed (the ``| None``), and the route sees the default, never None."""

    def _default_for_null(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    return field_validator(*fields, mode="after")(classmethod(_default_for_null))


def matching(pattern: str, code: str, message: str) -> Any:
    """A string that must match ``pattern``, which the document states; one that does not is refused with ``message``
    (and error code ``code``) rather than pydantic's own, which prints the regular expression."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and re.fullmatch(pattern, value) is None:
            raise PydanticCustomError(code, message)
        return value

    # the validator after the constraint: so the schema keeps the pattern (before it, the document lost it)
    return Annotated[str, StringConstraints(pattern=pattern), BeforeValidator(check)]
