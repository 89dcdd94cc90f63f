"""Run by tests/testing/test_forkserver.py as ``python -m tests.testing.forkserver_probe EXIT_CODE [sleep]``: prints
what a forked child sees (one JSON line), then exits with EXIT_CODE or sleeps until it is signalled."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import numpy
import torch


def main() -> None:
    code = int(sys.argv[1])
    print(json.dumps({
        "pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "argv": sys.argv[1:],
        "marker": os.environ.get("OPENHYDRA_PROBE_MARKER"), "name": __name__,
        "random": random.random(), "numpy": float(numpy.random.random()), "torch": float(torch.rand(1).item()),
        "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if len(sys.argv) > 2:
        time.sleep(600)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
