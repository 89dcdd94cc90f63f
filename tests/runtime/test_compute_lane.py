"""The compute lane (runtime/compute_lane.py): one thread per process runs a multi-threaded CPU node's compute.

Unit tests of the lane itself, then the invariant on real node processes: with ``hardware.threads=2`` exactly one
thread of the node ever starts an OpenMP parallel region of more than one thread (a preloaded shim around
libgomp's ``GOMP_parallel`` logs every thread that does), whatever the serving mode, and the text is the text of a
one-thread node (``cpu_int4``: the low-bit kernel's rows do not depend on the thread count)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from openhydra.runtime import compute_lane, lowbit
from openhydra.testing.processes import NodeProcess, start_all
from tests.runtime.preload import build_preload


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    compute_lane.install(1)  # closes any lane this test started
    torch.set_num_threads(before)


def _in_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def test_lane_has_the_threads_and_every_other_thread_one(restore_threads) -> None:
    if compute_lane.openmp_runtime() is None:
        pytest.skip("no OpenMP runtime loaded by torch here")
    lane = compute_lane.install(2)
    assert lane is not None and lane.effective == 2 and compute_lane.current() is lane
    assert lane.run(torch.get_num_threads) == 2
    assert torch.get_num_threads() == 1  # this thread
    assert _in_thread(torch.get_num_threads) == 1  # a thread started later
    assert compute_lane.process_threads() == 2
    assert compute_lane.status() == {"threads": 2, "lane": True, "lane_calls": lane.jobs}
    # the same lane for the same count; a new one for another; none for one thread
    assert compute_lane.install(2) is lane
    jobs = lane.jobs
    assert compute_lane.run(lambda: threading.get_ident()) == lane.ident and lane.jobs == jobs + 1
    assert compute_lane.install(1) is None and compute_lane.current() is None
    assert torch.get_num_threads() == 1 and compute_lane.run(threading.get_ident) == threading.get_ident()


def test_lane_runs_nested_calls_in_place_and_hands_back_errors(restore_threads) -> None:
    if compute_lane.openmp_runtime() is None:
        pytest.skip("no OpenMP runtime loaded by torch here")
    lane = compute_lane.install(2)
    assert lane is not None
    # a call made on the lane runs there at once (no deadlock on the single worker)
    assert lane.run(lambda: lane.run(lambda: threading.get_ident())) == lane.ident

    def fails() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        lane.run(fails)
    with pytest.raises(ValueError, match="bad input"):
        lane.run(lambda: lane.run(fails))
    assert lane.run(lambda: 7) == 7  # the lane survives its callers' errors


def test_switched_off_means_threads_everywhere(restore_threads, monkeypatch) -> None:
    monkeypatch.setenv(compute_lane.ENV_SWITCH, "0")
    assert compute_lane.install(2) is None and compute_lane.current() is None
    assert torch.get_num_threads() == 2 and _in_thread(torch.get_num_threads) == 2
    assert compute_lane.status() == {"threads": 2, "lane": False, "lane_calls": 0}


def test_kernel_matmul_on_the_lane_uses_its_threads_with_the_same_bits(restore_threads) -> None:
    """The low-bit kernel takes its thread count from the calling thread (torch.get_num_threads): the lane's on
    the lane, one elsewhere, and the same bits either way."""
    lib = lowbit.kernel()
    if lib is None or compute_lane.openmp_runtime() is None:
        pytest.skip("no low-bit kernel or OpenMP runtime here")
    from openhydra.runtime.quant_cpu import Int4WeightOnlyLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=False)
    quantized = Int4WeightOnlyLinear(linear)
    if quantized.lowbit is None:
        pytest.skip("this weight does not run on the low-bit kernel")
    x = torch.randn(5, 256)
    alone = quantized(x)
    lane = compute_lane.install(2)
    assert lane is not None
    assert torch.equal(lane.run(quantized, x), alone) and torch.equal(quantized(x), alone)


def test_span_steps_and_the_coordinators_head_run_on_the_lane(restore_threads, tiny_model_dirs) -> None:
    """ShardRuntime.forward from any thread, and the coordinator-side head (peer/head.py), run on the lane with the
    bits they have with the same thread count without it (tiny Llama, fp32)."""
    if compute_lane.openmp_runtime() is None:
        pytest.skip("no OpenMP runtime loaded by torch here")
    from openhydra.peer.head import load_head
    from openhydra.runtime.shard import ShardRuntime

    model_dir = tiny_model_dirs["llama"]
    ids = torch.tensor([3, 14, 15, 92, 65])
    runtime = ShardRuntime(model_dir, dtype=torch.float32)
    head = load_head(model_dir)
    hidden = torch.randn(2, runtime.hidden_size)
    torch.set_num_threads(2)  # a dense matmul's bits depend on the thread count: the reference has the lane's 2
    alone = runtime.forward("a", torch.arange(5), input_ids=ids), head(hidden)
    lane = compute_lane.install(2)
    assert lane is not None
    before = lane.jobs
    seen: list[int] = []
    original = runtime._check_positions

    def spy(positions):
        seen.append(threading.get_ident())
        return original(positions)

    runtime._check_positions = spy
    laned = _in_thread(lambda: runtime.forward("b", torch.arange(5), input_ids=ids)), head(hidden)
    assert seen == [lane.ident] and lane.jobs == before + 2
    assert torch.equal(laned[0], alone[0]) and torch.equal(laned[1], alone[1])


# ---- real node processes ----------------------------------------------------------------------------------------

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
extern int omp_get_max_threads(void);
static __thread int seen;
typedef void (*parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) {
    static parallel_fn real;
    if (!real) real = (parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
    unsigned n = num_threads ? num_threads : (unsigned)omp_get_max_threads();
    if (n > 1 && !seen) {
        seen = 1;
        fprintf(stderr, "OPENMP-MASTER tid=%ld threads=%u\n", (long)syscall(SYS_gettid), n);
    }
    real(fn, data, num_threads, flags);
}
"""
MASTER = re.compile(r"OPENMP-MASTER tid=(\d+) threads=(\d+)")


