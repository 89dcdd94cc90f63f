"""OpenHydra's typed Python SDK: network, economy and chat endpoints, sync and async.

``OpenHydra`` / ``AsyncOpenHydra`` wrap a node's HTTP API with pydantic results, streaming chat, retries
with backoff on 429/503 that honour ``Retry-After``, the ``X-OpenHydra-Degradation-Reason`` header on
every result, and typed errors carrying the server's OpenAI-style error body. For plain chat the
official ``openai`` client works against ``http://<node>/v1`` unchanged.
"""

from openhydra.sdk.async_client import AsyncChatStream, AsyncOpenHydra
from openhydra.sdk.client import ChatStream, OpenHydra
from openhydra.sdk.errors import (
    APIConnectionError,
    APIStatusError,
    BadRequestError,
    ConflictError,
    ErrorBody,
    NotFoundError,
    OpenHydraError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
)
from openhydra.sdk.models import (
    Balance,
    Channel,
    ChatCompletion,
    ChatCompletionChunk,
    ModelList,
    NetworkStatus,
    SignedChannelUpdate,
    StakeResult,
)
from openhydra.sdk.retry import RetryPolicy

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncChatStream",
    "AsyncOpenHydra",
    "BadRequestError",
    "Balance",
    "Channel",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatStream",
    "ConflictError",
    "ErrorBody",
    "ModelList",
    "NetworkStatus",
    "NotFoundError",
    "OpenHydra",
    "OpenHydraError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "SignedChannelUpdate",
    "StakeResult",
    "StreamError",
]
