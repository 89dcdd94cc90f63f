"""OpenAI-compatible request models. Inbound models tolerate unknown fields (clients send new ones).

Fields are strict where OpenAI's schema is: an ``integer`` takes no ``"4"`` or ``true``, a ``boolean`` no ``0``,
a ``number`` no string. These models are also the node's OpenAPI document (api/openapi.py), so every rule is
written as a constraint pydantic puts into the JSON schema (``max_length`` on a list, not a validator).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from openhydra.api.protocol_base import Tolerant, null_is_default
from openhydra.api.protocol_features import MAX_TOP_LOGPROBS, ResponseFormat, ToolChoice, ToolSpec

MAX_STOPS = 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64; the sampler's is in [0, SEED_MAX]
# (api/requests.py choice_seed)
TOP_K_MAX = 2**31 - 1

StopList = Annotated[list[str], Field(max_length=MAX_STOPS)]


TEXT_PARTS = ("text", "input_text")


class ContentPart(Tolerant):
    # Any type parses (api/features.check_content_parts then refuses non-text parts, and text parts without
    # text, with its own message); the document says which the node takes.
    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})
    type: str = Field(json_schema_extra={"enum": list(TEXT_PARTS)})
    text: Annotated[str | None, WithJsonSchema({"type": "string"})] = None  # None only to refuse it by name


class ChatMessage(Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type in TEXT_PARTS)


class StreamOptions(Tolerant):
    include_usage: bool | None = False
    _null_include_usage = null_is_default("include_usage")


class SamplingFields(Tolerant):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | StopList | None = None
    n: int | None = Field(1, ge=1, le=8)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # extension (as in vLLM): generate exactly max_tokens, for benchmarks
    _null_sampling = null_is_default("n", "stream", "ignore_eos")  # null: the default, never None past validation

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_NOT_NULL = {"not": {"type": "null"}}


class ChatCompletionRequest(SamplingFields):
    # Rules between fields, checked by the route (routes_openai.chat_completions), written for the document:
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": _NOT_NULL}},  # top_logprobs needs
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},  # logprobs: true
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": [None, "none", "auto"]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},  # a forced
    ]})  # tool call needs tools

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    _null_logprobs = null_is_default("logprobs")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # echo with logprobs would need prompt-token logprobs, which the node does not compute (routes_openai)
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["echo", "logprobs"], "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}}}})

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        ..., description="One prompt: a string, or a list of exactly one string")
    echo: bool | None = False
    _null_echo = null_is_default("echo")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None  # extension (as in vLLM): structured output on completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        ids = isinstance(value, list) and value and all(isinstance(v, int | list) and not isinstance(v, bool)
                                                        for v in value)
        if ids:  # OpenAI's token ids ([1, 2]) or batches of them ([[1, 2]])
            raise PydanticCustomError("token_ids", "token-id prompts are not supported by this node: send the "
                                      "prompt as text", {"api_code": "unsupported_parameter"})
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
