"""N concurrent streams against the OpenAI endpoint with the official ``openai`` async client."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sys
import time

from openhydra.loadgen.config import LoadgenConfig
from openhydra.loadgen.metrics import RequestRecord


class LoadgenError(RuntimeError):
    """The target cannot be benchmarked (unreachable, no model); the message says why."""


async def _one_request(client, model: str, prompt: str, cfg: LoadgenConfig, t0: float) -> RequestRecord:
    import openai

    sent = time.perf_counter()
    record = RequestRecord(started=sent - t0)
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=cfg.max_tokens,
            temperature=cfg.temperature, stream=True, stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter() - sent
            if chunk.choices and chunk.choices[0].delta.content:
                if record.ttft_s is None:
                    record.ttft_s = now
                record.chunk_times.append(now)
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
        record.e2e_s = time.perf_counter() - sent
        if record.output_tokens == 0:  # a server without usage in streams: one token per content chunk
            record.output_tokens = len(record.chunk_times)
        if record.ttft_s is None:
            record.error = "the stream ended without any content"
    except (TimeoutError, openai.APIError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    return record


async def resolve_model(client, requested: str | None) -> str:
    import openai

    try:
        models = [m.id for m in (await client.models.list()).data]
    except openai.APIConnectionError as exc:
        raise LoadgenError(f"cannot reach {client.base_url}: {exc}") from None
    except openai.APIError as exc:
        raise LoadgenError(f"GET {client.base_url}models failed: {exc}") from None
    if requested is None:
        if not models:
            raise LoadgenError(f"{client.base_url}models lists no model; is the node ready?")
        return models[0]
    return requested


async def coalesced_so_far(url: str) -> int | None:
    """Requests the OpenHydra node at ``url`` (its OpenAI base URL) has served from another request's generation
    (``/v1/network/status``); None for a server that does not say."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            status = (await http.get(url.rstrip("/") + "/network/status")).json()
        return int(status["serving"]["coalescing"]["coalesced"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


async def run_load(cfg: LoadgenConfig) -> tuple[list[RequestRecord], float, str, int | None]:
    """Warm up, then keep ``cfg.concurrency`` streams busy; returns (records, measured seconds, model, requests the
    node coalesced meanwhile or None)."""
    try:
        from openai import AsyncOpenAI
    except ImportError:
        raise LoadgenError("openhydra-bench needs the openai client: pip install 'openhydra-network[bench]'") from None
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=cfg.url, api_key=cfg.api_key, timeout=cfg.request_timeout_s, max_retries=0)
    try:
        model = await resolve_model(client, cfg.model)
        prompts = itertools.cycle(cfg.prompts)
        for _ in range(cfg.warmup_requests):
            warm = await _one_request(client, model, next(prompts), cfg, time.perf_counter())
            if warm.error:
                raise LoadgenError(f"warm-up request failed: {warm.error}")
        records: list[RequestRecord] = []
        remaining = itertools.count() if cfg.num_requests is None else iter(range(cfg.num_requests))
        coalesced_before = await coalesced_so_far(cfg.url)
        run_id = secrets.token_hex(3)
        bar = tqdm(total=cfg.num_requests, unit="req", desc=f"openhydra-bench c={cfg.concurrency}",
                   disable=not cfg.progress, file=sys.stderr)
        t0 = time.perf_counter()

        async def worker() -> None:
            while (number := next(remaining, None)) is not None:
                if cfg.num_requests is None and time.perf_counter() - t0 >= cfg.duration_s:
                    return
                prompt = next(prompts)
                if cfg.distinct_prompts:
                    prompt = f"{prompt} (run {run_id}, request {number})"
                record = await _one_request(client, model, prompt, cfg, t0)
                records.append(record)
                tokens = sum(r.output_tokens for r in records if r.ok)
                rate = tokens / (time.perf_counter() - t0)
                bar.set_postfix(tok_s=f"{rate:.1f}", failed=sum(not r.ok for r in records))
                bar.update()

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        elapsed = time.perf_counter() - t0
        bar.close()
        coalesced_after = await coalesced_so_far(cfg.url)
        coalesced = (None if coalesced_before is None or coalesced_after is None
                     or coalesced_after < coalesced_before  # the node restarted meanwhile: unknown
                     else coalesced_after - coalesced_before)
        return records, elapsed, model, coalesced
    finally:
        await client.close()
