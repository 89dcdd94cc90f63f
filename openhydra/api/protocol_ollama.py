"""Ollama-compatible request models (https://github.com/ollama/ollama/blob/main/docs/api.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


class OllamaOptions(Tolerant):
    # Ollama: -1 generates until the model stops (bounded here by the context and api.max_tokens_limit),
    # -2 until the context is full. Any other negative value is an error.
    num_predict: int | None = Field(None, ge=-2)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class OllamaMessage(Tolerant):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaBase(Tolerant):
    model: str = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    keep_alive: str | int | float | None = None
    format: str | dict | None = None

    @field_validator("format")
    @classmethod
    def _no_structured_output(cls, value: str | dict | None) -> str | dict | None:
        if value not in (None, ""):
            raise ValueError("structured output (format) is not supported by this node")
        return value


class OllamaGenerateRequest(OllamaBase):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)


class OllamaShowRequest(Tolerant):
    model: str | None = None
    name: str | None = None  # older clients

    def model_name(self) -> str | None:
        return self.model or self.name
