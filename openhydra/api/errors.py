"""One error schema for the OpenAI-style endpoints: ``{"error": {"message", "type", "param", "code"}}``; under
``/api/`` Ollama's ``{"error": "<message>"}``, which Ollama's Go and Python clients parse (both read only ``error``),
with the same ``type``, ``param`` and ``code`` beside it.

Route code raises :class:`APIError`; the app's exception handlers turn it into JSON with the right status code
(:meth:`APIError.body_for`). Nothing else writes error bodies.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

OLLAMA_PREFIX = "/api/"
"""Ollama's routes (api/routes_ollama.py), and any other path under it, answer errors in Ollama's shape."""


def printable(text: str) -> str:
    """``text`` made safe to serialize: lone surrogates (from a client's ``"\\ud800"`` or a header byte that is
    not ASCII, which Sanic decodes with ``surrogateescape``) become ``?`` instead of failing the JSON encoder."""
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class OllamaErrorBody(BaseModel):
    error: str
    type: str
    param: str | None = None
    code: str | None = None


class APIError(Exception):
    """An error meant for the API client. ``status`` is the HTTP status code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = None if param is None else printable(param)
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return ErrorBody(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()

    def body_for(self, path: str) -> dict[str, Any]:
        """The body for a request to ``path``: Ollama's shape under :data:`OLLAMA_PREFIX`, else OpenAI's."""
        if path.startswith(OLLAMA_PREFIX):
            return OllamaErrorBody(error=self.message, type=self.type, param=self.param, code=self.code).model_dump()
        return self.body()


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = "not_found") -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code=code)


def conflict(message: str, code: str | None = "conflict") -> APIError:
    return APIError(409, message, type="conflict_error", code=code)


def unavailable(message: str, retry_after_s: int = 5, code: str | None = "unavailable") -> APIError:
    return APIError(
        503, message, type="service_unavailable", code=code, headers={"Retry-After": str(retry_after_s)}
    )
