"""Hydra app for the KV-compaction benchmark (Attention Matching, arXiv:2602.16284).

    python bench/compaction_app.py -m          # sweep phase x ratio, then one table + one plot

Each job evaluates one ``compaction/`` option at one ratio on real SmolLM2 weights (phases 1-3:
against the full cache and the StreamingLLM / H2O baselines; phase 4: online over a long text) and
writes ``result.json`` in its job folder. When the sweep ends, :class:`AggregateCallback` averages
the documents, writes ``compaction_table.md`` in the sweep folder and the plot to ``report.png``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import torch
from bench_compaction import (
    VARIANTS,
    doc_ids,
    evaluate_full,
    evaluate_variant,
    full_reference,
    greedy_sample,
    load_model,
    online_run,
)
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from openhydra.runtime.compaction import CompactionConfig, CompactionPolicy
from openhydra.testing.machine import announce

log = logging.getLogger(__name__)
MB = 1024 * 1024


def model_path(cfg: DictConfig) -> str:
    if cfg.model_path:
        return str(cfg.model_path)
    from openhydra.runtime.source import embedded_model_dir

    return str(embedded_model_dir(Path("~/.cache/openhydra-test")))


def quality_rows(cfg: DictConfig, comp: CompactionConfig, model, tokenizer) -> list[dict[str, Any]]:
    rows = []
    variant = f"phase{comp.phase}"
    policies = {variant: CompactionPolicy.from_config(comp)}
    if cfg.baselines:
        for name in ("streaming", "h2o"):
            policies[name] = CompactionPolicy(ratio=comp.ratio, **VARIANTS[name])
    for doc in cfg.docs:
        ref = full_reference(
            model, doc_ids(tokenizer, doc), cfg.context_tokens, cfg.continuation_tokens, comp.max_queries
        )
        rows.append({"doc": doc, "ratio": 1.0, **evaluate_full(ref), "prefill_s": ref.prefill_s})
        for name, policy in policies.items():
            row = evaluate_variant(model, ref, name, policy)
            rows.append({"doc": doc, "ratio": comp.ratio, **row})
            log.info(
                "%s r=%.2f %s: kl %.4f top1 %.3f ppl %.3f attn %.4f (%.1f s)",
                doc,
                comp.ratio,
                name,
                row["kl"],
                row["top1"],
                row["ppl"],
                row["attn_err"],
                row["compact_s"],
            )
    return rows


def phase4_result(cfg: DictConfig, comp: CompactionConfig, model, tokenizer) -> dict[str, Any]:
    p4 = cfg.phase4
    ids = doc_ids(tokenizer, p4.doc)[:, : p4.total_tokens + 1]
    args = dict(threshold=comp.threshold_tokens, prompt=p4.prompt_tokens, chunk=p4.chunk_tokens, max_q=comp.max_queries)
    runs = {
        "full": online_run(model, ids, None, **args),
        "streaming": online_run(model, ids, CompactionPolicy(ratio=comp.ratio, **VARIANTS["streaming"]), **args),
        "phase4": online_run(model, ids, CompactionPolicy.from_config(comp), **args),
    }
    out: dict[str, Any] = {"threshold": comp.threshold_tokens, "ratio": comp.ratio}
    for name, run in runs.items():
        cache, pos = run.pop("cache"), run.pop("position")
        if name != "full":
            run["sample"] = greedy_sample(model, tokenizer, cache, ids[0, pos - 1], pos - 1, p4.sample_tokens)
        out[name] = run
        log.info(
            "phase4 r=%.2f %s: ppl %.3f peak %.1f MB, %d compactions",
            comp.ratio,
            name,
            run["ppl"],
            run["peak_kv_bytes"] / MB,
            run["compactions"],
        )
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_compaction/config")
def main(cfg: DictConfig) -> None:
    announce()  # the machine, its load and the versions, printed with the result
    torch.set_num_threads(int(cfg.threads))
    comp = CompactionConfig.from_mapping(cfg.compaction)
    model, tokenizer = load_model(model_path(cfg))
    result: dict[str, Any] = {"phase": comp.phase, "ratio": comp.ratio, "max_queries": comp.max_queries}
    if comp.phase == 4:
        result["online"] = phase4_result(cfg, comp, model, tokenizer)
    else:
        result["rows"] = quality_rows(cfg, comp, model, tokenizer)
    out = Path(HydraConfig.get().runtime.output_dir) / "result.json"
    out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", out)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def aggregate(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Average rows over documents per (variant, ratio); baselines repeated across jobs count once."""
    grouped: dict[tuple[str, float], dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for res in results:
        for row in res.get("rows", []):
            grouped[(row["variant"], row["ratio"])].setdefault(row["doc"], [row])
    table = []
    for (variant, ratio), per_doc in grouped.items():
        rows = [r[0] for r in per_doc.values()]
        agg = {"variant": variant, "ratio": ratio, "docs": len(rows)}
        for key in ("kv_bytes", "attn_err", "top1", "kl", "ppl", "compact_s"):
            agg[key] = mean([r[key] for r in rows])
        if "attn_err_layers" in rows[0]:
            agg["attn_err_layers"] = [mean(v) for v in zip(*(r["attn_err_layers"] for r in rows), strict=True)]
        table.append(agg)
    order = {"full": 0, "streaming": 1, "h2o": 2, "phase1": 3, "phase2": 4, "phase3": 5}
    table.sort(key=lambda r: (-r["ratio"], order.get(r["variant"], 9)))
    online = sorted((r["online"] for r in results if "online" in r), key=lambda r: -r["ratio"])
    return table, online


def markdown(table: list[dict[str, Any]], online: list[dict[str, Any]]) -> str:
    full = next((r for r in table if r["variant"] == "full"), None)
    lines = [
        "| ratio | variant | KV MB (% of full) | attn-output rel. err | top-1 agree | KL | PPL | compaction s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        share = f" ({100 * r['kv_bytes'] / full['kv_bytes']:.1f}%)" if full else ""
        lines.append(
            f"| {r['ratio']:g} | {r['variant']} | {r['kv_bytes'] / MB:.2f}{share} | {r['attn_err']:.4f} | "
            f"{r['top1']:.3f} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['compact_s']:.2f} |"
        )
    if online:
        lines += [
            "",
            "| ratio | threshold | tokens | run | peak KV MB | final KV MB | PPL past threshold | "
            "compactions | compaction s | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for o in online:
            for name in ("full", "streaming", "phase4"):
                r = o[name]
                lines.append(
                    f"| {o['ratio']:g} | {o['threshold']} | {r['tokens']} | {name} | {r['peak_kv_bytes'] / MB:.2f} | "
                    f"{r['final_kv_bytes'] / MB:.2f} | {r['ppl']:.3f} | {r['compactions']} | {r['compact_s']:.1f} | "
                    f"{r['wall_s']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], online: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    variants = [v for v in ("streaming", "h2o", "phase1", "phase2", "phase3") if any(r["variant"] == v for r in table)]
    full = next((r for r in table if r["variant"] == "full"), None)
    for ax, key, label in zip(
        [*axes[0].tolist(), axes[1][0]],
        ("attn_err", "kl", "top1", "ppl"),
        ("attention-output rel. error", "KL(full || compacted)", "top-1 agreement", "held-out perplexity"),
        strict=True,
    ):
        for v in variants:
            pts = sorted((r["ratio"], r[key]) for r in table if r["variant"] == v)
            ax.plot(*zip(*pts, strict=True), marker="o", label=v)
        if full is not None and key == "ppl":
            ax.axhline(full["ppl"], color="k", ls="--", label="full cache")
        ax.set_xscale("log")
        ax.set_xlabel("kept ratio")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    ax = axes[1][1]
    mid = sorted({r["ratio"] for r in table if r["variant"] != "full"})
    pick = 0.25 if 0.25 in mid else (mid[0] if mid else None)
    for v in variants:
        row = next((r for r in table if r["variant"] == v and r["ratio"] == pick), None)
        if row and "attn_err_layers" in row:
            ax.plot(row["attn_err_layers"], label=v)
    ax.set_title(f"per-layer attention-output error, ratio {pick}")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    ax = axes[1][2]
    for o in online[:1]:
        for name in ("full", "streaming", "phase4"):
            xs, ys = zip(*o[name]["bytes_trace"], strict=True)
            ax.plot(xs, [y / MB for y in ys], label=name)
        ax.axvline(o["threshold"], color="grey", ls=":")
        ax.set_title(f"phase 4: KV MB while decoding (ratio {o['ratio']}, threshold {o['threshold']})")
        ax.set_xlabel("tokens seen")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


class AggregateCallback(Callback):
    """At the end of the sweep: one markdown table and one plot from every job's result.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))]
        if not results:
            log.warning("no result.json under %s", sweep_dir)
            return
        table, online = aggregate(results)
        text = markdown(table, online)
        (sweep_dir / "compaction_table.md").write_text(text)
        (sweep_dir / "compaction_summary.json").write_text(json.dumps({"table": table, "online": online}, indent=1))
        png = Path(OmegaConf.select(config, "report.png") or sweep_dir / "compaction_quality.png")
        plot(table, online, png)
        print(text)
        print(f"table: {sweep_dir / 'compaction_table.md'}  plot: {png}")


if __name__ == "__main__":
    main()
