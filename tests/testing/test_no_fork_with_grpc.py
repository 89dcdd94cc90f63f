"""No code of ours starts a subprocess through a real fork() of a process that may have used gRPC.

``subprocess`` starts a child with vfork(), which runs no fork handlers, unless it is given a ``preexec_fn``: then it
fork()s, gRPC's fork handler restarts gRPC's poller in the child, and the child closes that poller's epoll descriptor
before its exec (``close_fds``). The poller then aborts the child ("epoll_wait error: Bad file descriptor", status
-6) before the program ever runs: grpc/grpc#43055, open upstream (grpcio 1.80 to at least 1.85.4, the pinned one).
3 of 300 such forks from a process with a gRPC server and channel aborted here; 0 of 300 without ``preexec_fn``. Two
Ctrl-C tests that reset SIGINT in a ``preexec_fn`` from the pytest process (which has used gRPC) made the node look
as if it aborted at start in three CI runs. A plain ``os.fork()`` of such a process is not safe either: 5 of 300
children that only slept and exited died of SIGSEGV here. So the product forks only where gRPC has not run: a ``-m``
sweep's launcher refuses a process with ``grpc`` imported (openhydra/preload.py::fork_hazard), and hivemind's DHT
(a forked multiprocessing child) starts before the node's first gRPC server or channel (node.py::_ensure_background)."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("openhydra", "hydra_plugins", "tests", "bench", "scripts")
FORKS = {  # the os.fork() calls we have, each on a path that never has gRPC loaded or closes no descriptor
    "openhydra/sweep.py",  # a sweep's launcher: fork_hazard() refuses a process with grpc imported
    "openhydra/testing/forkserver.py",  # the test fork server: the same check before each fork
    # ledger children forked from the pytest process: safe while no gRPC channel or server is open in it (gRPC stops
    # its threads when the last one closes: 0 of 300 forks crashed after that here, 5 of 300 with one open)
    "tests/economy/test_crash.py",
}


def _scan() -> list[tuple[str, int, bool, bool]]:
    """(file relative to the repo, line, passes ``preexec_fn``, is ``os.fork()``) of every such call in our sources."""
    found = []
    for path in sorted(p for top in SOURCES if (REPO / top).is_dir() for p in (REPO / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            preexec = any(kw.arg == "preexec_fn" for kw in node.keywords)
            fork = (isinstance(node.func, ast.Attribute) and node.func.attr == "fork"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os")
            if preexec or fork:
                found.append((str(path.relative_to(REPO)), node.lineno, preexec, fork))
    return found


@functools.cache
def _calls() -> list[tuple[str, int, bool, bool]]:
    """``_scan()`` in a fresh interpreter, parsed once for both tests. Not in this process: CPython 3.11's AST
    validator keeps one recursion counter per interpreter, so ``ast.parse`` racing a compile in another thread (an
    earlier test's background thread importing a module) failed a CI run with "AST constructor recursion depth
    mismatch"."""
    script = ("import json, sys; from tests.testing.test_no_fork_with_grpc import _scan; "
              "json.dump(_scan(), sys.stdout)")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return [tuple(call) for call in json.loads(run.stdout)]


def test_no_subprocess_is_started_with_a_preexec_fn():
    offenders = [f"{path}:{line}" for path, line, preexec, _ in _calls() if preexec]
    assert not offenders, f"preexec_fn forks a process that may have used gRPC (grpc/grpc#43055): {offenders}"


def test_every_os_fork_is_one_we_checked():
    forks = {path for path, _, _, fork in _calls() if fork}
    assert forks == FORKS, f"os.fork() calls changed: {sorted(forks ^ FORKS)}: check each against gRPC's fork handler"
