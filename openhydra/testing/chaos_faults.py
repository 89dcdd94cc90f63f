"""The fault side of a chaos run: replicated peer processes and a killer that SIGKILLs, SIGSTOPs (then SIGCONTs)
and restarts them on a schedule without ever leaving a span with zero live replicas.

A peer is *live* only when its process runs, is not stopped and has answered ``/readyz`` since it last started;
the killer acts on a peer only if another live replica of the same span remains, so the swarm always covers the
model and every failure a client sees is the coordinator's, not a hole in the swarm.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import httpx
from pydantic import BaseModel

from openhydra.testing.processes import NodeProcess, signal_group, swarm_node_overrides


class PeerState(StrEnum):
    LIVE = "live"
    STOPPED = "stopped"  # SIGSTOP'd: the process exists, its sockets accept, nothing answers
    DOWN = "down"  # killed, waiting for a restart
    STARTING = "starting"  # (re)starting or shutting down for a restart: not ready


class FaultEvent(BaseModel):
    t_s: float
    """Seconds since the load started."""
    kind: str
    """kill, stop, cont, term (graceful stop for a restart), start, ready, start_failed."""
    peer: str
    span: tuple[int, int]
    pid: int | None = None
    grpc: str | None = None
    """The incarnation's peer address, as the coordinator's log names it."""
    live: dict[str, int]
    """Live replicas per span ("a-b") right after the event."""


@dataclass
class ChaosPeer:
    name: str
    span: tuple[int, int]
    model_dir: Path
    dht_url: str
    data_dir: Path
    log_dir: Path
    dtype: str
    state: PeerState = PeerState.STARTING
    incarnation: int = 0
    node: NodeProcess | None = None
    grpc_address: str | None = None
    logs: list[Path] = field(default_factory=list)

    def new_process(self) -> NodeProcess:
        """A fresh process with the same identity (data dir) on a new API port: a restart, as an operator does."""
        self.incarnation += 1
        log_path = self.log_dir / f"{self.name}.{self.incarnation}.log"
        self.logs.append(log_path)
        overrides = swarm_node_overrides(self.model_dir, self.dht_url, *self.span, self.data_dir, dtype=self.dtype)
        self.node = NodeProcess(overrides, log_path=log_path)
        self.grpc_address = None
        return self.node

    def learn_address(self) -> None:
        """Ask the (ready) process for its peer address."""
        try:
            status = httpx.get(self.node.url + "/v1/network/status", timeout=10).json()
            self.grpc_address = status["swarm"]["peer"]["grpc_address"]
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            self.grpc_address = None

    @property
    def pid(self) -> int | None:
        return self.node.proc.pid if self.node is not None and self.node.proc is not None else None

    def signal(self, sig: int) -> None:
        if self.node is not None and self.node.proc is not None and self.node.proc.poll() is None:
            signal_group(self.node.proc, sig)


def span_key(span: tuple[int, int]) -> str:
    return f"{span[0]}-{span[1]}"


class Killer:
    """Every ``every_s`` (±25 %, seeded) one fault on a random peer: kill, stop (continued after ``stop_s``) or
    restart (a killed peer, else a graceful SIGTERM + start of a live one); each kind once per round of three, in
    a seeded order, as far as the invariant allows. Runs in its own thread."""

    ACTIONS = ("kill", "stop", "restart")

    def __init__(self, peers: list[ChaosPeer], *, every_s: float, seed: int, stop_s: tuple[float, float] = (3.0, 8.0),
                 ready_timeout_s: float = 240.0, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[FaultEvent], None] | None = None) -> None:
        self.peers = peers
        self.every_s = every_s
        self.stop_s = stop_s
        self.ready_timeout_s = ready_timeout_s
        self.rng = random.Random(seed)
        self.events: list[FaultEvent] = []
        self.min_live: dict[str, int] = {}
        """The fewest live replicas each span had at any event: never 0 by construction."""
        self._clock = clock
        self._t0 = clock()
        self._on_event = on_event
        self._lock = threading.RLock()
        self._continue_at: dict[str, float] = {}
        self._bag: list[str] = []
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._helpers: list[threading.Thread] = []

    # -- bookkeeping ---------------------------------------------------------------------------------
    def live_counts(self) -> dict[str, int]:
        counts = {span_key(p.span): 0 for p in self.peers}
        for p in self.peers:
            if p.state is PeerState.LIVE:
                counts[span_key(p.span)] += 1
        return counts

    def _record(self, kind: str, peer: ChaosPeer) -> None:
        with self._lock:
            live = self.live_counts()
            for key, n in live.items():
                self.min_live[key] = min(self.min_live.get(key, n), n)
            event = FaultEvent(t_s=round(self._clock() - self._t0, 3), kind=kind, peer=peer.name, span=peer.span,
                               pid=peer.pid, grpc=peer.grpc_address, live=live)
            self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _can_take_down(self, peer: ChaosPeer) -> bool:
        """Another live replica of ``peer``'s span remains after ``peer`` goes."""
        return peer.state is PeerState.LIVE and self.live_counts()[span_key(peer.span)] >= 2

    # -- actions -------------------------------------------------------------------------------------
    def kill(self, peer: ChaosPeer) -> None:
        with self._lock:
            peer.signal(signal.SIGKILL)
            peer.state = PeerState.DOWN
            self._record("kill", peer)
        if peer.node is not None and peer.node.proc is not None:
            peer.node.proc.wait(timeout=30)
            peer.node.stop()  # closes its log file

    def stop(self, peer: ChaosPeer, for_s: float) -> None:
        with self._lock:
            peer.signal(signal.SIGSTOP)
            peer.state = PeerState.STOPPED
            self._continue_at[peer.name] = self._clock() + for_s
            self._record("stop", peer)

    def cont(self, peer: ChaosPeer) -> None:
        with self._lock:
            peer.signal(signal.SIGCONT)
            self._continue_at.pop(peer.name, None)
            peer.state = PeerState.LIVE  # it was ready before the stop; it announces again within seconds
            self._record("cont", peer)

    def restart(self, peer: ChaosPeer) -> None:
        """A killed peer comes back; a live one is stopped gracefully first. Readiness is awaited off-thread."""
        with self._lock:
            graceful = peer.state is PeerState.LIVE
            peer.state = PeerState.STARTING
            if graceful:
                peer.signal(signal.SIGTERM)
                self._record("term", peer)
        helper = threading.Thread(target=self._bring_up, args=(peer, graceful), name=f"restart-{peer.name}",
                                  daemon=True)
        self._helpers.append(helper)
        helper.start()

    def _bring_up(self, peer: ChaosPeer, graceful: bool) -> None:
        if graceful and peer.node is not None:
            peer.node.stop()  # waits for the SIGTERM'd process (SIGKILL after 15 s)
        with self._lock:
            if self._halt.is_set():
                return
            peer.new_process().start()
            self._record("start", peer)
        try:
            peer.node.wait_ready(self.ready_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            if self._halt.is_set():  # shut down while starting
                return
            with self._lock:
                peer.node.kill()
                peer.state = PeerState.DOWN
                self._record("start_failed", peer)
            print(f"chaos: {peer.name} did not come back: {str(exc)[-500:]}", flush=True)
            return
        peer.learn_address()
        with self._lock:
            if peer.state is PeerState.STARTING:
                peer.state = PeerState.LIVE
                self._record("ready", peer)

    def tick(self) -> None:
        """One scheduled fault (whatever the invariant allows)."""
        with self._lock:
            takeable = [p for p in self.peers if self._can_take_down(p)]
            down = [p for p in self.peers if p.state is PeerState.DOWN]
            options = [a for a in self.ACTIONS if (takeable if a != "restart" else takeable or down)]
            if not options:
                return
            if not self._bag:  # every kind of fault once per round, in a seeded order
                self._bag = self.rng.sample(self.ACTIONS, len(self.ACTIONS))
            action = next((a for a in self._bag if a in options), options[0])
            if action in self._bag:
                self._bag.remove(action)
            if action == "kill":
                victim = self.rng.choice(takeable)
            elif action == "stop":
                victim = self.rng.choice(takeable)
                for_s = self.rng.uniform(*self.stop_s)
            else:
                victim = self.rng.choice(down) if down else self.rng.choice(takeable)
        if action == "kill":
            self.kill(victim)
        elif action == "stop":
            self.stop(victim, for_s)
        else:
            self.restart(victim)

    # -- the schedule --------------------------------------------------------------------------------
    def start(self, t0: float | None = None) -> Killer:
        """Begin the schedule; event times count from ``t0`` (the load's start, same clock)."""
        self._t0 = self._clock() if t0 is None else t0
        self.min_live = self.live_counts()
        self._thread = threading.Thread(target=self._loop, name="chaos-killer", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_fault = self._clock() + self.every_s * self.rng.uniform(0.75, 1.25)
        while not self._halt.wait(0.1):
            now = self._clock()
            for peer in self.peers:
                due = self._continue_at.get(peer.name)
                if due is not None and now >= due:
                    self.cont(peer)
            if now >= next_fault:
                self.tick()
                next_fault = now + self.every_s * self.rng.uniform(0.75, 1.25)

    def halt(self) -> None:
        """No more faults; stopped peers are continued (their streams may still be in use)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for peer in self.peers:
            if peer.state is PeerState.STOPPED:
                self.cont(peer)

    def shutdown(self) -> None:
        """Stop every peer process (after :meth:`halt`); no restart starts a process after this."""
        with self._lock:
            self._halt.set()
        stoppers = []
        for peer in self.peers:
            peer.signal(signal.SIGCONT)
            if peer.node is not None:
                stopper = threading.Thread(target=_stop_node, args=(peer.node,), daemon=True)
                stopper.start()
                stoppers.append(stopper)
        for thread in [*stoppers, *self._helpers]:
            thread.join(timeout=30)


def _stop_node(node: NodeProcess) -> None:
    try:
        node.stop()  # SIGTERM, SIGKILL after 15 s
    except (OSError, subprocess.SubprocessError):
        node.kill()
