"""Ledger benchmark: settlements per second on SQLite and PostgreSQL, and the settlement's share of a request.

    python bench/bench_ledger.py                       # SQLite only (+ Postgres if OPENHYDRA_TEST_PG_URL)
    python bench/bench_ledger.py --pg-url postgresql://postgres@127.0.0.1:54329/openhydra_test
    python bench/bench_ledger.py --decode-ms 37        # skip the SmolLM2 measurement, use this figure

What is timed: ``Ledger.settle`` end to end for pre-signed 3-peer receipts (signature checks included:
the ledger verifies all three), one writer, fresh database per backend; then WRITERS processes
settling distinct receipts at once (throughput under lock contention). Request latency comes from a
real greedy decode of SmolLM2-135M (the embedded model, transformers, fp32, 1 thread) on this machine,
measured in the same run unless --decode-ms is given: latency(request) = TTFT + completion_tokens *
ms_per_token. Settlement is once per request, so its share is settle_ms / latency(request).
Prints a JSON summary and writes docs/img/ledger_bench.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from openhydra.testing import TEST_CACHE_ROOT

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from openhydra.crypto.identity import Identity  # noqa: E402
from openhydra.economy.ledger import Ledger  # noqa: E402
from openhydra.economy.policy import LedgerPolicy  # noqa: E402
from openhydra.economy.receipts import SettlementRequest, build_settlement  # noqa: E402
from openhydra.testing.machine import announce  # noqa: E402

PEERS = [Identity.generate() for _ in range(3)]
WRITERS = 4


def receipts(n: int, tag: str) -> list[SettlementRequest]:
    return [
        build_settlement(f"{tag}-{i}", "smollm2-135m", 256, [(PEERS[0], 10), (PEERS[1], 10), (PEERS[2], 10)])
        for i in range(n)
    ]


def fresh_url(kind: str, pg_url: str | None, tmp: Path) -> str:
    if kind.startswith("sqlite"):
        return f"sqlite:///{tmp / f'{kind}-{uuid.uuid4().hex[:6]}.db'}"
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    assert pg_url is not None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    eng = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    eng.dispose()
    return make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)


def _ledger(url: str, kind: str) -> Ledger:
    sync = "NORMAL" if kind == "sqlite-normal" else "FULL"
    return Ledger(url, LedgerPolicy(), sqlite_synchronous=sync)


def single_writer(url: str, kind: str, n: int) -> dict[str, float]:
    led = _ledger(url, kind)
    reqs = receipts(n + 5, "single")
    for r in reqs[:5]:  # warm-up: statement cache, pool, page cache
        led.settle(r)
    lat = []
    t0 = time.perf_counter()
    for r in reqs[5:]:
        t = time.perf_counter()
        led.settle(r)
        lat.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t0
    assert led.audit().ok
    led.close()
    lat.sort()
    return {
        "settlements_per_s": n / wall,
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[int(0.99 * (len(lat) - 1))],
        "mean_ms": statistics.fmean(lat),
    }


def _writer(url: str, kind: str, tag: str, n: int, barrier: Any, out: Any) -> None:
    led = _ledger(url, kind)
    reqs = receipts(n, tag)
    led.settle(receipts(1, tag + "-warm")[0])
    barrier.wait()
    t = time.perf_counter()
    for r in reqs:
        led.settle(r)
    out.put(time.perf_counter() - t)
    led.close()


def many_writers(url: str, kind: str, n_each: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(WRITERS + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, kind, f"w{i}", n_each, barrier, out)) for i in range(WRITERS)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in procs:
        out.get(timeout=600)
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    led = _ledger(url, kind)
    assert led.audit().ok
    led.close()
    return {"writers": WRITERS, "settlements_per_s": WRITERS * n_each / wall}


def measure_decode(new_tokens: int = 32) -> dict[str, float]:
    """Greedy SmolLM2-135M decode on this machine: TTFT and ms per token (fp32, 1 thread)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openhydra.runtime.source import embedded_model_dir

    torch.set_num_threads(1)
    path = embedded_model_dir(TEST_CACHE_ROOT)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("Explain what a ledger is in one paragraph.", return_tensors="pt")

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return (time.perf_counter() - t) * 1e3

    run(4)  # warm-up
    ttft = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(new_tokens + 1) for _ in range(3))
    return {"ttft_ms": ttft, "ms_per_token": (full - ttft) / new_tokens, "source": "measured"}


