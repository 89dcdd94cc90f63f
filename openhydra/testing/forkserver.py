"""A fork server for the test suite's node processes: import torch and transformers once, fork each node.

Every ``openhydra-node`` a test starts pays ~4 CPU s importing torch, transformers and the node's own modules before
it does anything; the suite starts a few hundred of them on two cores. :func:`spawn` asks a long-lived server
process (one per test process and import-relevant environment) that has imported them already to ``fork()`` a child
that runs ``python -m <module> <args>`` from there, with the test's environment, working directory and log file,
in a new session. The child is a real, separate OS process (signals, ``killpg``, SIGSTOP, exit codes behave as for
a ``subprocess.Popen``); :class:`ForkedProcess` offers the subset of Popen's interface the tests use.

Rules that keep a forked child equivalent to a fresh interpreter:

- The server only imports (no torch op runs, so no OpenMP pool exists to break in the child; no gRPC channel or
  server exists) and checks that it is still single-threaded before each fork; if not, :func:`spawn` falls back to
  ``subprocess.Popen``.
- Environment variables that libraries may read at import time (all but ``OPENHYDRA_*``, which the node reads at
  run time, and pytest's ``PYTEST_*``) select the server: a child never runs under a different import-time
  environment than the one its modules were imported with.
- The child restores default signal handlers, reseeds Python's, NumPy's and torch's random generators, and exits
  through the normal interpreter shutdown (atexit handlers run, as in a fresh process).

The test suite turns it on (``tests/conftest.py`` sets ``OPENHYDRA_TEST_FORKSERVER=1`` unless it is set); benchmarks
and other users of :mod:`openhydra.testing.processes` start plain subprocesses, so what they measure (start-up
time, memory) is a fresh process's.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from pydantic import BaseModel

from openhydra.preload import PRELOAD, fork_hazard, freeze, openblas_workers, preload, reseed, threads

log = logging.getLogger(__name__)


MAX_SERVERS = 6
_RUNTIME_ENV_PREFIXES = ("OPENHYDRA_", "PYTEST_")  # read at run time only (PYTEST_CURRENT_TEST changes per test)


class SpawnRequest(BaseModel):
    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    log_path: str | None = None  # stdout (and stderr, see below) to this file; None: /dev/null
    stdout_pipe: bool = False  # stdout to the write end of a pipe passed with the request (SCM_RIGHTS)
    stderr_null: bool = False  # stderr to /dev/null rather than where stdout goes


def enabled() -> bool:
    return os.environ.get("OPENHYDRA_TEST_FORKSERVER", "0") == "1" and hasattr(os, "fork")


# ---------------------------------------------------------------- the server process


def _threads() -> int:
    """Threads besides NumPy's OpenBLAS pool (which stops itself around a fork: openhydra/preload.py)."""
    return threads() - openblas_workers()


