"""Where a ``privacy=onion`` token costs more than a ``privacy=off`` one, measured without trusting wall time.

The same two 3-peer SmolLM2 swarms as bench/bench_privacy.py. For each arm, generations of ``--short`` and
``--long`` tokens alternate, and around each one every thread of the arm's three node processes is read from
``/proc/<pid>/task/<tid>/{schedstat,status}``: CPU time (ns, from the scheduler) and context switches. The
marginal cost of one decode token is (long - short) / (long tokens - short tokens): prefill, session setup and
the HTTP request cancel out. CPU time and switch counts are what a token costs whatever else the machine runs,
so this works on a loaded machine where tok/s does not.

    python bench/profile_privacy.py --repeats 5 --short 16 --long 80 --dtype float32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.machine import announce

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_api_vs_generate import api_decode_rate  # noqa: E402

SPANS = [(0, 10), (10, 20), (20, 30)]
ARMS = ("privacy=off", "privacy=onion")
NODE_NAMES = ("A (coordinator + layers 0-10)", "B (layers 10-20)", "C (layers 20-30)")


NAME_THREADS = """
import ctypes, threading
_libc = ctypes.CDLL(None)
_run = threading.Thread.run
def _named_run(self):
    name = self.name if len(self.name) <= 15 else self.name[:6] + self.name[-9:]
    _libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME: /proc/<pid>/task/<tid>/comm
    _run(self)
threading.Thread.run = _named_run
"""
"""A sitecustomize for the profiled nodes: each Python thread's name becomes its OS thread name (comm)."""


