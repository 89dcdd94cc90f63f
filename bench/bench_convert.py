"""First start on the embedded model: GGUF -> transformers folder conversion time, each structure parsed once vs
as transformers does it (the GGUF file three times, gguf's tensor-name table once per tensor).

    python -m bench.bench_convert [--trials 3] [--plot docs/img/bench_convert.png]

Each trial converts the embedded SmolLM2 GGUF in a fresh ``python`` process per arm (one torch thread), arms
interleaved, and times the conversion call only (imports excluded). The two folders' weights must be identical.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine_banner, medians, plot_trials, print_table, run_interleaved

CHILD = """
import contextlib, sys, time
from pathlib import Path
import openhydra.runtime.convert_gguf as c
from openhydra.runtime.source import embedded_gguf_path
if sys.argv[2] == "as-transformers-does":
    c._parse_once = contextlib.nullcontext
out = Path(sys.argv[1])
out.mkdir(parents=True)
began = time.perf_counter()
c.convert_gguf(embedded_gguf_path(), out)
print("SECONDS", time.perf_counter() - began)
"""


def _convert(arm: str, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(out), arm], env=env, capture_output=True, text=True,
                         check=True)
    return float(next(line for line in run.stdout.splitlines() if line.startswith("SECONDS")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--plot", default="docs/img/bench_convert.png")
    args = parser.parse_args()
    print(machine_banner(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        counter = iter(range(10**6))

        def arm(name: str):
            return lambda: _convert(name, Path(tmp) / f"{name}-{next(counter)}")

        arms = {"parsed once": arm("parsed-once"), "as transformers does": arm("as-transformers-does")}
        times = run_interleaved(arms, args.trials, unit="s")
        from safetensors.torch import load_file

        a, b = (load_file(next(Path(tmp).glob(f"{p}-*/model.safetensors"))) for p in ("parsed-once", "as-transformers"))
        identical = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    m = medians(times)
    print_table(times, metric="median conversion s")
    print(f"\nspeed-up {m['as transformers does'] / m['parsed once']:.2f}x; weights identical: {identical}; "
          f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    plot_trials(times, "embedded SmolLM2 GGUF conversion (1 thread)", args.plot, ylabel="seconds")
    if not identical:
        raise SystemExit("the two conversions differ")


if __name__ == "__main__":
    main()
