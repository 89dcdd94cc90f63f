"""The coordinator's pipeline through the swarm: route choice, failover mid-generation, replay.

Each generation session gets a chain of peers whose spans tile [0, L) (checked before every step
and after every failover). When a hop fails, the peer is banned with backoff, a replacement for
exactly its span is found (a peer or a sub-chain; else a whole new chain), and the session's history
is replayed on the new chain step by step, with the same chunking and sampling steps as the first
time, so the rebuilt caches are bit-identical and greedy output is unchanged by the fault. Every
call has a deadline and every retry loop is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from openhydra.discovery.records import PeerAnnouncement
from openhydra.metrics import METRICS
from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec
from openhydra.router.bans import BanList, Probation
from openhydra.router.coverage import Chain, LayerCoverageMap, chain_problems
from openhydra.router.prefix_plan import PrefixPlanner
from openhydra.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)


class PipelineUnavailable(RuntimeError):
    """No chain covers the model right now; the API answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class FailoverTunables:
    max_failovers_per_step: int = 4  # attempts to repair a chain within one step before giving up
    route_wait_s: float = 6.0  # how long to wait for a replacement to (re)appear in discovery, s
    lookup_ttl_s: float = 2.0  # reuse a discovery lookup this long between route choices, s
    retry_after_s: int = 5  # suggested to clients when no chain exists


@dataclass
class _Feed:
    tokens: list[int]
    start: int
    step: int
    sampling: SamplingParams
    token_out: int | None  # None: a speculative verify step (or one cut by truncate): nothing to compare


@dataclass
class _Session:
    peer_session: str = field(default_factory=lambda: uuid.uuid4().hex)
    chain: Chain | None = None
    feeds: list[_Feed] = field(default_factory=list)
    position: int = 0
    needs_replay: bool = False
    first_sent: tuple[int, object] | None = None
    """(skip, prefix key) of the first step as sent, when it reused cached prompt blocks (router/prefix_plan.py)."""
    lost: tuple[str, Chain] | None = None
    """The peer session and chain a hop failure ended: its surviving hops may be adopted by a rebuild."""
    recomputed_seed: list[tuple[int, int]] = field(default_factory=list)
    """Layer spans rebuilt after a failover whose replacement computed the prompt blocks the first step had taken
    from the prefix caches (settlement: those hops computed every position)."""
    evictions: int = 0
    """Times a hop said it no longer held the session (its runtime evicted it for others): replayed on the same
    chain, without a ban, up to ``EVICTIONS_REPLAYED`` times; beyond, the hop is failed over as any other."""


EVICTIONS_REPLAYED = 2
"""Per session. A hop's runtime keeps a bounded number of sessions (serving.max_sessions) and evicts the least recently
used: that is load, not a fault, so the coordinator replays on the same peers. A hop that says so again and again
(overloaded, or lying to make the coordinator replay every step) is banned and failed over."""


def _evicted(error: HopError) -> bool:
    """A hop answered that its session is empty while the step started past position 0: it was evicted there."""
    return error.code == grpc.StatusCode.FAILED_PRECONDITION and error.expected_position == 0


def _process_gone(error: HopError) -> bool:
    """UNAVAILABLE from a refused, reset or closed connection: the process is gone, its record is dead. A connection
    attempt that timed out ("timed out before receiving SETTINGS", a keepalive timeout) is a stopped or overloaded
    process, not a dead one: it is only banned, and routable again once the ban lapses."""
    text = (error.message or "").lower()
    return error.code == grpc.StatusCode.UNAVAILABLE and "timed out" not in text and "timeout" not in text


_SILENT = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})
"""Failures of a peer that stopped answering (with _process_gone false: a timeout, not a refusal)."""


def _route_of(chain: Chain) -> list[HopSpec]:
    """The chain's hops, each named with the peer id of the record it was routed by: an encrypted session seals to
    that record's key (a record of another peer that names this address is not believed), and settlement pays
    that identity."""
    return [HopSpec(address=h.peer.grpc_address, start=h.start, end=h.end, peer_id=h.peer.peer_id)
            for h in chain.hops]


