"""Decode tok/s of a 3-peer loopback pipeline vs one node holding the whole model.

Both arms are real node processes driven through the streaming OpenAI API with the same prompt and
length, 1 torch thread per process, runs interleaved, medians reported. The swarm is the HTTP DHT
plus three nodes serving SmolLM2-135M layers [0,10), [10,20), [20,30); requests enter at the first.

    python bench/bench_pipeline.py --trials 7 --tokens 96 [--hardware cpu_int4 --dtype float32]
        [--halt-poll-ns 0,200000] [--before COMMIT] [--sweep]

It also prints what each node process spent in CPU per generated token (user + system, all threads, from /proc):
on a 2-core machine, where only one process of a pipeline has work at a time, that tells CPU work from waiting. And
each node's own compute per token: the time its span's decode steps took (``openhydra_peer_step_duration_seconds``,
kind decode, from its /metrics); CPU minus compute is what the hop costs that process (receiving, unsealing,
sealing, sending, the API on the first).

``--before COMMIT`` adds a third arm: the same 3-peer pipeline (its own DHT and node processes) run from a git worktree
of an earlier commit, interleaved with the others, so a change to the hop is measured against its parent side by side.

``--sweep`` adds another: the same three spans started as one ``openhydra-node -m ... shard.index=0,1,2`` sweep, whose
jobs are forked from one process and share its imported pages (openhydra/sweep.py), with its own DHT.

``--halt-poll-ns`` (a diagnosis for virtual machines; Linux guests with the ``haltpoll`` cpuidle driver, as root):
each arm also runs with ``/sys/module/haltpoll/parameters/guest_halt_poll_ns`` set to each value in turn, inside
the interleaving, and the original value is restored at the end. It is how long an idle vCPU polls before halting
(0: it halts at once, and waking it is a VM exit on the host): the pipeline's processes wait for each other every
token, so the cost of waking idle vCPUs is part of what an extra peer costs on such a machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from openhydra.testing import TEST_CACHE_ROOT

HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_api_vs_generate import api_decode_rate  # noqa: E402
from common import medians, plot_trials, print_table, run_interleaved, worktree  # noqa: E402


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decode_compute_s(url: str) -> float | None:
    """The seconds node ``url``'s span spent in decode steps so far (its /metrics), None where it reports none."""
    import httpx

    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith('openhydra_peer_step_duration_seconds_sum{kind="decode"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hardware", default="cpu", help="conf/hardware group of every node")
    parser.add_argument("--halt-poll-ns", default=None, help="comma-separated guest_halt_poll_ns values (see above)")
    parser.add_argument("--before", default=None, metavar="COMMIT",
                        help="also run the pipeline of an earlier commit (a git worktree of it), a third arm")
    parser.add_argument("--sweep", action="store_true",
                        help="also run the 3-peer pipeline as one `openhydra-node -m` sweep (jobs forked from one "
                             "process, sharing its imported pages), a further arm with its own DHT")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_pipeline.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import (
        DhtProcess,
        NodeProcess,
        consecutive_free_ports,
        start_all,
        start_sweep,
        swarm_node_overrides,
        sweep_overrides,
    )

    cache = TEST_CACHE_ROOT
    model_dir = embedded_model_dir(cache)
    model = model_dir.name
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    single = NodeProcess(["model=local", f"model.path={model_dir}", f"hardware={args.hardware}",
                          f"hardware.dtype={args.dtype}",
                          f"node.data_dir={work / 'single'}", "api.rate_limit_requests=100000"], threads=1)
    old_arm = f"3-peer pipeline ({args.before})"
    with contextlib.ExitStack() as stack:
        dht = stack.enter_context(DhtProcess())
        spans = [(0, 10), (10, 20), (20, 30)]
        swarms = {"3-peer pipeline": [
            NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, work / f"p{a}", dtype=args.dtype,
                                             hardware=args.hardware), threads=1) for a, b in spans]}
        if args.before:  # its own DHT: the two swarms must not route through each other's peers
            tree, old_dht = stack.enter_context(worktree(args.before, work)), stack.enter_context(DhtProcess())
            swarms[old_arm] = [NodeProcess(swarm_node_overrides(model_dir, old_dht.url, a, b, work / f"b{a}",
                                                               dtype=args.dtype, hardware=args.hardware),
                                          threads=1, env={"PYTHONPATH": str(tree)}, cwd=tree) for a, b in spans]
        sweep_arm, launcher = "3-peer sweep (forked jobs)", None
        if args.sweep:  # job k serves its API on the launcher's port + k (openhydra/sweep.py)
            sweep_dht = stack.enter_context(DhtProcess())
            launcher = NodeProcess(sweep_overrides(model_dir, sweep_dht.url, work / "sweep", len(spans),
                                                   dtype=args.dtype, hardware=args.hardware),
                                   port=consecutive_free_ports(len(spans)), threads=1, log_path=work / "sweep.log")
        everyone = [single, *(node for nodes in swarms.values() for node in nodes)]
        try:
            start_all(everyone)
            urls = {"single node": single.url, **{name: nodes[0].url for name, nodes in swarms.items()}}
            pids = {"single node": [single.proc.pid],
                    **{name: [p.proc.pid for p in nodes] for name, nodes in swarms.items()}}
            node_urls = {"single node": [single.url],
                         **{name: [p.url for p in nodes] for name, nodes in swarms.items()}}
            if launcher is not None:
                everyone.append(launcher)
                urls[sweep_arm], pids[sweep_arm] = launcher.url, start_sweep(launcher, len(spans))
                node_urls[sweep_arm] = [f"http://127.0.0.1:{launcher.port + k}" for k in range(len(spans))]
            cpu: dict[str, list[list[float]]] = {name: [] for name in urls}  # per call: CPU ms per token per node
            compute: dict[str, list[list[float | None]]] = {name: [] for name in urls}  # decode compute ms per token
            for url in urls.values():
                api_decode_rate(url, model, messages, 8)  # warm-up
            polls = [None] if args.halt_poll_ns is None else [int(v) for v in args.halt_poll_ns.split(",")]

            def arm(name: str, url: str, poll: int | None):
                def run() -> float:
                    if poll is not None:
                        HALT_POLL.write_text(str(poll))
                    before = [process_cpu_s(pid) for pid in pids[name]]
                    stepped = [decode_compute_s(u) for u in node_urls[name]]
                    rate = api_decode_rate(url, model, messages, args.tokens)
                    cpu[name].append([(process_cpu_s(pid) - b) * 1e3 / args.tokens
                                      for pid, b in zip(pids[name], before, strict=True)])
                    compute[name].append([None if b is None else (decode_compute_s(u) - b) * 1e3 / args.tokens
                                          for u, b in zip(node_urls[name], stepped, strict=True)])
                    return rate

                return run

            arms = {name + ("" if poll is None else f" @ halt poll {poll} ns"): arm(name, url, poll)
                    for poll in polls for name, url in urls.items()}
            original = HALT_POLL.read_text().strip() if args.halt_poll_ns is not None else None
            try:
                rates = run_interleaved(arms, args.trials)
            finally:
                if original is not None:
                    HALT_POLL.write_text(original)
        finally:
            for node in everyone:
                node.stop()
    med = medians(rates)
    print_table(rates)
    ratios = []
    for poll in polls:
        suffix = "" if poll is None else f" @ halt poll {poll} ns"
        single_rate, pipeline_rate = med["single node" + suffix], med["3-peer pipeline" + suffix]
        ratio = pipeline_rate / single_rate
        per_trial = statistics.median(p / s for s, p in zip(rates["single node" + suffix],
                                                             rates["3-peer pipeline" + suffix], strict=True))
        ratios.append(f"{ratio:.2f}{suffix}")
        print(f"\nratio pipeline/single{suffix} = {ratio:.3f} (per-trial median {per_trial:.3f}); extra per token = "
              f"{1000 / pipeline_rate - 1000 / single_rate:.2f} ms for 3 hops + reply")
    if args.sweep:
        forked, separate = rates[sweep_arm], rates["3-peer pipeline"]
        print(f"3-peer sweep / 3-peer separate processes = "
              f"{statistics.median(forked) / statistics.median(separate):.3f} (per-trial median "
              f"{statistics.median(f / p for f, p in zip(forked, separate, strict=True)):.3f}); sweep / single = "
              f"{statistics.median(forked) / med['single node']:.3f}")
    if args.before:
        now, then = rates["3-peer pipeline"], rates[old_arm]
        print(f"3-peer pipeline now / {args.before} = {statistics.median(now) / statistics.median(then):.3f} "
              f"(per-trial median {statistics.median(n / o for n, o in zip(now, then, strict=True)):.3f}); "
              f"{1000 / statistics.median(then) - 1000 / statistics.median(now):.2f} ms less per token")
    for name, calls in cpu.items():  # what each process spent, whatever the wall clock did meanwhile
        per_node = [statistics.median(call[i] for call in calls) for i in range(len(calls[0]))]
        print(f"CPU per token (ms, median over calls, prefill and HTTP included), {name}: "
              f"{' + '.join(f'{c:.2f}' for c in per_node)} = {sum(per_node):.2f}")
        if all(v is not None for call in compute[name] for v in call):  # a single node's span is no peer's: 0
            spans_ms = [statistics.median(call[i] for call in compute[name]) for i in range(len(per_node))]
            if not any(spans_ms):
                continue
            print(f"  its span's decode compute per token (ms, /metrics): "
                  f"{' + '.join(f'{c:.2f}' for c in spans_ms)} = {sum(spans_ms):.2f}; CPU beyond it "
                  f"{' + '.join(f'{c - k:.2f}' for c, k in zip(per_node, spans_ms, strict=True))}")
    print(f"[hardware={args.hardware}, {args.dtype}, 1 thread per process, tokens={args.tokens}, trials={args.trials}]")
    plot_trials(rates, f"SmolLM2-135M {args.hardware} {args.dtype}: pipeline/single = {', '.join(ratios)}", args.plot)


if __name__ == "__main__":
    sys.exit(main())
