"""Request models for logprobs, structured output and tools (OpenAI shapes), shared by the protocol models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from openhydra.api.protocol_base import Tolerant

MAX_TOP_LOGPROBS = 20


class JsonSchemaSpec(Tolerant):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] | Literal[True] = Field(default_factory=dict, alias="schema")  # `false` allows nothing
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
