"""The console scripts' entry points: each imports its command inside a Ctrl-C handler.

A command spends its first seconds importing (torch, transformers, Hydra); a Ctrl-C then would raise
KeyboardInterrupt wherever the import happens to be. Raised inside a callback (a module lock's weakref callback
during an import) Python only prints it and goes on, so the node started serving as if never interrupted (seen in
a loop of interrupted starts); unwinding an import with gRPC's poller running once aborted the process (SIGABRT).
So until a command installs its own handler, SIGINT ends it from the handler itself: one line, exit status 130 at
once, as a shell expects of an interrupted program. Once a command serves, its server's own SIGINT handling (a
graceful shutdown) replaces this one. ``--version`` is answered
here for every command, before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys


def _run(prog: str, target: str) -> None:
    from openhydra import answer_version

    if answer_version(prog, sys.argv[1:]):
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, a sweep's job, ...)
        signal.signal(signal.SIGINT, lambda *_: _interrupted(prog))
    try:
        module, func = target.split(":")
        result = getattr(importlib.import_module(module), func)()
    except KeyboardInterrupt:  # raised by a handler the command installed and removed (asyncio's default after a loop)
        _interrupted(prog)
    if isinstance(result, int):
        raise SystemExit(result)


def _interrupted(prog: str) -> None:
    """End the command now: its line on stderr and exit status 130, without unwinding or the interpreter's teardown
    (gRPC's poller thread may already run, and tearing the interpreter down under it aborts the process). Nothing is
    half-written: the data dir lock is a flock the kernel releases, the ledger is SQLite (a transaction is atomic),
    and a model conversion runs in a child that exits with its parent. Written with os.write: this runs as a signal
    handler, maybe while the main thread is inside a write to sys.stderr."""
    with contextlib.suppress(Exception):  # (a reentrant flush of a stream the main thread was writing)
        sys.stdout.flush()
    os.write(2, f"\n{prog}: interrupted\n".encode())
    os._exit(130)


def node() -> None:
    _run("openhydra-node", "openhydra.cli:node_main")


def dht() -> None:
    _run("openhydra-dht", "openhydra.discovery.http_dht_server:main")


def sim() -> None:
    _run("openhydra-sim", "openhydra.sim.app:main")


def bench() -> None:
    _run("openhydra-bench", "openhydra.loadgen.app:main")
