"""Quality benchmark of KV compaction by Attention Matching (Zweiger et al., arXiv:2602.16284).

Measures, on real SmolLM2-135M weights and contexts built from ``bench/data``, the compacted cache
against the full cache and two eviction baselines (StreamingLLM sinks + window, H2O heavy hitters):
KV bytes, per-layer attention-output relative error, next-token top-1 agreement and KL over a
held-out continuation, perplexity of that continuation, and compaction time; and the online
phase 4 over a long text (peak KV bytes, perplexity). The Hydra app ``bench/compaction_app.py``
sweeps it over phase x ratio and writes the table and the plot.

Every forward passes explicit ``position_ids``: after compaction the cache holds fewer entries than
tokens seen, and positions must keep counting tokens.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from openhydra.runtime.compaction import (
    CompactionPolicy,
    OnlineCompactor,
    QueryCapture,
    cache_kv_bytes,
    capture_queries,
    compact_cache,
    register_compacted_attention,
)
from openhydra.runtime.compaction.fitting import group_queries
from openhydra.runtime.compaction.layer import layer_kv

DATA = Path(__file__).parent / "data"


def load_model(path: str | Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=register_compacted_attention()
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def doc_ids(tokenizer: object, name: str) -> torch.Tensor:
    return tokenizer((DATA / f"{name}.txt").read_text(), return_tensors="pt").input_ids  # [1, N]


@torch.no_grad()
def run(model: torch.nn.Module, cache: DynamicCache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Forward ``ids`` [1, S] at positions start..start+S-1; logits [S, V] float32."""
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[0].float()


@dataclass
class Reference:
    """The full-cache run of one document."""

    context: torch.Tensor  # [1, T]
    continuation: torch.Tensor  # [1, C]
    cache: DynamicCache
    ref_queries: dict[int, torch.Tensor]  # layer -> [Hq, n, D], captured from the prefill
    cont_queries: dict[int, torch.Tensor]  # layer -> [Hq, C, D], the continuation's own queries
    cont_logits: torch.Tensor  # [C, V]
    prefill_s: float


def full_reference(model: torch.nn.Module, ids: torch.Tensor, context: int, cont: int, max_q: int) -> Reference:
    if ids.shape[1] < context + cont:
        raise ValueError(f"document has {ids.shape[1]} tokens, need {context + cont}")
    ctx, tail = ids[:, :context], ids[:, context : context + cont]
    cache, cap = DynamicCache(config=model.config), QueryCapture(max_q)
    start = time.perf_counter()
    with capture_queries(cap):
        run(model, cache, ctx, 0)
    prefill_s = time.perf_counter() - start
    scratch, cont_cap = copy.deepcopy(cache), QueryCapture(cont)
    with capture_queries(cont_cap):
        logits = run(model, scratch, tail, context)
    return Reference(ctx, tail, cache, cap.as_dict(), cont_cap.as_dict(), logits, prefill_s)


def attention_output_errors(
    full: DynamicCache, compacted: DynamicCache, queries: dict[int, torch.Tensor]
) -> list[float]:
    """Per layer: ||O_c - O_f|| / ||O_f|| for the continuation's queries over the context part only."""
    errors = []
    for i, q in sorted(queries.items()):
        outs = []
        for cache in (full, compacted):
            k, v, b = layer_kv(cache.layers[i])  # [1, Hk, T, D], [1, Hk, T, Dv], [1, Hk, T]
            qg = group_queries(q, k.shape[1])  # [Hk, G·C, D]
            logits = (qg @ k[0].float().transpose(1, 2)) * q.shape[-1] ** -0.5 + b[0].unsqueeze(1)
            outs.append(torch.softmax(logits, -1) @ v[0].float())  # [Hk, G·C, Dv]
        errors.append(((outs[1] - outs[0]).norm() / outs[0].norm()).item())
    return errors


