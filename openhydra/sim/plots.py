"""Matplotlib figures for docs/scale.md (Agg backend; matplotlib is a dev dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from openhydra.sim.curve import Curve
from openhydra.sim.metrics import Metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: Sequence[float], label: str) -> None:
    xs = sorted(v for v in values if v < float("inf"))
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_run(metrics: Metrics, title: str, path: Path, main_model: str) -> Path:
    """Per-token latency CDF (chosen vs best), recovery times, and coverage over time."""
    plt = _plt()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    _cdf(ax1, metrics.token_ms, "chosen route (LayerCoverageMap)")
    _cdf(ax1, metrics.best_token_ms, "best possible route")
    ax1.set_xlabel("per-token latency, ms")
    ax1.set_ylabel("fraction of requests")
    ax1.set_xscale("log")
    ax1.legend()
    ax1.set_title("per-token latency")
    if metrics.recovery_ms:
        ax2.hist([v / 1000.0 for v in metrics.recovery_ms], bins=30, color="C3")
    ax2.set_xlabel("peer left -> next token at the client, s")
    ax2.set_ylabel("sessions")
    ax2.set_title(f"recovery ({len(metrics.recovery_ms)} sessions)")
    samples = [c for c in metrics.coverage if c.model == main_model]
    ts = [c.t / 60.0 for c in samples]
    ax3.plot(ts, [c.min_peers_per_layer for c in samples], label="min live peers on a layer")
    ax3.plot(ts, [c.holes_layers for c in samples], label="uncovered layers (live)")
    ax3.plot(ts, [c.dht_holes_layers for c in samples], "--", label="uncovered layers (DHT view)")
    ax3.set_xlabel("simulated time, min")
    ax3.set_title(f"coverage of {main_model}")
    ax3.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curve(curve: Curve, path: Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    xs = [p.joined for p in curve.auto]
    ax1.plot(xs, [p.evenness for p in curve.auto], label="shard=auto (choose_span)")
    ax1.plot(xs, [p.evenness for p in curve.random], label="random span")
    ax1.set_xscale("log")
    ax1.set_xlabel("peers joined")
    ax1.set_ylabel("weakest layer / mean layer throughput")
    ax1.set_ylim(0, 1.05)
    ax1.legend()
    ax1.set_title(f"coverage evenness, {curve.model} ({curve.total_layers} layers)")
    for joined, profile in sorted(curve.profiles.items()):
        top = max(profile) or 1.0
        ax2.plot(range(curve.total_layers), [v / top for v in profile], label=f"{joined} peers")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("summed throughput / max (shard=auto)")
    ax2.set_ylim(0, 1.05)
    ax2.legend()
    ax2.set_title("per-layer throughput as peers join")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(rows: Sequence[dict], path: Path) -> Path:
    """Route choice time and success vs swarm size (rows: reports of runs at several sizes)."""
    plt = _plt()
    xs = [r["peers"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(xs, [r["route_choice_cpu_ms_p50"] for r in rows], marker="o", label="route choice p50")
    ax1.plot(xs, [r["route_choice_cpu_ms_p99"] for r in rows], marker="o", label="route choice p99")
    ax1.plot(xs, [r["first_route_choice_cpu_ms_p99"] for r in rows], marker="^",
             label="first choice on a fresh map p99 (builds the layer index)")
    ax1.plot(xs, [r["map_build_cpu_ms_p50"] for r in rows], marker="s", ls="--", label="map build p50 (per lookup)")
    ax1.axhline(10.0, color="grey", ls=":", label="10 ms target")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("peers")
    ax1.set_ylabel("CPU ms of the coordinator process")
    ax1.legend()
    ax1.set_title("coordinator route choice")
    ax2.plot(xs, [r["token_ms_p50"] for r in rows], marker="o", label="chosen p50")
    ax2.plot(xs, [r["token_ms_p99"] for r in rows], marker="o", label="chosen p99")
    ax2.plot(xs, [r["best_token_ms_p50"] for r in rows], marker="s", ls="--", label="best p50")
    ax2.plot(xs, [r["best_token_ms_p99"] for r in rows], marker="s", ls="--", label="best p99")
    ax2.set_xscale("log")
    ax2.set_xlabel("peers")
    ax2.set_ylabel("per-token latency, ms")
    ax2.legend()
    ax2.set_title("per-token latency: chosen vs best possible")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
