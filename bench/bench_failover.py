"""Failover under repeated faults: kill (or stop) the middle replica of the chain mid-stream, many times.

Topology (node processes, HTTP DHT on loopback): a coordinator holding the first span, the middle span on
two replicas, and the last span on one node (SmolLM2: [0,10) [10,20)x2 [20,30); the tiny model: [0,3)
[3,5)x2 [5,8)). Each trial streams ``--tokens`` greedy tokens through the official ``openai`` client and,
once the coordinator has run step ``k`` (about token k; k in ``--at``, interleaved across trials; since
2026-12-04 the coordinator's step counter, before that the client's token arrival), sends ``--signal`` to the
replica the session runs through: ``kill`` (SIGKILL, the replica is restarted before the next trial, same identity,
new port) or ``stop`` (SIGSTOP, SIGCONT once the stream ended). Per trial it records whether the stream
completed with exactly the no-fault text, the stall (largest gap between consecutive tokens), the
failovers and replays the coordinator counted, and which replica served after the fault.

    python bench/bench_failover.py --model-dir smollm2 --trials 20 --at 1 20 50 --signal kill
    python bench/bench_failover.py --model-dir smollm2 --trials 10 --at 20 --signal stop

Prints the load average, CPU and versions with the table; writes JSON and a PNG under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_model_dir, machine_banner
from openhydra.testing.failover import fault_trial, stream, wait_routable
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides


def spans_for(num_layers: int) -> list[tuple[int, int]]:
    a, b = num_layers // 3, 2 * num_layers // 3
    return [(0, a), (a, b), (a, b), (b, num_layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--trials", type=int, default=20, help="trials per fault position")
    parser.add_argument("--at", type=int, nargs="+", default=[1, 20, 50], help="token numbers to fault at")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--signal", choices=["kill", "stop"], default="kill")
    parser.add_argument("--out", default="bench/results/failover")
    parser.add_argument("--retain-mb", type=float, default=256.0,
                        help="peer.retain_activations_mb: 0 turns the failover rebuild off (full replays)")
    args = parser.parse_args()

    model_dir = Path(bench_model_dir(args.model_dir))
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    spans = spans_for(num_layers)
    middle = spans[1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_banner(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    trials: list[dict] = []
    with DhtProcess() as dht:
        retain = f"peer.retain_activations_mb={args.retain_mb}"
        nodes = [NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, work / f"n{i}", dtype=args.dtype),
                              retain], log_path=work / f"n{i}.log") for i, (a, b) in enumerate(spans)]
        coordinator, replicas = nodes[0], nodes[1:3]
        try:
            start_all(nodes)
            for replica in replicas:
                wait_routable(coordinator, replica, middle, 60)
            model = httpx.get(coordinator.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            clean = stream(coordinator, model, args.tokens)
            assert clean.error is None and clean.completion_tokens == args.tokens, clean.error
            gaps = [b - a for a, b in zip(clean.times[1:], clean.times[2:], strict=False)]
            median_ms = statistics.median(gaps) * 1e3
            print(f"no-fault run: {clean.completion_tokens} tokens, median inter-token {median_ms:.0f} ms", flush=True)
            for trial in range(args.trials):
                for at in args.at if trial % 2 == 0 else list(reversed(args.at)):
                    trials.append(run_trial(coordinator, replicas, model, middle, at, args, clean.text, trial))
                    print(json.dumps(trials[-1]), flush=True)
        finally:
            for node in nodes:
                if node.proc is not None and node.proc.poll() is None:
                    os.killpg(node.proc.pid, signal.SIGCONT)
                node.stop()
    report(trials, args, out, 5.0)


def run_trial(coordinator: NodeProcess, replicas: list[NodeProcess], model: str, middle: tuple[int, int], at: int,
              args, expected: str, trial: int) -> dict:
    sig = signal.SIGKILL if args.signal == "kill" else signal.SIGSTOP
    result = fault_trial(coordinator, replicas, middle, model, args.tokens, at, sig)
    victim = result.victim
    after = [t - result.faulted_at for t in result.times if result.faulted_at and t > result.faulted_at]
    record = {
        "trial": trial, "at": at, "signal": args.signal, "faulted": victim is not None, "missed": result.missed,
        "victim_port": victim.port if victim else None,
        "identical": result.text == expected and result.error is None,
        "error": result.error, "tokens": result.completion_tokens, "stall_s": round(result.stall_s, 3),
        "fault_to_next_token_s": round(after[0], 3) if after else None,
        "failovers": result.failovers, "replays": result.replays, "rebuilds": result.rebuilds,
    }
    if victim is not None:
        if args.signal == "kill":
            victim.proc.wait(timeout=30)
            began = time.monotonic()
            victim.start()
            victim.wait_ready(240)
            record["restart_s"] = round(time.monotonic() - began, 1)
        else:
            os.killpg(victim.proc.pid, signal.SIGCONT)
        record["routable_again_s"] = round(wait_routable(coordinator, victim, middle, 120), 2)
    return record


def report(trials: list[dict], args, out: Path, decode_timeout: float) -> None:
    rows = []
    print("\n| signal | fault at token | trials | faulted | complete, identical | stall p50 s | stall p95 s "
          "| stall max s | failovers/trial | replays/trial | of which rebuilds |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for at in args.at:
        ts = [t for t in trials if t["at"] == at]
        stalls = sorted(t["stall_s"] for t in ts if t["stall_s"] is not None)
        if not ts or not stalls:
            continue
        p95 = stalls[min(len(stalls) - 1, round(0.95 * (len(stalls) - 1)))]
        ok = sum(t["identical"] and t["error"] is None for t in ts)
        row = {"at": at, "trials": len(ts), "faulted": sum(t["faulted"] for t in ts), "identical": ok,
               "stall_p50_s": statistics.median(stalls), "stall_p95_s": p95, "stall_max_s": stalls[-1],
               "failovers": statistics.mean(t["failovers"] for t in ts),
               "replays": statistics.mean(t["replays"] for t in ts),
               "rebuilds": statistics.mean(t.get("rebuilds", 0.0) for t in ts)}
        rows.append(row)
        print(f"| {args.signal} | {at} | {len(ts)} | {row['faulted']} | {ok}/{len(ts)} | {row['stall_p50_s']:.2f} | "
              f"{p95:.2f} | {row['stall_max_s']:.2f} | {row['failovers']:.2f} | {row['replays']:.2f} | "
              f"{row['rebuilds']:.2f} |")
    print(f"(peer.decode_timeout_s = {decode_timeout}; {machine_banner()})")
    stem = f"bench_failover_{args.signal}" + ("_full_replay" if args.retain_mb == 0 else "")
    (out / f"{stem}.json").write_text(json.dumps({"rows": rows, "trials": trials, "banner": machine_banner(),
                                                 "args": vars(args)}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for at in args.at:
        ts = [t for t in trials if t["at"] == at]
        ax.plot([t["trial"] for t in ts], [t["stall_s"] for t in ts], "o-", label=f"{args.signal} at token {at}")
        bad = [t for t in ts if not t["identical"]]
        ax.plot([t["trial"] for t in bad], [t["stall_s"] or 0 for t in bad], "rx", markersize=10)
    if args.signal == "stop":
        ax.axhline(decode_timeout + 1, color="grey", linestyle="--", label="decode_timeout_s + 1 s")
    ax.set_xlabel("trial (replica restarted between trials)" if args.signal == "kill" else "trial")
    ax.set_ylabel("stall: largest inter-token gap, s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"failover: {args.signal} the middle replica mid-stream ({args.model_dir}); x = wrong/failed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"plot: {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