def continuation_metrics(full_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and KL(full || compacted) per position; perplexity of the continuation.

    logits[i] predicts targets[i + 1]; the last position has no target in the continuation.
    """
    logp_full, logp = torch.log_softmax(full_logits, -1), torch.log_softmax(logits, -1)
    kl = (logp_full.exp() * (logp_full - logp)).sum(-1)  # [C]
    nll = -logp[:-1].gather(1, targets[1:].unsqueeze(1)).squeeze(1)
    return {
        "top1": (full_logits.argmax(-1) == logits.argmax(-1)).float().mean().item(),
        "kl": kl.mean().item(),
        "ppl": math.exp(nll.mean().item()),
    }


VARIANTS = {
    "streaming": dict(selector="streaming", fit=False),
    "h2o": dict(selector="h2o", fit=False),
    "phase1": dict(fit=False),
    "phase2": dict(fit=True),
    "phase3": dict(fit=True),
}


def evaluate_variant(model: torch.nn.Module, ref: Reference, name: str, policy: CompactionPolicy) -> dict:
    cache = copy.deepcopy(ref.cache)
    report = compact_cache(cache, None, ref.ref_queries, policy)
    kv_bytes = cache_kv_bytes(cache)
    errors = attention_output_errors(ref.cache, cache, ref.cont_queries)
    logits = run(model, cache, ref.continuation, ref.context.shape[1])
    metrics = continuation_metrics(ref.cont_logits, logits, ref.continuation[0])
    return {
        "variant": name,
        "kv_bytes": kv_bytes,
        "attn_err": sum(errors) / len(errors),
        "attn_err_layers": errors,
        "compact_s": report.seconds,
        **metrics,
    }


def evaluate_full(ref: Reference) -> dict:
    metrics = continuation_metrics(ref.cont_logits, ref.cont_logits, ref.continuation[0])
    return {"variant": "full", "kv_bytes": cache_kv_bytes(ref.cache), "attn_err": 0.0, "compact_s": 0.0, **metrics}


def online_run(
    model: torch.nn.Module,
    ids: torch.Tensor,
    policy: CompactionPolicy | None,
    threshold: int,
    prompt: int,
    chunk: int,
    max_q: int,
) -> dict:
    """Teacher-force ``ids`` in chunks after a prompt, compacting online (policy None: full cache)."""
    layer_types = getattr(model.config, "layer_types", None)
    online = OnlineCompactor(policy, threshold, layer_types, max_q) if policy else None
    cache = DynamicCache(config=model.config)
    bytes_trace, nll, count, compact_s = [], 0.0, 0, 0.0
    pos = 0
    start = time.perf_counter()
    while pos < ids.shape[1] - 1:
        step = ids[:, pos : pos + (prompt if pos == 0 else chunk)]
        if online:
            with online.capturing():
                logits = run(model, cache, step, pos)
        else:
            logits = run(model, cache, step, pos)
        targets = ids[0, pos + 1 : pos + 1 + step.shape[1]]
        logp = torch.log_softmax(logits[: targets.shape[0]], -1)
        if pos >= threshold:  # score only tokens past the first compaction point
            nll -= logp.gather(1, targets.unsqueeze(1)).sum().item()
            count += targets.shape[0]
        pos += step.shape[1]
        bytes_trace.append((pos, cache_kv_bytes(cache, layer_types)))
        if online and (report := online.maybe_compact(cache)) is not None:
            compact_s += report.seconds
    return {
        "tokens": pos,
        "peak_kv_bytes": max(b for _, b in bytes_trace),
        "final_kv_bytes": bytes_trace[-1][1],
        "bytes_trace": bytes_trace,
        "ppl": math.exp(nll / max(count, 1)),
        "compactions": len(online.reports) if online else 0,
        "compact_s": compact_s,
        "wall_s": time.perf_counter() - start,
        "cache": cache,
        "position": pos,
    }


@torch.no_grad()
def greedy_sample(
    model: torch.nn.Module, tokenizer: object, cache: DynamicCache, last: torch.Tensor, pos: int, n: int
) -> str:
    """Greedy-continue a (possibly compacted) cache for ``n`` tokens, to eyeball coherence."""
    out, token = [], last.view(1, 1)
    for _ in range(n):
        logits = run(model, cache, token, pos)
        token = logits[-1].argmax().view(1, 1)
        out.append(int(token))
        pos += 1
    return tokenizer.decode(out)