def _complete(url: str, prompt: str, tokens: int) -> str:
    body = {"model": "openhydra-smollm2-135m", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_a_two_thread_node_has_one_openmp_master(smollm2_dir, tmp_path) -> None:
    if compute_lane.openmp_runtime() is None or "libgomp" not in Path("/proc/self/maps").read_text():
        pytest.skip("torch here does not use GNU OpenMP (the shim wraps libgomp)")
    shim = build_preload(tmp_path, "GOMP_parallel", SHIM, ("-O2", "-fopenmp"), ("-ldl",))
    base = ["model=smollm2-135m", "hardware=cpu_int4", "hardware.dtype=float32",
            "api.rate_limit_requests=100000", "privacy=off"]
    nodes = {
        serving: NodeProcess([*base, f"serving={serving}", f"node.data_dir={tmp_path / serving}"], threads=2,
                             env={"LD_PRELOAD": str(shim)}, log_path=tmp_path / f"{serving}.log")
        for serving in ("off", "batched")
    }
    single = NodeProcess([*base, "serving=off", f"node.data_dir={tmp_path / 'single'}"], threads=1,
                         log_path=tmp_path / "single.log")
    prompts = [f"Tell me about {topic}." for topic in ("a lighthouse", "bees", "a river", "glass")]
    try:
        start_all([*nodes.values(), single])
        reference = [_complete(single.url, p, 12) for p in prompts]
        texts, statuses = {}, {}
        for serving, node in nodes.items():
            with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: the batched node forms batches
                texts[serving] = list(pool.map(lambda p, u=node.url: _complete(u, p, 12), prompts))
            statuses[serving] = httpx.get(node.url + "/v1/network/status", timeout=10).json()["compute"]
        logs = {serving: node.log_text() for serving, node in nodes.items()}
    finally:
        for node in (*nodes.values(), single):
            node.stop()
    for serving in nodes:
        masters = MASTER.findall(logs[serving])
        # one thread (the lane) ran every multi-threaded region: prefill, decode steps, batched steps
        assert len({tid for tid, _ in masters}) == 1, (serving, masters)
        assert {n for _, n in masters} == {"2"}
        assert statuses[serving]["lane"] is True and statuses[serving]["threads"] == 2
        assert statuses[serving]["lane_calls"] >= len(prompts) * 2, statuses[serving]  # each prompt's steps ran there
        assert texts[serving] == reference, serving  # the thread count changes no token


def test_node_process_spin_default_is_set_before_torch_only() -> None:
    """``openhydra-node`` sets GOMP_SPINCOUNT before torch loads libgomp, never over the user's setting or after."""
    code = ("import os, sys; from openhydra.runtime.compute_lane import set_spin_default; "
            "first = set_spin_default(); import torch; second = set_spin_default(); "
            "print(first, second, os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "False", compute_lane.SPIN_COUNT]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "5"]
