"""The bit-for-bit exactness tests hold on MKL's other code path too.

MKL picks its kernels by CPU vendor: on an AMD CPU it takes one path, on an Intel CPU another, and the two round
some products differently (bench/probe_blas_alignment.py: on this project's AMD machines the AMD path's sgemm bits
depend on operand alignment; the Intel path's did not). CI machines come with either vendor, and a test that
passes on the one a developer has failed on the other (2026-12-06: tests/runtime/test_shard_exactness.py, 4.8e-7).

On an AMD CPU this test runs the tiny-model exactness tests again in a fresh interpreter with MKL told the CPU is an
Intel one: a preloaded shim answers MKL's own vendor checks (``mkl_serv_intel_cpu_true`` and two others, exported by
torch's libtorch_cpu). On an Intel CPU the suite already runs that path, so it is skipped there."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openhydra.hardware.cpuinfo import cpu_vendor
from tests.runtime.preload import build_preload

REPO = Path(__file__).resolve().parents[2]
EXACTNESS_TESTS = [
    "tests/runtime/test_shard_exactness.py",  # spans against transformers' own model, fp32 and bf16
    "tests/runtime/test_lean_layers.py",  # the lean decode step against transformers' layers, bit for bit
    "tests/speculative/test_verify_exact.py",  # a verify's positions against plain decode steps
]
SHIM = """
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_cpuiszen(void) { return 0; }
"""




@pytest.mark.slow
def test_exactness_tests_pass_on_mkls_intel_path_too(tmp_path: Path) -> None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("MKL's vendor paths are an x86-64 Linux matter here")
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        pytest.skip("this torch does not use MKL")
    if cpu_vendor() != "AuthenticAMD":
        pytest.skip(f"CPU vendor {cpu_vendor() or 'unknown'}: the suite itself runs MKL's path for it")
    shim = build_preload(tmp_path, "mkl_intel_path", SHIM)
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not hasattr(ctypes.CDLL(str(library)), "mkl_serv_intel_cpu_true"):
        pytest.skip("this torch's MKL does not export its vendor check: nothing to preload over")

    env = {**os.environ, "LD_PRELOAD": str(shim), "OMP_NUM_THREADS": "1"}
    # the shim is what the child's MKL asks: the preloaded definition comes first in the symbol lookup
    probe = "import ctypes, torch; print(ctypes.CDLL(None).mkl_serv_intel_cpu_true())"
    answer = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "1", answer.stderr

    # the int4/int8 variants compute on OpenHydra's own low-bit kernel, not MKL: the same bits either way
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         "-k", "not int4 and not int8", *EXACTNESS_TESTS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert run.returncode == 0, f"the exactness tests fail on MKL's Intel path:\n{tail}"
    assert passed is not None and int(passed.group(1)) >= 30, tail
