"""Typed SDK errors: one class per status family, each carrying the server's OpenAI-style error body.

Every OpenHydra endpoint answers errors as ``{"error": {"message", "type", "param", "code"}}``;
:func:`error_for` turns a response into the matching exception with that body parsed.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError


class ErrorBody(BaseModel):
    """The ``error`` object of an OpenAI-style error response."""

    model_config = ConfigDict(extra="allow")

    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class OpenHydraError(Exception):
    """Base class of everything the SDK raises."""


class APIConnectionError(OpenHydraError):
    """The node could not be reached (refused, reset, timed out) after the allowed attempts."""


class APIStatusError(OpenHydraError):
    """The node answered with an error status; ``error`` is its parsed error body."""

    def __init__(self, status_code: int, error: ErrorBody, headers: dict[str, str], attempts: int = 1) -> None:
        super().__init__(f"HTTP {status_code}: {error.message or error.type or 'error'}"
                         + (f" (code={error.code})" if error.code is not None else ""))
        self.status_code = status_code
        self.error = error
        self.headers = headers
        self.attempts = attempts

    @property
    def code(self) -> str | int | None:
        return self.error.code

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("retry-after")


class BadRequestError(APIStatusError):
    """400: the request was malformed (the body names the field in ``param``)."""


class NotFoundError(APIStatusError):
    """404: unknown model, route or channel."""


class ConflictError(APIStatusError):
    """409: insufficient funds, a stale channel update, the economy is off, ..."""


class RateLimitError(APIStatusError):
    """429: the rate limit held after every retry the policy allowed."""


class ServiceUnavailableError(APIStatusError):
    """503: no chain covers the model, the model is loading, the ledger is busy (after the retries)."""


class StreamError(OpenHydraError):
    """The server ended a stream with an error event (a mid-stream failure)."""

    def __init__(self, error: ErrorBody) -> None:
        super().__init__(error.message or "stream failed")
        self.error = error


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 404: NotFoundError, 409: ConflictError, 429: RateLimitError, 503: ServiceUnavailableError,
}


def parse_error_body(payload: Any) -> ErrorBody:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        try:
            return ErrorBody.model_validate(payload["error"])
        except ValidationError:
            pass
    return ErrorBody(message=str(payload)[:500] if payload else "")


def error_for(response: httpx.Response, attempts: int = 1) -> APIStatusError:
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    cls = _BY_STATUS.get(response.status_code, APIStatusError)
    return cls(response.status_code, parse_error_body(payload), dict(response.headers), attempts)
