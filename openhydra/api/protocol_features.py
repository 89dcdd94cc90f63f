"""Request models for logprobs, structured output and tools (OpenAI shapes), shared by the protocol models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    Tag,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from openhydra.api.protocol_base import JsonModel, Tolerant
from openhydra.router.schema_subset import KEYWORDS, UnsupportedSchema, compile_schema

MAX_TOP_LOGPROBS = 20

SchemaType = Literal["object", "array", "string", "number", "integer", "boolean", "null"]


def _no_defaults(schema: dict[str, Any]) -> None:
    """The meta-schema in the document: keywords without pydantic's ``default: null`` and generated titles."""
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)
        prop.pop("title", None)


class SchemaSubset(JsonModel):
    """The JSON Schema subset that constrained decoding enforces (router/schema_subset.py), as a meta-schema.

    It is what the OpenAPI document says Ollama's ``format`` and OpenAI's ``response_format.json_schema.schema``
    may be, and the first check the node makes: a keyword outside it is a 400 naming the keyword. A schema
    that passes it and still allows no JSON value at all (``minItems`` above ``maxItems`` on an array-only
    schema, say; JSON Schema cannot say so about itself) is refused next, by :data:`JsonSchemaObject`.
    """

    # absent is how a keyword is left out: none takes null (const, default and examples' items excepted)
    model_config = ConfigDict(extra="forbid", title="JsonSchemaSubset", json_schema_extra=_no_defaults)

    type: SchemaType | Annotated[list[SchemaType], Field(min_length=1)] = None  # type: ignore[assignment]
    properties: dict[str, SchemaSubset | bool] = None  # type: ignore[assignment]
    required: list[str] = None  # type: ignore[assignment]
    additional_properties: bool = Field(None, alias="additionalProperties")  # type: ignore[assignment]
    items: SchemaSubset | bool = None  # type: ignore[assignment]
    min_items: int = Field(None, alias="minItems", ge=0)  # type: ignore[assignment]
    max_items: int = Field(None, alias="maxItems", ge=0)  # type: ignore[assignment]
    enum: list[Any] = Field(None, min_length=1)  # type: ignore[assignment]
    const: Any = None
    title: str = None  # type: ignore[assignment]
    description: str = None  # type: ignore[assignment]
    default: Any = None
    examples: list[Any] = None  # type: ignore[assignment]
    schema_uri: str = Field(None, alias="$schema")  # type: ignore[assignment]
    comment: str = Field(None, alias="$comment")  # type: ignore[assignment]
    strict: bool = None  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _known_keywords(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in KEYWORDS:
                    raise PydanticCustomError(
                        "unsupported_schema", "JSON schema keyword '{keyword}' is not supported (supported: "
                        "{supported})", {"keyword": key, "supported": ", ".join(sorted(KEYWORDS)),
                                         "api_code": "unsupported_schema"})
        return data


def _subset_core_schema(source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    """Validate with :class:`SchemaSubset` (and document it), then compile; the value stays the client's dict."""

    def keep_dict(value: Any, validate: ValidatorFunctionWrapHandler) -> dict[str, Any]:
        validate(value)
        try:
            compile_schema(value)
        except UnsupportedSchema as exc:  # UnsatisfiableSchema included: nothing to generate
            raise PydanticCustomError("unsupported_schema", "{reason}",
                                      {"reason": str(exc), "api_code": "unsupported_schema"}) from None
        return value

    return core_schema.no_info_wrap_validator_function(keep_dict, handler.generate_schema(SchemaSubset))


JsonSchemaObject = Annotated[dict[str, Any], GetPydanticSchema(get_pydantic_core_schema=_subset_core_schema)]
"""A JSON schema (an object) of the supported subset, satisfiable; validated and documented as SchemaSubset."""


def _is_schema(value: Any) -> str:
    return "schema" if isinstance(value, dict) else "other"


def schema_or(other: Any) -> Any:
    """``other | JsonSchemaObject``, told apart by the value (an object is a schema), so a refused schema's
    400 is about the schema and not "expected ``other``"."""
    return Annotated[Annotated[other, Tag("other")] | Annotated[JsonSchemaObject, Tag("schema")],
                     Discriminator(_is_schema)]


OllamaFormat = schema_or(Literal["", "json"] | None)
"""Ollama's ``format``: "json" (any JSON object), a JSON schema of the subset, or nothing."""
SchemaOrTrue = schema_or(Literal[True])
"""OpenAI's ``json_schema.schema``: a JSON schema of the subset, or ``true`` (``false`` allows nothing)."""


class JsonSchemaSpec(Tolerant):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    schema_: SchemaOrTrue = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Tolerant):
    # type json_schema needs a json_schema object (api/features.response_format_grammar), in the document too
    model_config = ConfigDict(extra="allow", json_schema_extra={
        "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionSpec(Tolerant):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolSpec(Tolerant):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(Tolerant):
    name: str


class NamedToolChoice(Tolerant):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
