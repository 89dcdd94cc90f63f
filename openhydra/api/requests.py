"""From protocol fields (OpenAI or Ollama) to one `GenerationRequest`."""

from __future__ import annotations

import hashlib
import secrets

from openhydra.api.errors import bad_request
from openhydra.api.protocol_openai import SEED_MAX
from openhydra.config.schema import ApiConfig
from openhydra.router.engine import ContextTooLong, Engine, GenerationRequest
from openhydra.runtime.sampling import SamplingParams

# Below these the sampler's float32 arithmetic breaks down (logits / temperature overflows to inf, a top_p
# that rounds to 0 drops every token), so a request asking for them gets what it means: greedy decoding,
# or only the most likely token. vLLM treats temperatures under 1e-5 as greedy too.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6


def generation_request(
    engine: Engine,
    api: ApiConfig,
    prompt_ids: list[int],
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: list[str],
    choice: int = 0,
    until_context_full: bool = False,
    prompt_param: str = "messages",
    max_tokens_param: str = "max_tokens",
) -> GenerationRequest:
    """``prompt_param``: the request field that holds the prompt, named by a too-long prompt's error;
    ``max_tokens_param``: the one that holds the length (Ollama's ``options.num_predict``), named by its errors."""
    if not prompt_ids:
        raise bad_request("the prompt is empty (it encodes to no tokens)", param=prompt_param, code="empty_prompt")
    room = engine.context_length - len(prompt_ids)
    if room < 1:
        raise bad_request(
            f"prompt is {len(prompt_ids)} tokens; the model's context length is {engine.context_length}",
            param=prompt_param, code="context_length_exceeded",
        )
    if until_context_full:
        max_tokens = min(room, api.max_tokens_limit)
    elif max_tokens is None:
        max_tokens = min(api.default_max_tokens, room)
    if max_tokens > api.max_tokens_limit:
        raise bad_request(f"{max_tokens_param} must be <= {api.max_tokens_limit} (got {max_tokens})",
                          param=max_tokens_param)
    try:
        engine.check_fits(len(prompt_ids), max_tokens, max_tokens_param)
    except ContextTooLong as exc:
        raise bad_request(str(exc), param=max_tokens_param, code="context_length_exceeded") from None
    base_seed = seed if seed is not None else secrets.randbits(63)
    temperature = 1.0 if temperature is None else temperature
    sampling = SamplingParams(
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=1.0 if top_p is None else max(top_p, MIN_TOP_P),
        top_k=top_k or 0,
        seed=choice_seed(base_seed, choice),
    )
    return GenerationRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, stop=stop)


def choice_seed(seed: int, choice: int) -> int:
    """The sampler's seed (in [0, SEED_MAX]) for choice ``choice`` of a request seeded ``seed`` (any int64): choice 0
    samples with the seed itself (a negative one taken modulo 2^63), every other choice with a seed hashed from both,
    so requests with nearby seeds share no choices (seed s's choice 1 is not seed s+1's choice 0)."""
    if choice == 0:
        return seed % (SEED_MAX + 1)
    return int.from_bytes(hashlib.sha256(f"{seed}/{choice}".encode()).digest()[:8], "big") & SEED_MAX