class SwarmPipeline:
    def __init__(
        self,
        model_id: str,
        total_layers: int,
        lookup: Callable[[], list[PeerAnnouncement]],
        client,
        *,
        bans: BanList | None = None,
        score: Callable[[str], float] | None = None,
        tunables: FailoverTunables | None = None,
        on_failover: Callable[[str, str], None] | None = None,
        verifier=None,  # verification hook: openhydra.verification.Verifier (audits off the critical path)
        on_session_end: Callable[[str, str, int, list[HopSpec], list[int]], object] | None = None,
        probe: Callable[[str], bool] | None = None,
    ) -> None:
        """``probe(address)``: does the peer there answer now (Info, sub-second)? With it, a peer that stopped
        answering is routed to again only once a probe off the request path says it answers (router/bans.py
        Probation); without it (onion routing: no direct calls to middle hops), once its ban lapses."""
        self.model_id = model_id
        self.total_layers = total_layers
        self._lookup = lookup
        self.client = client
        self.bans = bans if bans is not None else BanList()  # an empty BanList is falsy (len 0): keep it
        self.probation = Probation(self.bans, probe) if probe is not None else None
        self.score = score
        self.tunables = tunables or FailoverTunables()
        self.on_failover = on_failover
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._cached: tuple[float, list[PeerAnnouncement]] = (0.0, [])
        self._unreachable: dict[str, tuple[str | None, float]] = {}
        """peer id -> (instance, wall time) of the process that refused a connection: its records are dead."""
        self._banned_instance: dict[str, str | None] = {}
        """peer id -> the instance whose failure earned the current ban: a new instance (a restart) is not banned."""
        self._ban_reasons: dict[str, str] = {}
        """peer id -> its address and last failure, for a 503 that says why its layers are holes."""
        self._hole: tuple[float, float] | None = None
        """(first seen, last seen), monotonic, of the hole the latest requests met; None once a chain was found."""
        self.failovers = 0
        self.replay_mismatches = 0
        self.supports_truncate = True
        """Speculative decoding may crop sessions; False for recurrent models (set by the node, or learnt
        from a hop answering UNIMPLEMENTED) and while a verifier shadows sessions (its audits replay feeds)."""
        self.truncations = 0
        self.truncate_refusals = 0
        self.prefix: PrefixPlanner | None = None
        """Set by the node (serving.prefix_cache): new sessions reuse the peers' cached prompt prefixes."""
        self.verifier = verifier  # verification hook
        # settlement hook: (request id, peer session, positions, final route, per-hop caps)
        self.on_session_end = on_session_end
        if verifier is not None:
            verifier.bind(self)

    # -- routes ------------------------------------------------------------------------------------
    def peers(self, refresh: bool = False) -> list[PeerAnnouncement]:
        fetched_at, records = self._cached
        if refresh or time.monotonic() - fetched_at > self.tunables.lookup_ttl_s:
            records = [r for r in self._lookup() if r.model_id == self.model_id]
            for record in records:
                self._forget_earlier_instance(record)
            records = [r for r in records if not self._is_dead_record(r)]
            self._cached = (time.monotonic(), records)
        return records

    def _forget_earlier_instance(self, record: PeerAnnouncement) -> None:
        """A peer announced by a new process (a restart): the ban and dead mark its previous process earned
        do not apply to it. Keyed to the record instance, a failure never outlives the process that failed."""
        if record.instance is None:
            return
        if record.peer_id in self._banned_instance and self._banned_instance[record.peer_id] != record.instance:
            del self._banned_instance[record.peer_id]
            self._ban_reasons.pop(record.peer_id, None)
            self.bans.lift(record.peer_id)  # routable at once; its streak goes only with a served step
            if self.probation is not None:
                self.probation.release(record.peer_id)
            log.info("peer %s restarted (instance %s): its ban is lifted", record.peer_id, record.instance[:8])

    def _is_dead_record(self, record: PeerAnnouncement) -> bool:
        """A record of the process that refused a connection describes a dead process: skip it until the peer
        announces again (from a new process, or any announcement made after the refusal), instead of retrying it
        each time its short ban lapses."""
        mark = self._unreachable.get(record.peer_id)
        if mark is None:
            return False
        instance, refused_at = mark
        # a new process, or any announcement made after the refusal (a dead process announces nothing more)
        alive = (record.instance is not None and instance is not None and record.instance != instance) \
            or record.announced_at > refused_at
        if alive:
            self._unreachable.pop(record.peer_id, None)
            return False
        return True

    def avoided(self) -> frozenset[str]:
        """Peers no route may use now: banned, or (after a timeout) on probation until a probe finds them answering."""
        banned, held = self._left_out()
        return banned | held

    def _left_out(self) -> tuple[frozenset[str], frozenset[str]]:
        """The banned peers, and those on probation (banned now or not)."""
        banned = self.bans.banned()
        return banned, self.probation.held(banned) if self.probation is not None else frozenset()

    def coverage_map(self, refresh: bool = False, banned: frozenset[str] | None = None) -> LayerCoverageMap:
        """``banned``: the peers to leave out, when the caller has read ``avoided()`` already (else read here)."""
        return LayerCoverageMap(self.peers(refresh), self.total_layers, model_id=self.model_id, score=self.score,
                                banned=self.avoided() if banned is None else banned)

    def _new_chain(self, refresh: bool) -> Chain | None:
        banned = self.avoided()
        cmap = self.coverage_map(refresh, banned)
        # verification/elimination.py: route around suspects of irreproducible answers, where the swarm can
        for avoid in self.verifier.avoid() if self.verifier is not None else ():
            chain = cmap.chain(exclude=banned | avoid)
            if chain is not None:
                return chain
        return cmap.chain(exclude=banned)

    def _repair(self, chain: Chain, failed_address: str) -> Chain | None:
        """Replace the failed hop with a peer or sub-chain running exactly its span; else re-route."""
        banned = self.avoided()
        cmap = self.coverage_map(refresh=True, banned=banned)
        for index, hop in enumerate(chain.hops):
            if hop.peer.grpc_address != failed_address:
                continue
            patch = cmap.replacement_for((hop.start, hop.end), exclude=banned)
            if patch is not None:
                candidate = Chain(chain.hops[:index] + patch.hops + chain.hops[index + 1 :])
                if not chain_problems(candidate, self.total_layers, self.model_id):
                    return candidate
        return cmap.chain(exclude=banned)

    def route_report(self) -> tuple[bool, list]:
        """For /readyz: whether a chain covers the model now (over the last lookup, at most ``lookup_ttl_s`` old,
        leaving out banned peers) and, if not, the holes ([start, end) layer ranges no usable peer serves)."""
        banned = self.avoided()
        cmap = self.coverage_map(banned=banned)
        chain = cmap.chain(exclude=banned)
        if chain is not None and not chain_problems(chain, self.total_layers, self.model_id):
            return True, []
        return False, cmap.coverage(exclude=banned).to_dict().get("holes") or []

    def _route_deadline(self) -> float:
        """When a request stops waiting for a chain: ``route_wait_s`` after the hole was first seen. A hole that
        requests kept meeting (the last met no more than ``route_wait_s`` ago) is not waited out again by each new
        request: after one fresh lookup it gets its 503 at once, instead of every request of a swarm with a hole
        waiting the whole ``route_wait_s`` first. After a quiet spell the next request waits afresh."""
        now = time.monotonic()
        return self._hole_began(now) + self.tunables.route_wait_s

    def _hole_began(self, now: float) -> float:
        """When the hole requests keep meeting was first seen (``now`` when none was met in the last route_wait_s)."""
        hole = self._hole
        return hole[0] if hole is not None and now - hole[1] <= self.tunables.route_wait_s else now

    def _saw_hole(self) -> None:
        now = time.monotonic()
        self._hole = (self._hole_began(now), now)

    def _wait_for_chain(self, current: Chain | None, failed_address: str | None) -> Chain:
        deadline = self._route_deadline()
        while True:
            chain = (self._repair(current, failed_address) if current is not None and failed_address
                     else self._new_chain(refresh=True))
            if chain is not None:
                problems = chain_problems(chain, self.total_layers, self.model_id)
                if not problems:
                    self._hole = None
                    return chain
                log.error("rejecting an invalid chain: %s", problems)
            self._saw_hole()
            if time.monotonic() >= deadline:
                METRICS.unavailable.inc()
                banned = self.avoided()
                report = self.coverage_map(banned=banned).coverage(exclude=banned)
                # peers left out after failing (a refusal that says why, e.g. another privacy level): the holes
                # may be theirs, and a user would otherwise look for a peer that is running
                # (banned, or skipped as a dead process until it announces again)
                left_out = sorted(set(banned) | set(self._unreachable))
                why = [self._ban_reasons[p] for p in left_out if p in self._ban_reasons][:3]
                raise PipelineUnavailable(
                    f"no chain of peers covers all {self.total_layers} layers of {self.model_id} "
                    f"(holes: {report.to_dict().get('holes')})"
                    + (f"; left out after failing: {'; '.join(why)}" if why else ""),
                    self.tunables.retry_after_s,
                )
            time.sleep(0.25)

    # -- Pipeline protocol ---------------------------------------------------------------------------
    def step(self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams,
             step: int) -> int:
        return self._run(session_id, token_ids, start_pos, sampling, step, verify=False).token

    def step_detail(self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams,
                    step: int, *, top_k: int = 0, logits: bool = False):
        """``step`` plus logprobs (``top_k``, from the last hop) or the last position's logits (DetailedPipeline)."""
        want = {"return_top_k": top_k} if top_k else {}
        if logits:
            want["return_logits"] = True
        return self._run(session_id, token_ids, start_pos, sampling, step, verify=False, want=want)

    def verify(self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams,
               step: int, *, one_pass: bool = False):
        """Speculative verify: one step over every draft position; float32 logits [S, V] (same failover). Each
        hop runs the positions one by one as plain decoding does, unless ``one_pass`` (one forward)."""
        result = self._run(session_id, token_ids, start_pos, sampling, step, verify=True, one_pass=one_pass)
        if result.logits is None or result.logits.shape[0] != len(token_ids):
            raise HopError(result.last_hop, grpc.StatusCode.INTERNAL, "verify step returned no per-position logits")
        return result.logits

    def truncate(self, session_id: str, length: int) -> None:
        """Crop the session to ``length`` positions on every hop; the replay history keeps only those.

        A hop that cannot crop (recurrent layers: UNIMPLEMENTED) or fails makes the session start afresh
        on the peers: the next step replays the (cropped) history, so outputs stay exact either way.
        """
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or not 0 <= length <= session.position:
            raise ValueError(f"session {session_id}: cannot truncate to {length}")
        kept: list[_Feed] = []
        for feed in session.feeds:
            if feed.start >= length:
                break
            if feed.start + len(feed.tokens) > length:
                feed = _Feed(feed.tokens[: length - feed.start], feed.start, feed.step, feed.sampling, None)
            kept.append(feed)
        session.feeds = kept
        session.position = length
        self.truncations += 1
        if session.chain is None or session.needs_replay:
            return  # the next step replays the cropped history anyway
        try:
            self.client.truncate(session.peer_session, length, route=_route_of(session.chain))
        except HopError as error:
            if error.code == grpc.StatusCode.UNIMPLEMENTED:  # recurrent layers, or a KV cache compacted meanwhile
                self.truncate_refusals += 1
                if self.truncate_refusals >= 3:
                    self.supports_truncate = False
                log.warning("hop %s cannot crop caches (%s); replaying the accepted history%s", error.address,
                            error.message, "; speculative decoding off" if not self.supports_truncate else "")
                old = (session.peer_session, _route_of(session.chain))
                threading.Thread(target=self._close_quietly, args=old, daemon=True).start()
                session.peer_session = uuid.uuid4().hex
                session.needs_replay = bool(session.feeds)
            else:
                self._on_hop_error(session, error)
                session.chain = None  # route afresh around the banned hop at the next step

    def _run(self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams,
             step: int, *, verify: bool, want: dict | None = None, one_pass: bool = False):
        with self._lock:
            session = self._sessions.setdefault(session_id, _Session())
        if start_pos != session.position:
            raise ValueError(f"session {session_id} is at position {session.position}, step starts at {start_pos}")
        failed_address: str | None = None
        for _attempt in range(self.tunables.max_failovers_per_step + 1):
            try:
                if session.chain is None or failed_address is not None:
                    session.chain = self._wait_for_chain(session.chain, failed_address)
                    failed_address = None
                route = _route_of(session.chain)
                if session.needs_replay:
                    self._replay(session, route)
                extras = self.verifier.step_extras() if self.verifier is not None else {}  # verification hook
                if verify:
                    extras = {"return_logits": True, "all_logits": True}
                    if one_pass:
                        extras["one_pass_verify"] = True
                elif want:
                    extras = {**extras, **want}
                began = time.perf_counter()
                result = self._step_result(session, token_ids, start_pos, sampling, step, route, extras)
            except HopError as error:
                if _evicted(error) and session.evictions < EVICTIONS_REPLAYED:
                    session.evictions += 1
                    METRICS.hop_errors.labels(error.code.name).inc()
                    log.warning("hop %s no longer holds session %s (evicted for other sessions); replaying it on "
                                "the same chain", error.address, session_id)
                    self._restart_session(session)
                    continue
                failed_address = self._on_hop_error(session, error)
                continue
            session.feeds.append(_Feed(list(token_ids), start_pos, step, sampling, None if verify else result.token))
            session.position += len(token_ids)
            METRICS.pipeline_step(len(token_ids), len(session.chain.hops), time.perf_counter() - began)
            for hop in session.chain.hops:
                self.bans.success(hop.peer_id)
                if self.probation is not None:
                    self.probation.release(hop.peer_id)
            if self.verifier is not None and not verify:  # verification hook: records and queues, never blocks
                self.verifier.after_step(session_id, session.chain, token_ids, start_pos, step, sampling, result,
                                         time.perf_counter() - began)
            return result
        METRICS.unavailable.inc()
        raise PipelineUnavailable(f"gave up after {self.tunables.max_failovers_per_step} failovers in one step",
                                  self.tunables.retry_after_s)

    def _step_result(self, session: _Session, token_ids: list[int], start_pos: int, sampling: SamplingParams,
                     step: int, route: list[HopSpec], extras: dict):
        """One step; a new session's first step reuses the peers' cached prompt prefix (router/prefix_plan.py)."""
        if self.prefix is None or start_pos != 0 or session.feeds or extras:
            return self.client.step_result(session.peer_session, token_ids, start_pos, sampling, step,
                                           route=route, **extras)

        def send(skip: int, key):
            session.first_sent = (skip, key) if skip else None
            return self.client.step_result(session.peer_session, token_ids[skip:], skip, sampling, step,
                                           route=route, prefix=key)

        def restart() -> None:  # a hop holds less than proposed: drop the half-built session everywhere
            old, session.peer_session = session.peer_session, uuid.uuid4().hex
            self._close_quietly(old, route)

        return self.prefix.first_step(token_ids, send, restart)

    def _on_hop_error(self, session: _Session, error: HopError) -> str:
        chain = session.chain
        if not error.address and chain is not None:  # a lost step, no hop to blame: restart on the same peers
            log.warning("%s; replaying the session on the same chain", error)
            METRICS.hop_errors.labels(error.code.name).inc()
            self._restart_session(session)
            return ""
        failed = error.address or (chain.hops[-1].peer.grpc_address if chain else "")
        record = next((h.peer for h in chain.hops if h.peer.grpc_address == failed), None) if chain else None
        if record is not None:
            peer_id = record.peer_id
            if _process_gone(error):  # refused/reset: the process is gone, not slow
                self._unreachable[peer_id] = (record.instance, time.time())
                self._cached = (0.0, [])
            backoff = self.bans.ban(peer_id)
            if self.probation is not None and error.code in _SILENT and not _process_gone(error):
                self.probation.hold(peer_id, failed)  # stopped answering: routable again only once it answers
            self._banned_instance[peer_id] = record.instance
            self._ban_reasons[peer_id] = f"{failed}: {error.code.name}: {error.message}"[:300]
            METRICS.bans.inc()
            log.warning("hop %s (%s) failed: %s; banned for %.1f s, failing over", failed, peer_id, error, backoff)
        self.failovers += 1
        METRICS.failovers.inc()
        METRICS.hop_errors.labels(error.code.name).inc()
        if self.on_failover:
            self.on_failover(self.model_id, failed)
        self._restart_session(session, keep=record is not None)
        return failed

    def _restart_session(self, session: _Session, keep: bool = False) -> None:
        """A fresh peer session (replayed before its next step). The old one is freed on its hops (best effort),
        unless ``keep``: then its surviving hops may hand their caches to the new one (see _rebuild)."""
        self._forget_lost(session)
        if session.chain is not None:
            if keep and session.feeds:
                session.lost = (session.peer_session, session.chain)
            else:
                old = (session.peer_session, _route_of(session.chain))
                threading.Thread(target=self._close_quietly, args=old, daemon=True).start()
        session.peer_session = uuid.uuid4().hex
        session.needs_replay = bool(session.feeds)

    def _forget_lost(self, session: _Session) -> None:
        if session.lost is not None:
            old = (session.lost[0], _route_of(session.lost[1]))
            session.lost = None
            threading.Thread(target=self._close_quietly, args=old, daemon=True).start()

    def _rebuild(self, session: _Session, route: Sequence[HopSpec]) -> bool:
        """Replace only the failed span (peer/rebuild.py): hops the old and new chains share before and after it
        keep their caches (adopted under the new peer session, cropped to the committed positions) and only the
        replacement computes the history, from activations its predecessor retained. False: not possible (nothing
        survives, the client cannot, or a hop refused); the caller replays in full on a fresh peer session."""
        if session.lost is None or not hasattr(self.client, "rebuild"):
            return False
        old_session, old_chain = session.lost
        old_route, new_route = _route_of(old_chain), list(route)
        shared = min(len(old_route), len(new_route))
        head = next((i for i in range(shared) if old_route[i] != new_route[i]), shared)
        tail = next((i for i in range(shared - head) if old_route[-1 - i] != new_route[-1 - i]), shared - head)
        if head + tail == 0 or head + tail >= len(new_route):
            return False  # every hop changed, or none did (a lost step): nothing to keep or nothing to rebuild
        span = (new_route[head].start, new_route[len(new_route) - tail - 1].end)
        feeds = [(f.tokens, f.start, f.sampling, f.step) for f in session.feeds]
        prefix, extra = None, 0
        if session.first_sent is not None and feeds[0][1] == 0 and len(feeds[0][0]) > session.first_sent[0]:
            # the first step reused cached prompt blocks: resend it as sent (the retained messages match it), after
            # one message for the skipped blocks, which the hop before the replacement answers from the outputs it
            # kept per prompt block (peer/rebuild.py): the replacement computes them, with or without them cached
            skip, prefix = session.first_sent
            tokens, _start, *rest = feeds[0]
            feeds[0:1] = [(tokens[:skip], 0, *rest), (tokens[skip:], skip, *rest)]
            extra = 1
        try:
            results = self.client.rebuild(session.peer_session, old_session, feeds, new_route, span,
                                          session.position, prefix=prefix)[extra:]
        except HopError as error:
            METRICS.rebuild_fallbacks.inc()
            log.warning("rebuilding layers [%d,%d) failed (%s); replaying the whole history", *span, error)
            self._restart_session(session)  # frees the old session and the half-built new one
            return False
        METRICS.rebuilds.inc()
        if extra:
            session.recomputed_seed.append(span)
        for feed, result in zip(session.feeds, results, strict=True):
            if feed.token_out is not None and result.token >= 0 and result.token != feed.token_out:
                self.replay_mismatches += 1
                METRICS.replay_mismatches.inc()
                log.warning("rebuild of step %d sampled %d, first run sampled %d", feed.step, result.token,
                            feed.token_out)
        log.info("rebuilt layers [%d,%d) of %d positions; %d hops kept their caches", *span, session.position,
                 head + tail)
        return True

    def _replay(self, session: _Session, route: Sequence[HopSpec]) -> None:
        """Rebuild every hop's cache on the new chain exactly as it was built the first time (pipelined when
        the client can: every step sent before the first result is awaited)."""
        METRICS.replays.inc()
        METRICS.replayed_steps.inc(len(session.feeds))
        try:
            if self._rebuild(session, route):
                session.needs_replay = False
                return
        finally:
            self._forget_lost(session)  # adopted (or not): the old session id is done everywhere
        if hasattr(self.client, "replay"):
            results = self.client.replay(session.peer_session,
                                         [(f.tokens, f.start, f.sampling, f.step) for f in session.feeds], route)
        else:
            results = [self.client.step_result(session.peer_session, f.tokens, f.start, f.sampling, f.step,
                                               route=route) for f in session.feeds]
        for feed, result in zip(session.feeds, results, strict=True):
            if feed.token_out is not None and result.token != feed.token_out:
                self.replay_mismatches += 1
                METRICS.replay_mismatches.inc()
                log.warning("replay of step %d sampled %d, first run sampled %d", feed.step, result.token,
                            feed.token_out)
        session.first_sent = None  # the replay sent the first step whole: nothing came from a prefix cache
        session.recomputed_seed.clear()
        session.needs_replay = False

    def _close_quietly(self, peer_session: str, route: Sequence[HopSpec]) -> None:
        try:
            self.client.close(peer_session, route=route)
        except Exception as exc:  # dead hops cannot close anything
            log.debug("closing %s on the old route: %s", peer_session, exc)

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            self._forget_lost(session)
        if session is not None and session.chain is not None:
            route = _route_of(session.chain)
            self._close_quietly(session.peer_session, route)
            if self.on_session_end is not None and session.position > 0 and not session.needs_replay:
                # what every hop of the final chain computed: the prompt blocks the first step took from the hops'
                # prefix caches were paid for by the request that computed them (a hop claiming them again is
                # refused); the hops named with the peer ids they were routed as (a hop answering as another
                # identity is not paid)
                skip = session.first_sent[0] if session.first_sent is not None else 0
                # a hop that replaced a failed span after the first step was seeded computed the seed too
                # (_rebuild): its own receipt (privacy=onion) may claim the whole session
                caps = [session.position if any(a <= h.start and h.end <= b for a, b in session.recomputed_seed)
                        else session.position - skip for h in route]
                try:  # economy/swarm_settlement.py queues it; it never blocks or fails the request
                    self.on_session_end(session_id, session.peer_session, session.position - skip, route, caps)
                except Exception:
                    log.exception("settlement hook failed for %s", session_id)
        if self.verifier is not None:  # verification hook
            self.verifier.on_close(session_id)

    def status(self) -> dict:
        banned, held = self._left_out()
        avoided = banned | held
        return {
            "model_id": self.model_id,
            "total_layers": self.total_layers,
            "coverage": self.coverage_map(banned=avoided).coverage(exclude=avoided).to_dict(),
            "banned": sorted(banned),
            "on_probation": sorted(held),  # banned now or not: out of routes until a probe answers
            "failovers": self.failovers,
            "replay_mismatches": self.replay_mismatches,
            "truncations": self.truncations,
            "liveness": self.client.liveness_status(),
            "active_sessions": len(self._sessions),
            "sessions": {sid: s.chain.peer_ids for sid, s in list(self._sessions.items()) if s.chain is not None},
        }
