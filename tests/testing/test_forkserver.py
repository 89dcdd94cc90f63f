"""The test suite's fork server (openhydra/testing/forkserver.py): a forked child behaves as a fresh
``python -m module`` would, for everything the tests rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from openhydra.testing import forkserver

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests.testing.forkserver_probe"


@pytest.fixture
def env(monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("OPENHYDRA_TEST_FORKSERVER", "1")
    return {**os.environ, "OPENHYDRA_PROBE_MARKER": "m1"}


def _probe(proc) -> dict:
    return json.loads(proc.stdout.readline())


def test_children_are_forked_with_their_own_env_cwd_session_and_random_state(env, tmp_path):
    children = [forkserver.spawn(PROBE, ["3"], env={**env, "OPENHYDRA_PROBE_MARKER": f"m{i}"}, stdout_pipe=True,
                                 stderr_null=True, cwd=REPO) for i in range(2)]
    assert all(isinstance(p, forkserver.ForkedProcess) for p in children)
    seen = [_probe(p) for p in children]
    assert [p.wait(timeout=60) for p in children] == [3, 3]
    assert [s["marker"] for s in seen] == ["m0", "m1"]
    for child, s in zip(children, seen, strict=True):
        assert s["pid"] == child.pid and s["sid"] == child.pid  # its own session: killpg reaches only it
        assert s["cwd"] == str(REPO) and s["argv"] == ["3"] and s["name"] == "__main__"
        assert s["sigint_default"] and s["sigterm_default"]
    for key in ("random", "numpy", "torch"):  # not the server's generator state, copied into both
        assert seen[0][key] != seen[1][key], key

    logged = forkserver.spawn(PROBE, ["0"], env=env, log_path=tmp_path / "probe.log", cwd=REPO)
    assert logged.wait(timeout=60) == 0
    text = (tmp_path / "probe.log").read_text()
    assert '"marker": "m1"' in text and "to stderr" in text  # stdout and stderr both to the log


def test_signals_and_exit_codes_read_as_popen_does(env):
    proc = forkserver.spawn(PROBE, ["0", "sleep"], env=env, stdout_pipe=True, cwd=REPO)
    _probe(proc)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    os.killpg(proc.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGCONT)
    assert proc.poll() is None  # stopped and resumed is not exited
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_signalling_a_child_the_server_has_reaped_is_no_error(env, monkeypatch):
    """The fork server reaps its children and reports their exits a moment later, so ``poll()`` can say a child runs
    when nothing is left to signal: a teardown then failed with ProcessLookupError in CI. Both ways the tests signal
    a child (its group, and the process) take that as "already gone"."""
    from openhydra.testing.processes import NodeProcess, signal_group

    proc = forkserver.spawn(PROBE, ["0", "sleep"], env=env, stdout_pipe=True, cwd=REPO)
    _probe(proc)
    assert signal_group(proc, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    monkeypatch.setattr(proc, "poll", lambda: None)  # the exit not reported yet: as poll() may still answer
    assert not signal_group(proc, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    node = NodeProcess([])
    node.proc = proc
    node.stop()  # signals nothing, reaps nothing more, raises nothing
    node.kill()


def test_a_different_import_time_environment_gets_its_own_server(env):
    a = forkserver.spawn(PROBE, ["0"], env=env, stdout_pipe=True, cwd=REPO)
    b = forkserver.spawn(PROBE, ["0"], env={**env, "TRANSFORMERS_VERBOSITY": "error"}, stdout_pipe=True, cwd=REPO)
    same = forkserver.spawn(PROBE, ["0"], env={**env, "OPENHYDRA_THREADS": "7"}, stdout_pipe=True, cwd=REPO)
    for p in (a, b, same):
        _probe(p)
        assert p.wait(timeout=60) == 0
    assert a._server is same._server  # OPENHYDRA_* is read at run time, not import time
    assert isinstance(b, forkserver.ForkedProcess) and a._server is not b._server


def test_off_means_plain_subprocesses(env, monkeypatch):
    monkeypatch.setenv("OPENHYDRA_TEST_FORKSERVER", "0")
    proc = forkserver.spawn(PROBE, ["4"], env=env, stdout_pipe=True, cwd=REPO)
    assert isinstance(proc, subprocess.Popen)
    assert _probe(proc)["marker"] == "m1"
    assert proc.wait(timeout=120) == 4


def test_openblas_threads_do_not_stop_forking_but_any_other_thread_does(env, tmp_path):
    """numpy's OpenBLAS starts worker threads at import unless told to use one; it stops them itself around a fork
    (pthread_atfork), so such a server is used (openhydra/preload.py). Any other thread (here one that a
    sitecustomize starts) makes forking unsafe: the child is a plain subprocess, and closing that server must not
    fail its reply reader (a blocked recv on a closed socket raised EBADF in the thread, which pytest reports as an
    unhandled thread exception)."""
    blas = {**env, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OPENHYDRA_PROBE_MARKER": "blas"}
    proc = forkserver.spawn(PROBE, ["0"], env=blas, stdout_pipe=True, cwd=REPO)
    assert isinstance(proc, forkserver.ForkedProcess) and _probe(proc)["marker"] == "blas"
    assert proc.wait(timeout=120) == 0

    (tmp_path / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n")
    threaded = {**env, "PYTHONPATH": os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]),
                "OPENHYDRA_PROBE_MARKER": "threads"}
    before = set(threading.enumerate())
    server = forkserver._Server({k: v for k, v in threaded.items() if not k.startswith("OPENHYDRA_")})
    (reader,) = [t for t in set(threading.enumerate()) - before if t.name == "forkserver-replies"]
    assert server.threads > 1 and not server.usable
    server.close()
    reader.join(timeout=10)
    assert not reader.is_alive() and not server._alive  # the reader ended normally and marked the server gone
    proc = forkserver.spawn(PROBE, ["0"], env=threaded, stdout_pipe=True, cwd=REPO)
    assert isinstance(proc, subprocess.Popen) and _probe(proc)["marker"] == "threads"
    assert proc.wait(timeout=120) == 0
