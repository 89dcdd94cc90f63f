"""The load generator's report: a markdown table, JSON, and a PNG of the latency distributions."""

from __future__ import annotations

import json
from pathlib import Path

from openhydra.loadgen.metrics import RequestRecord, Summary


def table(summary: Summary) -> str:
    def row(name: str, stats: dict) -> str:
        cells = [("-" if stats[k] is None else f"{stats[k]:.1f}") for k in ("mean", "p50", "p99")]
        return f"| {name} | {' | '.join(cells)} |"

    head = (f"{summary.label or 'run'}: model {summary.model}, {summary.concurrency} concurrent streams, "
            f"{summary.duration_s:.1f} s, {summary.completed} requests ok, {summary.failed} failed\n\n")
    lines = ["| metric (ms) | mean | p50 | p99 |", "|---|---|---|---|",
             row("TTFT", summary.ttft_ms), row("TPOT", summary.tpot_ms), row("ITL", summary.itl_ms),
             row("end-to-end", summary.e2e_ms)]
    tail = (f"\n\noutput tokens {summary.output_tokens}, output throughput {summary.output_throughput:.2f} tok/s, "
            f"request throughput {summary.request_throughput:.3f} req/s")
    if summary.coalesced:
        tail += (f"\nthe node served {summary.coalesced} requests during the run from another identical request's "
                 f"generation (coalescing; its count, other clients' included; this run sent "
                 f"{summary.completed + summary.failed}): the throughput counts their tokens, computed once")
    return head + "\n".join(lines) + tail


def write(summary: Summary, records: list[RequestRecord], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"summary": summary.to_dict(),
              "requests": [{"started_s": round(r.started, 4), "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1e3,
                            "e2e_ms": None if r.e2e_s is None else r.e2e_s * 1e3, "output_tokens": r.output_tokens,
                            "error": r.error} for r in records]}
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "report.png"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(table(summary) + "\n")
    plot(summary, records, paths[2])
    return paths


def plot(summary: Summary, records: list[RequestRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].hist([r.ttft_s * 1e3 for r in ok], bins=30)
    axes[0].set_xlabel("TTFT (ms)")
    axes[0].set_ylabel("requests")
    axes[1].hist([gap * 1e3 for r in ok for gap in r.itls()], bins=40)
    axes[1].set_xlabel("inter-token latency (ms)")
    finished = sorted((r.started + (r.e2e_s or 0), r.output_tokens) for r in ok)
    total, xs, ys = 0, [], []
    for t, n in finished:
        total += n
        xs.append(t)
        ys.append(total)
    axes[2].plot(xs, ys, "-")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("output tokens (cumulative)")
    fig.suptitle(f"{summary.label or 'openhydra-bench'}: c={summary.concurrency}, "
                 f"{summary.output_throughput:.1f} tok/s, TTFT p50 {summary.ttft_ms['p50']} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
