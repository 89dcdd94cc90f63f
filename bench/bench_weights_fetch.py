"""Weights from the swarm (issue 19): fetch throughput on loopback vs a plain copy of the same bytes.

Sources are weights-only seeder processes (``python -m openhydra.weights.serve``, unpaced) holding the embedded
SmolLM2 (fp32, converted once into the test cache). The fetcher (openhydra/weights/fetch.py: parallel workers,
SHA-256 per 1 MiB chunk, pwrite into a sparse checkpoint) pulls the span ``--start..--end`` from 1, 2 or 4
sources; the baseline copies exactly the same byte ranges from the source folder with pread/pwrite (page cache
warm for both, no hashing, no network). Runs are interleaved (copy, 1, 2, 4, copy, ...) and medians reported.
Verification cost: SHA-256 of every chunk of the span, CPU seconds (``time.process_time``) on one thread.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_weights_fetch.py --reps 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openhydra.runtime.source import embedded_model_dir
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.machine import announce
from openhydra.weights.fetch import Source, SpanFetcher
from openhydra.weights.manifest import ensure_manifest


def start_seeders(folder: Path, n: int, mbps: float) -> tuple[list[subprocess.Popen], list[str]]:
    procs, addresses = [], []
    for _ in range(n):
        proc = subprocess.Popen([sys.executable, "-m", "openhydra.weights.serve", "--folder", str(folder),
                                 "--mbps", str(mbps)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"seeder did not start: {line!r}")
        procs.append(proc)
        addresses.append(line.split()[1])
    return procs, addresses


def plain_copy(folder: Path, signed, span: tuple[int, int], out: Path) -> float:
    started = time.perf_counter()
    fds = {}
    for entry in signed.manifest.files:
        fd = os.open(out / entry.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, entry.size)
        fds[entry.path] = fd
    for chunk in signed.manifest.chunks(span):
        with open(folder / chunk.path, "rb") as f:
            os.pwrite(fds[chunk.path], os.pread(f.fileno(), chunk.length, chunk.offset), chunk.offset)
    for fd in fds.values():
        os.close(fd)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--start", type=int, default=5)
    parser.add_argument("--end", type=int, default=15)
    parser.add_argument("--sources", default="1,2,4")
    parser.add_argument("--mbps", type=float, default=0.0, help="each seeder's cap (peer.share_weights_mbps; 0: none)")
    parser.add_argument("--png", type=Path, default=Path("docs/img/bench_weights_fetch.png"))
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    folder = embedded_model_dir(TEST_CACHE_ROOT)
    signed = ensure_manifest(folder)
    span = (args.start, args.end)
    chunks = signed.manifest.chunks(span)
    span_bytes = sum(c.length for c in chunks)
    counts = [int(x) for x in args.sources.split(",")]
    print(f"load average at start: {os.getloadavg()}", flush=True)
    print(f"span {list(span)} of SmolLM2: {span_bytes / 1e6:.1f} MB in {len(chunks)} chunks", flush=True)

    # CPU cost of verification: hash every chunk of the span (from the page cache), one thread.
    blobs_s = []
    for _ in range(3):
        cpu = time.process_time()
        for chunk in chunks:
            with open(folder / chunk.path, "rb") as f:
                data = os.pread(f.fileno(), chunk.length, chunk.offset)
            hashlib.sha256(data).hexdigest()
        blobs_s.append(time.process_time() - cpu)
    verify_cpu_s = statistics.median(blobs_s)

    procs, addresses = start_seeders(folder, max(counts), args.mbps)
    results: dict[str, list[float]] = {"copy": [], **{f"{n} peers": [] for n in counts}}
    cpu_per_fetch: dict[str, list[float]] = {f"{n} peers": [] for n in counts}
    tmp = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        for rep in range(args.reps):
            out = tmp / f"copy{rep}"
            out.mkdir()
            results["copy"].append(plain_copy(folder, signed, span, out))
            shutil.rmtree(out)
            for n in counts:
                out = tmp / f"f{n}-{rep}"
                sources = [Source(f"seed{i}", addresses[i], (0, signed.manifest.num_layers)) for i in range(n)]
                cpu = time.process_time()
                started = time.perf_counter()
                report = SpanFetcher(out, signed, span, sources, pinned=signed.content_hash,
                                     progress_every_s=60).run()
                results[f"{n} peers"].append(time.perf_counter() - started)
                cpu_per_fetch[f"{n} peers"].append(time.process_time() - cpu)
                assert report.fetched_bytes == span_bytes and not report.bad_peers
                shutil.rmtree(out)
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items())
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "seeder_mbps": args.mbps, "span": list(span), "span_mb": round(span_bytes / 1e6, 1), "reps": args.reps,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "median_mb_s": {k: round(span_bytes / 1e6 / v, 1) for k, v in med.items()},
        "ratio_vs_copy": {k: round(med["copy"] / v, 3) for k, v in med.items() if k != "copy"},
        "fetch_client_cpu_s_median": {k: round(statistics.median(v), 3) for k, v in cpu_per_fetch.items()},
        "verify_sha256_cpu_s": round(verify_cpu_s, 3),
        "verify_sha256_mb_per_cpu_s": round(span_bytes / 1e6 / verify_cpu_s, 1),
        "load_average_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary, indent=1), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(med)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(names, [span_bytes / 1e6 / med[k] for k in names], color=["grey"] + ["tab:blue"] * len(counts))
        ax.set_ylabel("MB/s (median)")
        cap = f", seeders capped at {args.mbps:g} Mbit/s" if args.mbps else ""
        ax.set_title(f"SmolLM2 layers {list(span)} ({span_bytes / 1e6:.0f} MB), loopback{cap}", fontsize=9)
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
