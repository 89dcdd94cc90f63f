"""A ``-m`` sweep whose jobs serve: every job runs at once, each a node process of its own, their output in one stream.

``openhydra-node -m shard=index shard.total=3 shard.index=0,1,2 ...`` starts three nodes on this machine, one per
span. Hydra's own launcher runs a sweep's jobs one after
another, so the second node started only once the first had been stopped; the launcher of openhydra-node
(hydra_plugins/openhydra_launcher) hands a sweep whose jobs serve (``action=serve`` or ``dht``) to :func:`run_jobs`.
A sweep of checks (``action=check``) still runs its jobs one after another.

- **Shared pages.** On Linux the jobs are forked from this process after it has imported what a node imports
  (openhydra/preload.py) and frozen those objects out of the cycle collector's reach, so the jobs share most of the
  ~300 MiB of imports copy-on-write instead of each holding its own copy (a job still copies the pages it writes:
  140 MiB less per co-located SmolLM2 peer; docs/benchmarks.md, "Peer memory per span").
  Where forking is not safe (another thread runs, gRPC is loaded, not Linux) each job is a fresh
  ``python -m openhydra.cli`` process instead: the same nodes, without the sharing.
- **No collisions.** Jobs that would share a port (``api.port``, ``peer.port``, ``peer.reply_port``, when not 0) or
  a data directory (identity key, ledger) get the next free ones (:func:`collision_overrides`; the log lists them
  per job): with the defaults job k serves on 8080 + k and 50051 + k, its data in ``<data_dir>/job-k`` (the same
  folder each time the sweep starts, so the identity is kept). Jobs sharing an explicit identity key are refused.
- **One terminal.** Each job's output line is prefixed with ``[#N]``. Ctrl-C (or SIGTERM, SIGHUP) is passed to every
  job once, and each shuts down as a single node does; a SIGHUP the launcher ignores (nohup's) stays ignored
  in the jobs. A job that ends is reported with its exit status while the others go on; the sweep exits once all
  have ended, with status 1 if any failed (a job stopped by a passed-on signal has not failed). A job's process ends
  with the launcher (Linux: PR_SET_PDEATHSIG), so a killed launcher leaves no node behind.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from openhydra.preload import reseed

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

LONG_RUNNING = ("serve", "dht")
"""Actions that run until stopped: a sweep of them runs its jobs at once."""

PORT_KEYS = ("api.port", "peer.port", "peer.reply_port")


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string (paths may hold characters the override grammar parses)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _one_spelling(path: object) -> str:
    """A path as the jobs will open it (``~/x`` and ``/home/me/x`` are one folder)."""
    return os.path.abspath(os.path.expanduser(str(path)))


def collision_overrides(configs: Sequence[DictConfig]) -> list[list[str]]:
    """Per job, the overrides that keep it off the ports and data directory an earlier job of the sweep uses.

    A port (any of :data:`PORT_KEYS`, not 0) stays with the first job that names it; a later job naming a taken port
    gets the next port that no job of the sweep names or was given. A data directory shared by several jobs stays
    with the first; the k-th next gets ``<dir>/job-k`` (the same each time the sweep starts, so its identity is kept).
    """
    from omegaconf import OmegaConf

    def ports(cfg: DictConfig) -> list[tuple[str, int]]:
        keys = ("api.port",) if cfg.get("action") == "dht" else PORT_KEYS  # the DHT table serves no peer
        found = [(key, OmegaConf.select(cfg, key, default=None)) for key in keys]
        return [(key, int(value)) for key, value in found if value is not None and int(value) != 0]

    extra: list[list[str]] = [[] for _ in configs]
    named = {port for cfg in configs for _, port in ports(cfg)}
    given: set[int] = set()
    for i, cfg in enumerate(configs):
        for key, port in ports(cfg):
            if port in given:
                port = next(p for p in range(port + 1, 65536) if p not in given and p not in named)
                extra[i].append(f"{key}={port}")
            given.add(port)
    dirs = [OmegaConf.select(cfg, "node.data_dir", default=None) for cfg in configs]
    same = [_one_spelling(d) if d is not None else None for d in dirs]
    taken = {d for d in same if d is not None}
    ranks: dict[str, int] = {}
    for i, (shown, path) in enumerate(zip(dirs, same, strict=True)):
        if path is None:
            continue
        rank = ranks.get(path, 0)
        if rank == 0:
            ranks[path] = 1
            continue
        while os.path.join(path, f"job-{rank}") in taken:
            rank += 1
        ranks[path] = rank + 1
        taken.add(os.path.join(path, f"job-{rank}"))
        extra[i].append(f"node.data_dir={_quoted(os.path.join(str(shown), f'job-{rank}'))}")
    return extra


def shared_identity(configs: Sequence[DictConfig]) -> str | None:
    """Why the jobs cannot run as configured (None: they can): two that would load one identity key (an explicit
    ``privacy.identity_path`` that the data-directory move does not change) would be one peer twice."""
    from omegaconf import OmegaConf

    seen: dict[str, int] = {}
    for i, cfg in enumerate(configs):
        path = OmegaConf.select(cfg, "privacy.identity_path", default=None)
        if not path or cfg.get("action") == "dht":
            continue
        path = _one_spelling(path)
        if path in seen:
            return (f"jobs #{seen[path]} and #{i} would share privacy.identity_path={path} (one peer twice): "
                    "leave it to each job's data directory, or give each job its own")
        seen[path] = i
    return None


@dataclass
class Job:
    """One job of the sweep: its number, its overrides (the sweep's and :func:`collision_overrides`' ones), and
    how it runs in a forked child (``main`` returns the exit status). ``flags``: the launcher's command-line flags a
    job started as a fresh process needs too (Hydra's ``--config-dir``: the recipes its overrides may name)."""

    index: int
    overrides: list[str]
    main: Callable[[], int]
    flags: list[str] = field(default_factory=list)
    pid: int = 0
    fd: int = -1
    pending: bytes = b""
    status: int | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGTERM when the launcher dies (a SIGKILLed launcher must not leave nodes)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _standard_streams() -> None:
    """sys.stdout and sys.stderr write to file descriptors 1 and 2 (not to a stream replaced in the launcher, such
    as a test runner's capture), which now lead to the job's pipe."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        try:
            if stream.fileno() == fd:
                continue
        except (AttributeError, OSError, ValueError):
            pass
        setattr(sys, name, open(fd, "w", buffering=1, closefd=False, errors="backslashreplace"))  # noqa: SIM115 (kept open: it is the stream)


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _fork(job: Job, write: int, others: list[int], ignored: set[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        # first: the launcher's forwarding handlers are not the job's. What a node started from the launcher's
        # shell would have (nohup: SIGHUP stays ignored).
        for sig in (*FORWARDED, signal.SIGCHLD):
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, signal.SIG_IGN if sig in ignored else default)
        atexit._clear()  # nor are its exit handlers (one shut a socket the launcher still uses)
        os.setpgid(0, 0)  # signals come from the launcher, once (not also from the terminal's Ctrl-C)
        _die_with_parent(parent)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(write, 1)
        os.dup2(write, 2)
        for fd in {null, write, *others} - {0, 1, 2}:
            os.close(fd)
        _standard_streams()
        reseed()
        status = job.main()
    except SystemExit as exc:
        status = _exit_status(exc)
    except KeyboardInterrupt:  # Ctrl-C before the node serves (it handles SIGINT itself once serving)
        print("openhydra-node: interrupted", file=sys.stderr)
        status = 130
    except BaseException:  # reported in the job's output; its exit status says it failed
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


LAUNCHER_ENV = "OPENHYDRA_SWEEP_LAUNCHER"
"""Set for a job started as a fresh process: the launcher's pid, so the job ends with it (:func:`die_with_launcher`)."""


def die_with_launcher() -> None:
    """In a job started as a fresh process (``openhydra-node`` calls this first): end with the launcher that
    started it, as a forked job does."""
    parent = os.environ.pop(LAUNCHER_ENV, None)
    if parent is not None and parent.isdigit() and sys.platform == "linux":
        _die_with_parent(int(parent))


def _spawn(job: Job, write: int) -> int:
    job.popen = subprocess.Popen([sys.executable, "-m", "openhydra.cli", *job.flags, *job.overrides],
                                 stdin=subprocess.DEVNULL, stdout=write, stderr=write, start_new_session=True,
                                 close_fds=True,
                                 env={**os.environ, LAUNCHER_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"})
    return job.popen.pid


def _relay(job: Job, data: bytes, out) -> None:
    """Write ``data``'s complete lines (ended by a newline, or a carriage return: progress bars) with the prefix."""
    job.pending += data
    prefix = f"[#{job.index}] ".encode()
    start = 0
    for i, byte in enumerate(job.pending):
        if byte == 13 and i + 1 == len(job.pending):
            break  # a \r\n may be split between reads: decide when the next byte is in
        if byte == 10 or (byte == 13 and job.pending[i + 1] != 10):  # \n, \r\n, or a progress bar's lone \r
            if i > start or byte == 10:
                out.write(prefix + job.pending[start:i + 1])
            start = i + 1
    job.pending = job.pending[start:]
    out.flush()


def run_jobs(jobs: list[Job], *, fork: bool, out=None) -> list[int]:
    """Run every job at once (forked when ``fork``, else fresh processes) and relay their output; their exit
    statuses (negative: the signal that ended it), once all have ended."""
    out = out or sys.stdout.buffer
    live: dict[int, Job] = {}
    received: list[int] = []

    def forward(sig: int, _frame) -> None:
        received.append(sig)
        for pid in list(live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # installed before the first fork (a signal in between reaches the jobs started so far, and no more start);
    # nohup's ignored SIGHUP stays ignored, here and in the jobs. SIGINT and SIGTERM stop the jobs even where the
    # launcher inherited them ignored (`openhydra-node -m ... &` in a script): a single node stops on them too.
    ignored = {signal.SIGHUP} if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else set()
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED if sig not in ignored}
    selector = selectors.DefaultSelector()
    reads: list[int] = []
    for job in jobs:  # one pipe at a time: a job must hold no other job's write end (its EOF would wait for it)
        if received:
            job.status = 0
            out.write(f"openhydra-node: job #{job.index} not started (interrupted)\n".encode())
            continue
        read, write = os.pipe()
        reads.append(read)
        job.pid = _fork(job, write, reads, ignored) if fork else _spawn(job, write)
        os.close(write)
        job.fd = read
        live[job.pid] = job
        selector.register(job.fd, selectors.EVENT_READ, job)
    try:
        while live or selector.get_map():
            for key, _ in selector.select(timeout=0.2):
                job = key.data
                data = os.read(job.fd, 65536)
                if data:
                    _relay(job, data, out)
                else:
                    _close(selector, job, out)
            for pid in list(live):
                done, wait_status = os.waitpid(pid, os.WNOHANG)
                if done:
                    job = live.pop(pid)
                    job.status = os.waitstatus_to_exitcode(wait_status)
                    if job.popen is not None:
                        job.popen.returncode = job.status
                    _drain(selector, job, out)
                    if job.status != 0 and not (received and job.status in STOPPED):
                        left = f"; {len(live)} job(s) still running" if live else ""
                        out.write(f"openhydra-node: job #{job.index} ({' '.join(job.overrides)}) ended with "
                                  f"status {job.status}{left}\n".encode())
                        out.flush()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for job in jobs:
            _close(selector, job, out)
        selector.close()
    return [0 if received and job.status in STOPPED else job.status if job.status is not None else 1
            for job in jobs]


STOPPED = (130, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGHUP)
"""Exit statuses of a job that ended because the launcher passed it the signal it received: not a failure."""


def _drain(selector: selectors.BaseSelector, job: Job, out) -> None:
    """What the ended job wrote last (a process it started may keep the pipe open: do not wait for that)."""
    if job.fd < 0:
        return
    os.set_blocking(job.fd, False)
    with contextlib.suppress(BlockingIOError, OSError):
        while data := os.read(job.fd, 65536):
            _relay(job, data, out)
    _close(selector, job, out)


def _close(selector: selectors.BaseSelector, job: Job, out) -> None:
    if job.fd < 0:
        return
    if job.pending:
        _relay(job, b"\n", out)
    with contextlib.suppress(KeyError, ValueError):
        selector.unregister(job.fd)
    os.close(job.fd)
    job.fd = -1