def _child(request: SpawnRequest, channel: int, passed: list[int]) -> None:
    """In the forked child: become ``python -m request.module *request.args``. Never returns normally."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.close(channel)
    null = os.open(os.devnull, os.O_RDWR)
    if request.stdout_pipe:
        out = passed[0]
    elif request.log_path:
        out = os.open(request.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    else:
        out = null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(null if request.stderr_null else out, 2)
    for fd in {null, out, *passed} - {0, 1, 2}:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request.env)
    os.chdir(request.cwd)
    reseed()
    sys.argv = [request.module, *request.args]
    sys.orig_argv = [sys.executable, "-m", request.module, *request.args]
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)
    raise SystemExit(0)


def serve() -> None:
    """The server: requests and replies are JSON datagrams on the SOCK_SEQPACKET socket that is its stdin."""
    channel = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # whatever an import prints goes to stderr
    os.close(null)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of the test run is for the tests, not for the server
    for name, why in preload(PRELOAD).items():  # the child imports it itself (and reports the error there)
        print(f"forkserver: preload {name}: {why}", file=sys.stderr)
    freeze()  # a child's first full collection would otherwise copy ~100 MiB of the imports (openhydra/preload.py)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)

    def reply(message: dict) -> None:
        channel.send(json.dumps(message).encode())

    reply({"ready": True, "threads": _threads(), "grpc": "grpc" in sys.modules})
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                os.read(wake_r, 4096)
                continue
            data, passed, _, _ = socket.recv_fds(channel, 1 << 20, 4)
            if not data:  # the test process is gone
                os._exit(0)
            request = SpawnRequest.model_validate_json(data)
            hazard = fork_hazard()
            if hazard is not None:
                for fd in passed:
                    os.close(fd)
                reply({"pid": None, "error": f"fork server: {hazard}"})
                continue
            pid = os.fork()
            if pid == 0:
                selector.close()
                os.close(wake_r)
                os.close(wake_w)
                _child(request, channel.detach(), passed)
            for fd in passed:
                os.close(fd)
            reply({"pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


# ---------------------------------------------------------------- the test side


class ForkedProcess:
    """A child of a fork server, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, server: _Server, pid: int, stdout: IO[str] | None = None) -> None:
        self._server = server
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # reaped by the server, its exit not reported yet
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=theirs, env=env, start_new_session=True)
        theirs.close()
        self._channel = ours
        self._lock = threading.Lock()  # one request at a time
        self._cond = threading.Condition()
        self._pids: list[int | None] = []
        self._exits: dict[int, int] = {}
        self._alive = True
        first = json.loads(ours.recv(1 << 16) or b'{"ready": false}')
        if not first.get("ready"):
            raise RuntimeError("fork server did not start")
        self.threads = first.get("threads", 0)
        self.grpc_loaded = bool(first.get("grpc"))
        self.usable = self.threads == 1 and not self.grpc_loaded
        """Single-threaded and without gRPC: safe to fork from. An unusable server is closed at once."""
        threading.Thread(target=self._read, name="forkserver-replies", daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self._channel.recv(1 << 16):
                message = json.loads(data)
                with self._cond:
                    if "exit" in message:
                        self._exits[message["exit"]] = message["code"]
                    else:
                        self._pids.append(message["pid"])
                    self._cond.notify_all()
        except OSError:  # the channel closed under a blocked recv (close(): an unusable server, the end of the run)
            pass
        with self._cond:
            self._alive = False
            self._cond.notify_all()

    def spawn(self, request: SpawnRequest, fds: list[int]) -> int | None:
        with self._lock:
            with self._cond:
                self._pids.clear()
            socket.send_fds(self._channel, [request.model_dump_json().encode()], fds)
            with self._cond:
                if not self._cond.wait_for(lambda: self._pids or not self._alive, timeout=60):
                    return None
                return self._pids.pop() if self._pids else None

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or not self._alive, timeout=timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_RDWR)  # the reader thread's recv returns instead of failing
        self._channel.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


Process = ForkedProcess | subprocess.Popen
"""What :func:`spawn` returns."""

_servers: dict[tuple, _Server] = {}
_unusable: set[tuple] = set()  # import-time environments whose server could not be forked from
_servers_lock = threading.Lock()


def _import_env_key(env: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(_RUNTIME_ENV_PREFIXES)))


def _server_for(env: dict[str, str]) -> _Server | None:
    key = _import_env_key(env)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server._alive:
            return server
        if key in _unusable or len(_servers) >= MAX_SERVERS:
            return None
        server = _Server({k: v for k, v in env.items() if not k.startswith(_RUNTIME_ENV_PREFIXES)})
        if not server.usable:
            log.warning("fork server unusable (%d threads after its imports, grpc loaded: %s); plain subprocesses "
                        "for this environment", server.threads, server.grpc_loaded)
            server.close()
            _unusable.add(key)
            return None
        if not _servers:
            atexit.register(_close_all)
        _servers[key] = server
        return server


def _close_all() -> None:
    for server in _servers.values():
        server.close()


def spawn(module: str, args: list[str], *, env: dict[str, str], log_path: Path | None = None,
          stdout_pipe: bool = False, stderr_null: bool = False,
          cwd: Path | None = None) -> Process:
    """Start ``python -m module *args`` in a new session, like ``subprocess.Popen(..., start_new_session=True)``.

    stdout goes to ``log_path`` (or /dev/null), or with ``stdout_pipe`` to a text pipe the returned process's
    ``stdout`` reads; stderr goes where stdout goes, or with ``stderr_null`` to /dev/null."""
    cwd_text = str(cwd or os.getcwd())
    server = _server_for(env) if enabled() else None
    if server is not None:
        read_end, write_end = os.pipe() if stdout_pipe else (-1, -1)
        try:
            pid = server.spawn(SpawnRequest(module=module, args=args, env=env, cwd=cwd_text, stdout_pipe=stdout_pipe,
                                            stderr_null=stderr_null, log_path=str(log_path) if log_path else None),
                               [write_end] if stdout_pipe else [])
        finally:
            if stdout_pipe:
                os.close(write_end)
        if pid is not None:
            return ForkedProcess(server, pid, open(read_end) if stdout_pipe else None)
        if stdout_pipe:
            os.close(read_end)
        log.warning("fork server refused; starting %s as a plain subprocess", module)
    out = subprocess.PIPE if stdout_pipe else open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=out,
                                stderr=subprocess.DEVNULL if stderr_null else subprocess.STDOUT, env=env, cwd=cwd_text,
                                text=stdout_pipe, start_new_session=True)
    finally:
        if log_path and not stdout_pipe:
            out.close()


if __name__ == "__main__":
    serve()
