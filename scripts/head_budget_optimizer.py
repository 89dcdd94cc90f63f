"""Derive per-layer, per-KV-head KV budgets from measured sensitivity (phase 3 of arXiv:2602.16284).

For a model and a calibration text it measures, for every full-attention layer and KV head, the
attention-output error that phase-2 compaction (HAK + β + C_v) leaves at a grid of kept fractions,
on held-out queries (the queries of the tokens that follow the calibration context). Budgets are
then allocated greedily: starting from the smallest fraction everywhere, the head whose next grid
step buys the largest error reduction per kept token gets it, until the mean fraction reaches the
target ratio. One JSON (``openhydra-kv-budgets/1``, unit ``fraction``) is written per ratio.

    python scripts/head_budget_optimizer.py --ratios 0.5 0.25 0.1 \
        --text bench/data/calibration.txt --out bench/data/budgets/smollm2-135m_r{ratio}.json
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from openhydra.runtime.compaction import (
    CompactionPolicy,
    HeadBudgets,
    QueryCapture,
    capture_queries,
    register_compacted_attention,
    save_budgets,
)
from openhydra.runtime.compaction.compactor import compact_layer, is_full_attention
from openhydra.runtime.compaction.fitting import group_queries
from openhydra.runtime.compaction.layer import layer_kv

GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0)


def head_errors(layer, compacted, queries: torch.Tensor) -> list[float]:
    """Relative attention-output error per KV head for held-out queries [Hq, C, D]."""
    outs = []
    for lay in (layer, compacted):
        k, v, b = layer_kv(lay)
        qg = group_queries(queries.float(), k.shape[1])  # [Hk, G·C, D]
        logits = (qg @ k[0].float().transpose(1, 2)) * queries.shape[-1] ** -0.5 + b[0].unsqueeze(1)
        outs.append(torch.softmax(logits, -1) @ v[0].float())  # [Hk, G·C, Dv]
    return ((outs[1] - outs[0]).norm(dim=(1, 2)) / outs[0].norm(dim=(1, 2))).tolist()


def measure(model, ids: torch.Tensor, context: int, held_out: int, max_queries: int) -> dict[int, list[list[float]]]:
    """layer -> [grid point][kv head] relative error of phase-2 compaction."""
    cache, ref, fut = DynamicCache(config=model.config), QueryCapture(max_queries), QueryCapture(held_out)
    with torch.no_grad(), capture_queries(ref):
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
    scratch = copy.deepcopy(cache)
    pos = torch.arange(context, context + held_out).unsqueeze(0)
    with torch.no_grad(), capture_queries(fut):
        model(input_ids=ids[:, context : context + held_out], past_key_values=scratch, position_ids=pos)
    layer_types = getattr(model.config, "layer_types", None)
    curves: dict[int, list[list[float]]] = {}
    for i, layer in enumerate(cache.layers):
        if not is_full_attention(layer_types, i):
            continue
        hk, total = layer.keys.shape[1], layer.keys.shape[2]
        curves[i] = []
        for frac in GRID:
            budget = max(1, min(total, round(frac * total)))
            compacted = (
                compact_layer(
                    layer, ref.queries(i), [budget] * hk, CompactionPolicy(ratio=frac), layer.keys.shape[-1] ** -0.5
                )
                if budget < total
                else layer
            )
            curves[i].append(head_errors(layer, compacted, fut.queries(i)))
    return curves


def per_layer(curves: dict[int, list[list[float]]]) -> dict[int, list[list[float]]]:
    """Collapse heads: a layer's error is the sum over its heads (one budget for all of them)."""
    return {layer: [[sum(heads)] for heads in per_grid] for layer, per_grid in curves.items()}


def allocate(curves: dict[int, list[list[float]]], ratio: float, granularity: str = "layer") -> dict[int, list[float]]:
    """Greedy marginal allocation over GRID so that the mean kept fraction equals ``ratio``.

    ``layer``: one budget per layer, shared by its KV heads. A compacted layer stores every head
    padded to its widest head's budget, so uneven heads save attention compute but not memory;
    per-layer allocation is the one that turns sensitivity into saved bytes. ``head``: per head.
    """
    if granularity == "layer":
        hk = {layer: len(per_grid[0]) for layer, per_grid in curves.items()}
        return {layer: frac * hk[layer] for layer, frac in allocate(per_layer(curves), ratio, "head").items()}
    heads = [(layer, h) for layer, per_grid in curves.items() for h in range(len(per_grid[0]))]
    level = {key: 0 for key in heads}
    spent = GRID[0] * len(heads)
    budget = ratio * len(heads)

    def gain(key: tuple[int, int]) -> tuple[float, float]:
        layer, h = key
        g = level[key]
        cost = GRID[g + 1] - GRID[g]
        return (curves[layer][g][h] - curves[layer][g + 1][h]) / cost, cost

    heap = [(-gain(k)[0], k) for k in heads]
    heapq.heapify(heap)
    while heap:
        _, key = heapq.heappop(heap)
        _, cost = gain(key)
        if spent + cost > budget + 1e-9:
            continue
        level[key] += 1
        spent += cost
        if level[key] + 1 < len(GRID):
            heapq.heappush(heap, (-gain(key)[0], key))
    out: dict[int, list[float]] = {}
    for layer, h in heads:
        out.setdefault(layer, []).append(GRID[level[(layer, h)]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--text", default="bench/data/calibration.txt")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--max-queries", type=int, default=128)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--out", default="bench/data/budgets/smollm2-135m_r{ratio}.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--granularity", choices=["layer", "head"], default="layer")
    parser.add_argument("--curves", default=None, help="reuse the error curves stored in a budgets JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from openhydra.runtime.source import embedded_model_dir

        args.model = str(embedded_model_dir(Path("~/.cache/openhydra-test")))
    if args.curves:
        meta = json.loads(Path(args.curves).read_text())["meta"]
        curves = {int(k): v for k, v in meta["errors"].items()}
        seconds = meta["measure_s"]
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation=register_compacted_attention()
        ).eval()
        ids = AutoTokenizer.from_pretrained(args.model)(Path(args.text).read_text(), return_tensors="pt").input_ids
        start = time.perf_counter()
        curves = measure(model, ids, args.context, args.held_out, args.max_queries)
        seconds = time.perf_counter() - start
    for ratio in args.ratios:
        layers = allocate(curves, ratio, args.granularity)
        meta = {
            "model": args.model.rstrip("/").split("/")[-1],
            "ratio": ratio,
            "text": args.text,
            "context": args.context,
            "grid": list(GRID),
            "granularity": args.granularity,
            "measure_s": round(seconds, 1),
            "errors": {str(k): v for k, v in curves.items()},
        }
        path = Path(args.out.format(ratio=ratio))
        save_budgets(HeadBudgets("fraction", layers, meta), path)
        mean = sum(sum(v) for v in layers.values()) / sum(len(v) for v in layers.values())
        print(f"ratio {ratio}: mean kept fraction {mean:.3f} -> {path}")
    print(json.dumps({"measure_s": round(seconds, 1)}))


if __name__ == "__main__":
    main()
