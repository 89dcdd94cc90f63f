"""``AsyncOpenHydra``: the asyncio twin of :class:`openhydra.sdk.client.OpenHydra` (httpx.AsyncClient).

    async with AsyncOpenHydra("http://127.0.0.1:8080") as hydra:
        reply = await hydra.chat([{"role": "user", "content": "hi"}], max_tokens=32)
        async for chunk in await hydra.chat_stream([{"role": "user", "content": "hi"}]):
            print(chunk.text, end="")

Same endpoints, models, errors and retry policy as the sync client (the requests are described once,
in :mod:`openhydra.sdk.calls`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from openhydra.sdk import calls
from openhydra.sdk.calls import DONE, Amount, Call, Messages
from openhydra.sdk.client import DEFAULT_URL, RetryHook, normalize_base_url
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


class AsyncChatStream:
    """An open streamed chat completion: ``async for`` its chunks; ``degradation_reason`` is known at once."""

    def __init__(self, response: httpx.Response, attempts: int) -> None:
        self.response = response
        self.attempts = attempts
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self.degradation_reason = self.headers.get(DEGRADATION_HEADER)

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            async for line in self.response.aiter_lines():
                event = calls.sse_event(line)
                if event is DONE:
                    return
                if isinstance(event, ChatCompletionChunk):
                    yield event
        finally:
            await self.aclose()

    async def text(self) -> str:
        return "".join([chunk.text async for chunk in self])

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncOpenHydra:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        on_retry: RetryHook | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        if api_key:  # a node with api.bearer_token set
            headers = {**(headers or {}), "Authorization": f"Bearer {api_key}"}
        self._http = http_client or httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers)
        self._default_model: str | None = None

    # -- network -----------------------------------------------------------------------------------
    async def network_status(self) -> NetworkStatus:
        return await self._request(calls.network_status())

    async def models(self) -> ModelList:
        return await self._request(calls.models())

    # -- economy -----------------------------------------------------------------------------------
    async def balance(self, peer_id: str | None = None) -> Balance:
        return await self._request(calls.balance(peer_id))

    async def stake(self, amount: Amount) -> StakeResult:
        return await self._request(calls.stake(amount))

    async def unstake(self, amount: Amount) -> StakeResult:
        return await self._request(calls.unstake(amount))

    async def open_channel(self, payee: str, deposit: Amount) -> Channel:
        return await self._request(calls.open_channel(payee, deposit))

    async def update_channel(self, channel_id: str, amount: Amount | None = None, *,
                             signed: SignedChannelUpdate | None = None) -> Channel:
        return await self._request(calls.update_channel(channel_id, amount, signed))

    async def close_channel(self, channel_id: str, final: SignedChannelUpdate | None = None) -> Channel:
        return await self._request(calls.close_channel(channel_id, final))

    # -- chat --------------------------------------------------------------------------------------
    async def default_model(self) -> str:
        if self._default_model is None:
            self._default_model = (await self.models()).ids[0]
        return self._default_model

    async def chat(self, messages: Messages, *, model: str | None = None, **options: Any) -> ChatCompletion:
        return await self._request(calls.chat(model or await self.default_model(), messages, False, options))

    async def chat_stream(self, messages: Messages, *, model: str | None = None, **options: Any) -> AsyncChatStream:
        call = calls.chat(model or await self.default_model(), messages, True, options)
        response, attempts = await self._send(call, stream=True)
        return AsyncChatStream(response, attempts)

    # -- transport ---------------------------------------------------------------------------------
    async def _request(self, call: Call) -> Any:
        response, _ = await self._send(call)
        assert call.model is not None
        result = call.model.model_validate(response.json())
        return result.with_headers(response.headers) if isinstance(result, Result) else result

    async def _send(self, call: Call, stream: bool = False) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(call.method, call.path, params=call.params or None, json=call.body)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                wait = self.retry.wait_for(attempt, None) if isinstance(exc, httpx.ConnectError) else None
                if wait is None:
                    raise APIConnectionError(f"{call.method} {self.base_url}{call.path}: {exc}") from exc
                await self._pause(attempt, wait, None)
                continue
            if response.status_code < 400:
                return response, attempt
            if stream:
                await response.aread()
                await response.aclose()
            if response.status_code in self.retry.retry_statuses:
                wait = self.retry.wait_for(attempt, response.headers.get("retry-after"))
                if wait is not None:
                    await self._pause(attempt, wait, response.status_code)
                    continue
            raise error_for(response, attempt)

    async def _pause(self, attempt: int, wait: float, status: int | None) -> None:
        if self.on_retry is not None:
            self.on_retry(attempt, wait, status)
        await asyncio.sleep(wait)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncOpenHydra:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