def thread_counters(pid: int) -> dict[tuple[int, str], tuple[int, int, int]]:
    """(tid, comm) -> (cpu ns, voluntary switches, involuntary switches) for every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/schedstat") as f:
                cpu_ns = int(f.read().split()[0])
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
            fields = {}
            with open(f"{base}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        out[(int(tid), comm)] = (cpu_ns, int(fields["voluntary_ctxt_switches"]),
                                 int(fields["nonvoluntary_ctxt_switches"]))
    return out


def process_counters(pids: list[int]) -> dict[int, dict[tuple[int, str], tuple[int, int, int]]]:
    return {pid: thread_counters(pid) for pid in pids}


def delta(before: dict, after: dict) -> dict[int, dict[tuple[int, str], tuple[int, int, int]]]:
    out = {}
    for pid, threads in after.items():
        old = before.get(pid, {})
        out[pid] = {key: tuple(a - b for a, b in zip(value, old.get(key, (0, 0, 0)), strict=True))
                    for key, value in threads.items()}
    return out


def measure(url: str, model: str, messages: list[dict], tokens: int, pids: list[int]) -> tuple[dict, float]:
    before = process_counters(pids)
    rate = api_decode_rate(url, model, messages, tokens)
    return delta(before, process_counters(pids)), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", type=int, default=16)
    parser.add_argument("--long", type=int, default=80)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", action="store_true", help="also print each thread's marginal cost")
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    model = model_dir.name
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="profile-privacy-"))
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(NAME_THREADS)
    path = os.pathsep.join(p for p in (str(work / "site"), os.environ.get("PYTHONPATH")) if p)
    tokens = args.long - args.short
    # arm -> node index -> per repeat: (cpu ms per token, voluntary switches per token, involuntary per token)
    per_node: dict[str, dict[int, list[tuple[float, float, float]]]] = {a: defaultdict(list) for a in ARMS}
    per_thread: dict[str, dict[tuple[int, str], list[tuple[float, float]]]] = {a: defaultdict(list) for a in ARMS}
    walls: dict[str, list[float]] = {a: [] for a in ARMS}
    with DhtProcess() as dht_off, DhtProcess() as dht_onion:
        def node(arm: str, dht_url: str, a: int, b: int) -> NodeProcess:
            overrides = swarm_node_overrides(model_dir, dht_url, a, b, work / f"{arm[8:]}{a}", dtype=args.dtype)
            return NodeProcess([*overrides, arm], threads=1, env={"PYTHONPATH": path})

        swarms = {arm: [node(arm, dht.url, a, b) for a, b in SPANS]
                  for arm, dht in zip(ARMS, (dht_off, dht_onion), strict=True)}
        nodes = [n for swarm in swarms.values() for n in swarm]
        try:
            start_all(nodes)
            for swarm in swarms.values():
                api_decode_rate(swarm[0].url, model, messages, 8)  # warm-up
            for repeat in range(args.repeats):
                for arm in (ARMS if repeat % 2 == 0 else tuple(reversed(ARMS))):
                    swarm = swarms[arm]
                    pids = [n.proc.pid for n in swarm]
                    short, _ = measure(swarm[0].url, model, messages, args.short, pids)
                    long, rate = measure(swarm[0].url, model, messages, args.long, pids)
                    walls[arm].append(1000 / rate)
                    for i, pid in enumerate(pids):
                        sums = [sum(v[k] for v in long[pid].values()) - sum(v[k] for v in short[pid].values())
                                for k in range(3)]
                        per_node[arm][i].append((sums[0] / 1e6 / tokens, sums[1] / tokens, sums[2] / tokens))
                        by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
                        for sign, counters in ((1, long[pid]), (-1, short[pid])):
                            for (_tid, comm), value in counters.items():
                                by_name[comm][0] += sign * value[0] / 1e6 / tokens
                                by_name[comm][1] += sign * value[1] / tokens
                        for comm, costs in by_name.items():
                            per_thread[arm][(i, comm)].append(tuple(costs))
                    cpu = sum(per_node[arm][i][-1][0] for i in range(3))
                    print(f"repeat {repeat} {arm:14s} cpu {cpu:6.2f} ms/token  wall {1000 / rate:6.2f} ms/token",
                          flush=True)
        finally:
            for n in nodes:
                n.stop()

    print(f"\nmarginal cost of one decode token (median of {args.repeats}; {args.long} - {args.short} tokens, "
          f"{args.dtype}, 1 thread per process; load {os.getloadavg()[0]:.2f})\n")
    print("| node | arm | CPU ms/token | voluntary switches/token | involuntary/token |\n|---|---|---|---|---|")
    totals = {}
    for arm in ARMS:
        total = 0.0
        for i, name in enumerate(NODE_NAMES):
            cpu, vol, invol = (statistics.median(v[k] for v in per_node[arm][i]) for k in range(3))
            total += cpu
            print(f"| {name} | {arm} | {cpu:.3f} | {vol:.1f} | {invol:.1f} |")
        totals[arm] = total
    for arm in ARMS:
        print(f"| all three | {arm} | {totals[arm]:.3f} | | |")
    wall = {arm: statistics.median(walls[arm]) for arm in ARMS}
    print(f"\nonion - off: {totals['privacy=onion'] - totals['privacy=off']:+.3f} CPU ms/token; wall ms/token "
          f"median off {wall['privacy=off']:.2f}, onion {wall['privacy=onion']:.2f}")
    if args.threads:
        print("\n| node | thread (name, 15 characters) | CPU ms/token off | onion | sleeps/token off | onion |")
        print("|---|---|---|---|---|---|")
        for i, comm in sorted({key for arm in ARMS for key in per_thread[arm]}):
            cpu, sleeps = ([statistics.median(v[k] for v in per_thread[arm].get((i, comm), [(0.0, 0.0)]))
                            for arm in ARMS] for k in (0, 1))
            if max(abs(c) for c in cpu) >= 0.01 or max(abs(c) for c in sleeps) >= 0.1:
                print(f"| {'ABC'[i]} | {comm} | {cpu[0]:.3f} | {cpu[1]:.3f} | {sleeps[0]:.2f} | {sleeps[1]:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
