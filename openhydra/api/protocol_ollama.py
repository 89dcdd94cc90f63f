"""Ollama-compatible request models (https://github.com/ollama/ollama/blob/main/docs/api.md).

Strict like the OpenAI models (protocol_openai.py): no ``"4"`` for an integer, no ``0`` for a boolean. They are
also the node's OpenAPI document, so each rule is a constraint that shows in the JSON schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from openhydra.api.protocol_base import Tolerant, matching, null_is_default
from openhydra.api.protocol_features import OllamaFormat, ToolSpec
from openhydra.api.protocol_openai import SEED_MAX, SEED_MIN, TOP_K_MAX, StopList
from openhydra.runtime.sampling import MAX_TEMPERATURE

GO_DURATION = r"^[-+]?((\d+\.?\d*|\.\d+)|((\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)$"
"""Ollama's keep_alive as a string: what Go's time.ParseDuration takes ("0", numbers with units: "5m", "1h30m",
"-1h"), and, more lenient than Ollama, a bare number ("-1", "300": seconds, as the number would be)."""
Duration = matching(GO_DURATION, "duration", 'a duration such as "5m", "1h30m", "0" or "-1", or a number of seconds')

# Not enforced by the model: the route refuses images with its own message (routes_ollama); the document says so.
NoImages = Annotated[list[str], Field(json_schema_extra={"maxItems": 0},
                                      description="this node serves text models: no images")]


class OllamaOptions(Tolerant):
    # Ollama: -1 generates until the model stops (bounded here by the context and api.max_tokens_limit),
    # -2 until the context is full. Any other negative value is an error.
    num_predict: int | None = Field(None, ge=-2)
    # Ollama sets no upper bound; OpenAI's is 2, the sampler's (and the peers') MAX_TEMPERATURE
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    """A negative seed is Ollama's "random" (its default options send -1): the same as none."""
    stop: str | StopList | None = None

    @field_validator("seed")
    @classmethod
    def _negative_is_random(cls, value: int | None) -> int | None:
        return None if value is not None and value < 0 else value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class OllamaMessage(Tolerant):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    """``null`` reads as empty (never None after validation), as Ollama's own server reads it (an assistant turn
    that only called tools)."""
    images: NoImages | None = None
    tool_calls: list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _null_is_empty(cls, value: str | None) -> str:
        return "" if value is None else value


class OllamaBase(Tolerant):
    model: str = Field(min_length=1)
    stream: bool | None = True
    _null_stream = null_is_default("stream")
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    keep_alive: Duration | int | float | None = None
    """Read as Ollama reads it (seconds as a number, or a Go duration string such as "5m", "0" or "-1h"; anything
    else is a 400, as there) and otherwise ignored: a node keeps its span loaded while it serves."""
    format: OllamaFormat = None
    """Structured output: "json" (any JSON object) or a JSON schema, by constrained decoding (api/features.py)."""


class OllamaGenerateRequest(OllamaBase):
    prompt: str = ""
    system: str | None = None
    raw: bool | None = False
    _null_raw = null_is_default("raw")
    images: NoImages | None = None


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[ToolSpec] | None = None


_NAMED = {"type": "string", "minLength": 1}


class OllamaShowRequest(Tolerant):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["model"], "properties": {"model": _NAMED}},
        {"required": ["name"], "properties": {"name": _NAMED}},
    ]})

    model: str | None = None
    name: str | None = None  # older clients

    @model_validator(mode="after")
    def _named(self) -> OllamaShowRequest:
        if not self.model_name():
            raise PydanticCustomError("missing", "Field required", {"api_param": "model"})
        return self

    def model_name(self) -> str | None:
        return self.model or self.name
