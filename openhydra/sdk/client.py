"""``OpenHydra``: the synchronous SDK client (httpx) for a node's network, economy and chat endpoints.

    from openhydra.sdk import OpenHydra

    with OpenHydra("http://127.0.0.1:8080") as hydra:
        print(hydra.network_status().ready, hydra.balance().credits)
        reply = hydra.chat([{"role": "user", "content": "hi"}], max_tokens=32)
        print(reply.text, reply.usage, reply.degradation_reason)
        for chunk in hydra.chat_stream([{"role": "user", "content": "hi"}]):
            print(chunk.text, end="")

429 and 503 answers are retried per :class:`~openhydra.sdk.retry.RetryPolicy` (``Retry-After`` honoured,
bounded attempts); what is left is raised as a typed :mod:`~openhydra.sdk.errors` exception carrying the
server's error body. The official ``openai`` client remains the first-class way to chat; this client adds
the OpenHydra-specific endpoints and headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from openhydra.sdk import calls
from openhydra.sdk.calls import Amount, Call, Messages
from openhydra.sdk.errors import APIConnectionError, error_for
from openhydra.sdk.models import (
    DEGRADATION_HEADER,
    Balance,
    Channel,
    ChatCompletion,
    ChatCompletionChunk,
    ModelList,
    NetworkStatus,
    Result,
    SignedChannelUpdate,
    StakeResult,
)
from openhydra.sdk.retry import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8080"
RetryHook = Callable[[int, float, int | None], None]
"""Called before each retry's wait: (failed attempt number, wait in s, HTTP status or None for a connect error)."""


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ChatStream:
    """An open streamed chat completion: iterate for chunks; ``degradation_reason`` is known at once."""

    def __init__(self, response: httpx.Response, attempts: int) -> None:
        self.response = response
        self.attempts = attempts
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self.degradation_reason = self.headers.get(DEGRADATION_HEADER)

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        try:
            yield from calls.sse_chunks(self.response.iter_lines())
        finally:
            self.close()

    def text(self) -> str:
        """Read the whole stream and return the generated text."""
        return "".join(chunk.text for chunk in self)

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenHydra:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        on_retry: RetryHook | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        if api_key:  # a node with api.bearer_token set
            headers = {**(headers or {}), "Authorization": f"Bearer {api_key}"}
        self._http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        self._default_model: str | None = None

    # -- network -----------------------------------------------------------------------------------
    def network_status(self) -> NetworkStatus:
        return self._request(calls.network_status())

    def models(self) -> ModelList:
        return self._request(calls.models())

    # -- economy -----------------------------------------------------------------------------------
    def balance(self, peer_id: str | None = None) -> Balance:
        """This node's balance, or ``peer_id``'s as this node's ledger sees it."""
        return self._request(calls.balance(peer_id))

    def stake(self, amount: Amount) -> StakeResult:
        return self._request(calls.stake(amount))

    def unstake(self, amount: Amount) -> StakeResult:
        return self._request(calls.unstake(amount))

    def open_channel(self, payee: str, deposit: Amount) -> Channel:
        return self._request(calls.open_channel(payee, deposit))

    def update_channel(self, channel_id: str, amount: Amount | None = None, *,
                       signed: SignedChannelUpdate | None = None) -> Channel:
        """Pay ``amount`` (cumulative, this node is the payer) or lodge a payer's ``signed`` update."""
        return self._request(calls.update_channel(channel_id, amount, signed))

    def close_channel(self, channel_id: str, final: SignedChannelUpdate | None = None) -> Channel:
        return self._request(calls.close_channel(channel_id, final))

    # -- chat --------------------------------------------------------------------------------------
    def default_model(self) -> str:
        if self._default_model is None:
            self._default_model = self.models().ids[0]
        return self._default_model

    def chat(self, messages: Messages, *, model: str | None = None, **options: Any) -> ChatCompletion:
        """A chat completion (OpenAI fields as keywords: max_tokens, temperature, top_p, stop, seed, ...)."""
        return self._request(calls.chat(model or self.default_model(), messages, False, options))

    def chat_stream(self, messages: Messages, *, model: str | None = None, **options: Any) -> ChatStream:
        """A streamed chat completion (SSE); the last chunk carries ``usage``."""
        call = calls.chat(model or self.default_model(), messages, True, options)
        response, attempts = self._send(call, stream=True)
        return ChatStream(response, attempts)

    # -- transport ---------------------------------------------------------------------------------
    def _request(self, call: Call) -> Any:
        response, _ = self._send(call)
        assert call.model is not None
        result = call.model.model_validate(response.json())
        return result.with_headers(response.headers) if isinstance(result, Result) else result

    def _send(self, call: Call, stream: bool = False) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(call.method, call.path, params=call.params or None, json=call.body)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                wait = self.retry.wait_for(attempt, None) if isinstance(exc, httpx.ConnectError) else None
                if wait is None:
                    raise APIConnectionError(f"{call.method} {self.base_url}{call.path}: {exc}") from exc
                self._pause(attempt, wait, None)
                continue
            if response.status_code < 400:
                return response, attempt
            if stream:
                response.read()
                response.close()
            if response.status_code in self.retry.retry_statuses:
                wait = self.retry.wait_for(attempt, response.headers.get("retry-after"))
                if wait is not None:
                    self._pause(attempt, wait, response.status_code)
                    continue
            raise error_for(response, attempt)

    def _pause(self, attempt: int, wait: float, status: int | None) -> None:
        if self.on_retry is not None:
            self.on_retry(attempt, wait, status)
        time.sleep(wait)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenHydra:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
