"""The console scripts' entry points: each imports its command inside a Ctrl-C handler.

A command spends its first seconds importing (torch, transformers, Hydra); a Ctrl-C then raises
KeyboardInterrupt wherever the import happens to be, before the command's own code could catch it. Here it
ends the command with one line and exit status 130, as a shell expects of an interrupted program. Once a
command serves, its server's own SIGINT handling (a graceful shutdown) takes over. ``--version`` is answered
here for every command, before anything heavy is imported.
"""

from __future__ import annotations

import importlib
import os
import sys


def _run(prog: str, target: str) -> None:
    from openhydra import answer_version

    if answer_version(prog, sys.argv[1:]):
        return
    try:
        module, func = target.split(":")
        result = getattr(importlib.import_module(module), func)()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # At once, without the interpreter's teardown: interrupted mid-start, gRPC's poller thread may already run,
        # and tearing the interpreter down under it aborts the process (SIGABRT, "epoll_wait error: Bad file
        # descriptor": seen once in a CI run). Nothing is half-written here: the data dir lock is a flock the
        # kernel releases, and a model conversion runs in a child that exits with its parent.
        os._exit(130)
    if isinstance(result, int):
        raise SystemExit(result)


def node() -> None:
    _run("openhydra-node", "openhydra.cli:node_main")


def dht() -> None:
    _run("openhydra-dht", "openhydra.discovery.http_dht_server:main")


def sim() -> None:
    _run("openhydra-sim", "openhydra.sim.app:main")


def bench() -> None:
    _run("openhydra-bench", "openhydra.loadgen.app:main")