def plot(results: dict[str, Any], decode: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    single = [results[k]["single"]["settlements_per_s"] for k in kinds]
    multi = [results[k]["writers"]["settlements_per_s"] for k in kinds]
    x = range(len(kinds))
    ax1.bar([i - 0.2 for i in x], single, 0.4, label="1 writer")
    ax1.bar([i + 0.2 for i in x], multi, 0.4, label=f"{WRITERS} writer processes")
    ax1.set_xticks(list(x), kinds)
    ax1.set_ylabel("settlements / s")
    ax1.set_title(f"Ledger throughput (3-peer signed receipts), load avg {os.getloadavg()[0]:.1f}", fontsize=10)
    ax1.legend()
    tokens = [16, 32, 64, 128, 256, 512]
    for k in kinds:
        ms = results[k]["single"]["p50_ms"]
        share = [100 * ms / (decode["ttft_ms"] + t * decode["ms_per_token"]) for t in tokens]
        ax2.plot(tokens, share, marker="o", label=f"{k} (p50 {ms:.1f} ms)")
    ax2.axhline(1.0, color="red", linestyle="--", label="1% target")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("completion tokens per request")
    ax2.set_ylabel("settlement / request latency (%)")
    ax2.set_title(f"SmolLM2-135M: {decode['ms_per_token']:.0f} ms/token, TTFT {decode['ttft_ms']:.0f} ms")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pg-url", default=os.environ.get("OPENHYDRA_TEST_PG_URL"))
    ap.add_argument("-n", type=int, default=300, help="settlements for the single-writer run")
    ap.add_argument("--n-each", type=int, default=100, help="settlements per writer process")
    ap.add_argument("--decode-ms", type=float, default=None, help="ms/token instead of measuring SmolLM2")
    ap.add_argument("--ttft-ms", type=float, default=75.0, help="TTFT used with --decode-ms")
    ap.add_argument("--completion-tokens", type=int, default=128)
    ap.add_argument("--plot", type=Path, default=REPO / "docs/img/ledger_bench.png")
    args = ap.parse_args()
    announce()  # the machine, its load and the versions, printed with the result

    kinds = ["sqlite", "sqlite-normal"] + (["postgres"] if args.pg_url else [])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            results[kind] = {
                "single": single_writer(fresh_url(kind, args.pg_url, Path(tmp)), kind, args.n),
                "writers": many_writers(fresh_url(kind, args.pg_url, Path(tmp)), kind, args.n_each),
            }
            print(f"{kind}: {json.dumps(results[kind])}", file=sys.stderr)
    if args.decode_ms is None:
        decode = measure_decode()
    else:
        decode = {"ttft_ms": args.ttft_ms, "ms_per_token": args.decode_ms, "source": "given"}
    request_ms = decode["ttft_ms"] + args.completion_tokens * decode["ms_per_token"]
    for kind in kinds:
        p50 = results[kind]["single"]["p50_ms"]
        results[kind]["share_of_request_pct"] = 100 * p50 / request_ms
        results[kind]["share_16_tokens_pct"] = 100 * p50 / (decode["ttft_ms"] + 16 * decode["ms_per_token"])
    summary = {
        "decode": decode,
        "request": {"completion_tokens": args.completion_tokens, "latency_ms": request_ms},
        "backends": results,
        "load_avg_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))
    plot(results, decode, args.plot)
    print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
