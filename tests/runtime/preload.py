"""A C shim built for ``LD_PRELOAD`` in a test's temporary folder (tests/runtime/test_compute_lane.py wraps libgomp,
tests/runtime/test_other_blas_path.py answers MKL's vendor checks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def build_preload(tmp_path: Path, name: str, source: str, flags: tuple[str, ...] = (),
                  libs: tuple[str, ...] = ()) -> Path:
    """``source`` compiled with ``flags`` into ``tmp_path/<name>.so`` and linked with ``libs`` (after the source, where
    the linker wants them); the test is skipped where no C compiler is installed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip(f"no C compiler to build the {name} shim")
    source_file, built = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    source_file.write_text(source)
    subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(source_file), *libs],
                   check=True, capture_output=True, timeout=120)
    return built
