"""Per-request timings and their summary, with the definitions serving benchmarks use (vLLM's benchmark_serving).

- TTFT: from sending the request to the first streamed content token.
- ITL (inter-token latency): every gap between consecutive content chunks, pooled over requests.
- TPOT (time per output token): per request, (end-to-end - TTFT) / (output tokens - 1).
- Output throughput: all output tokens / wall time of the measured run; request throughput likewise.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    started: float
    """Seconds since the run began."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    """Arrival of each content chunk, seconds after the request was sent."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


@dataclass
class Summary:
    label: str | None
    model: str
    concurrency: int
    duration_s: float
    completed: int
    failed: int
    output_tokens: int
    prompt_tokens: int
    request_throughput: float
    output_throughput: float
    """Output tokens per second over the whole run (all streams together)."""
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    errors: list[str]
    coalesced: int | None = None
    """Requests the node served from another identical request's generation during the run (OpenHydra's
    coalescing; their tokens were computed once): the node's own count, so other clients' requests count too; None:
    the server does not say."""

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": _ms(statistics.fmean(values)) if values else None, "p50": _ms(percentile(values, 50)),
            "p99": _ms(percentile(values, 99))}


def summarize(records: list[RequestRecord], duration_s: float, *, model: str, concurrency: int,
              label: str | None = None, coalesced: int | None = None) -> Summary:
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return Summary(
        label=label, model=model, concurrency=concurrency, duration_s=round(duration_s, 3),
        completed=len(done), failed=len(failed), output_tokens=output_tokens,
        prompt_tokens=sum(r.prompt_tokens for r in done),
        request_throughput=round(len(done) / duration_s, 4) if duration_s > 0 else 0.0,
        output_throughput=round(output_tokens / duration_s, 3) if duration_s > 0 else 0.0,
        ttft_ms=_stats([r.ttft_s for r in done]),
        tpot_ms=_stats([t for r in done if (t := r.tpot()) is not None]),
        itl_ms=_stats([gap for r in done for gap in r.itls()]),
        e2e_ms=_stats([r.e2e_s for r in done if r.e2e_s is not None]),
        errors=sorted({r.error for r in failed if r.error})[:10], coalesced=coalesced,
    )
