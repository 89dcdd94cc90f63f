"""Peers as real OS processes: exact generation across three processes, and a SIGKILL mid-generation."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec
from openhydra.runtime.sampling import SamplingParams
from openhydra.testing import forkserver
from openhydra.testing.processes import ready_fields, terminate_all

SPLITS = [(0, 3), (3, 4), (4, 8)]  # qwen3_5: cuts linear|full and full|linear
READY_TIMEOUT_S = 120.0


def _spawn(model_dir: Path, start: int, end: int, dtype: str = "float32") -> forkserver.Process:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--model-dir", str(model_dir), "--start", str(start), "--end", str(end), "--host", "127.0.0.1",
            "--port", "0", "--dtype", dtype]
    return forkserver.spawn("openhydra.peer.server", args, env=env, stdout_pipe=True, stderr_null=True)


def _wait_ready(proc: forkserver.Process, start: int, end: int) -> str:
    fields = ready_fields(proc, READY_TIMEOUT_S)
    if fields is not None:
        return fields[0]
    proc.kill()
    raise RuntimeError(f"peer [{start},{end}) did not start (exit code {proc.poll()})")


@pytest.fixture
def peer_processes(tiny_model_dirs) -> Iterator[tuple[list[forkserver.Process], list[HopSpec]]]:
    procs: list[forkserver.Process] = []
    route: list[HopSpec] = []
    try:
        procs.extend(_spawn(tiny_model_dirs["qwen3_5"], start, end) for start, end in SPLITS)  # start in parallel
        for proc, (start, end) in zip(procs, SPLITS, strict=True):
            route.append(HopSpec(address=_wait_ready(proc, start, end), start=start, end=end))
        yield procs, route
    finally:
        terminate_all(procs)


@pytest.mark.slow
def test_three_processes_generate_exactly_then_survive_a_kill(tiny_model_dirs, peer_processes) -> None:
    procs, route = peer_processes
    prompt = torch.randint(3, 4000, (13,), generator=torch.Generator().manual_seed(21)).tolist()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3_5"]).eval()
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    expected = expected[0, len(prompt) :].tolist()

    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=15.0))
    try:
        tokens: list[int] = []
        feed, pos = prompt, 0
        for step in range(16):
            tokens.append(client.step("proc", feed, pos, SamplingParams(), step))
            pos += len(feed)
            feed = [tokens[-1]]
        assert tokens == expected

        # A hung last peer (SIGSTOP) sends no failure: the decode step's adaptive deadline (its 4 s floor,
        # not the 120 s step timeout) passes and the probe blames it.
        # (a 3 s probe timeout: the working hops' answers must not be late on a loaded machine)
        hung = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=120.0, decode_timeout_s=4.0,
                                                              probe_timeout_s=3.0, unary_timeout_s=1.0))
        try:
            hung.step("hung", prompt, 0, SamplingParams(), 0)
            hung.step("hung", [5], len(prompt), SamplingParams(), 1)
            procs[2].send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(HopError) as info:
                hung.step("hung", [5], len(prompt) + 1, SamplingParams(), 2)
            assert time.monotonic() - started < 20.0
            assert info.value.address == route[2].address
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            procs[2].send_signal(signal.SIGCONT)
            hung.shutdown()

        # SIGKILL the middle peer mid-generation: the next step fails fast, blaming exactly that hop.
        client.step("proc", feed, pos, SamplingParams(), 16)  # the resumed last peer serves again
        procs[1].kill()
        procs[1].wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(HopError) as info:
            client.step("proc", feed, pos + 1, SamplingParams(), 17)
        assert time.monotonic() - started < 10.0
        assert info.value.address == route[1].address
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert client.info(route[0].address).start == 0  # the surviving peers still answer
    finally:
        client.shutdown()
