"""Run :func:`openhydra.sweep.run_jobs` with forked jobs in a fresh, single-threaded interpreter, as the launcher
does (a pytest worker has threads, and forking a threaded process is what the launcher refuses to do); prints what
the test checks as JSON. ``python -m tests.operators.sweep_fork_probe output|nohup|background TMPDIR``."""

from __future__ import annotations

import atexit
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

from openhydra.preload import fork_unsafe_because
from openhydra.sweep import Job, run_jobs


def prints_and_returns() -> int:
    atexit.register(lambda: os.write(1, b"the job's own exit handler\n"))
    os.write(1, b"one\ntwo\n")
    os.write(2, b"to stderr\n")
    return 3


def exits_quietly() -> int:
    raise SystemExit("a one-line reason")


def raises() -> int:
    raise RuntimeError("boom")


def hup_ignored() -> int:
    return 0 if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else 5


def interrupts_its_launcher() -> int:
    os.kill(os.getppid(), signal.SIGINT)  # `kill -INT <launcher>`; the launcher passes it on
    time.sleep(30)  # a job the SIGINT does not reach sleeps it out
    return 0


def main() -> None:
    scenario, tmp = sys.argv[1], Path(sys.argv[2])
    assert fork_unsafe_because() is None, fork_unsafe_because()
    out = io.BytesIO()
    if scenario == "output":
        ran_here = tmp / "launcher-exit-handler-ran"
        atexit.register(lambda: ran_here.write_text(str(os.getpid())) if os.getpid() != parent else None)
        parent = os.getpid()
        jobs = [Job(index=0, overrides=["a=1"], main=prints_and_returns),
                Job(index=1, overrides=["a=2"], main=exits_quietly),
                Job(index=2, overrides=["a=3"], main=raises)]
        statuses = run_jobs(jobs, fork=True, out=out)
        print(json.dumps({"statuses": statuses, "text": out.getvalue().decode(), "ran_in_job": ran_here.exists()}))
    elif scenario == "nohup":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        statuses = run_jobs([Job(index=0, overrides=[], main=hup_ignored)], fork=True, out=out)
        print(json.dumps({"statuses": statuses, "still_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN}))
    elif scenario == "background":  # started by `openhydra-node -m ... &` in a script: SIGINT inherited ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        began = time.monotonic()
        statuses = run_jobs([Job(index=0, overrides=[], main=interrupts_its_launcher)], fork=True, out=out)
        print(json.dumps({"statuses": statuses, "seconds": time.monotonic() - began}))


if __name__ == "__main__":
    main()
