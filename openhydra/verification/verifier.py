"""The coordinator's verifier: samples requests to audit, runs the audits off the critical path.

Hooks called by :class:`~openhydra.router.swarm.SwarmPipeline` (each returns in microseconds):

- ``step_extras()``: every step asks the last peer for its top-k log-probabilities, audited or
  not, so a peer cannot tell an audited request from a normal one by what it is asked;
- ``after_step(...)``: records uptime and latency for the chain's peers and queues the step for the
  worker thread, which decides at a request's first step, per hop independently with probability
  ``sample_rate``, whether to audit that hop, and runs the audits (see :mod:`.audits`);
- ``on_close(session_id)``: the request ended; its audits finish (and maybe go to tier 3);
- ``on_hop_failure(model_id, address)``: a hop failed; recorded against its uptime.

The verification cost is the shadow/replay steps; they run on the worker thread while the user's
next steps proceed, and ``metrics_text()`` reports them next to the user's own positions.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import Chain
from openhydra.runtime.sampling import SamplingParams
from openhydra.verification.audits import Audit, AuditRunner, Feed, Outcome
from openhydra.verification.compare import Answer, arithmetic_of
from openhydra.verification.config import VerificationConfig
from openhydra.verification.elimination import Conviction, Elimination
from openhydra.verification.metrics import VerificationMetrics
from openhydra.verification.reputation import ReputationStore

log = logging.getLogger(__name__)

MAX_TRACKED_SESSIONS = 10_000
FLUSH_INTERVAL_S = 1.0


class Verifier:
    def __init__(
        self,
        config: VerificationConfig,
        reputation: ReputationStore,
        *,
        slash: Callable[[str, int, str], int] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.config = config
        self.reputation = reputation
        self.slash = slash
        self.metrics = VerificationMetrics()
        self.rng = random.Random(config.seed)
        self.outcomes: list[Outcome] = []
        self.elimination = Elimination(config.eliminate_after)
        self.convictions: list[Conviction] = []
        self._on_outcome = on_outcome
        self.evidence = None  # an EvidenceBoard (verification/evidence.py): signs slash evidence when set
        self.on_evidence: Callable | None = None  # called with each new SlashEvidence (the node publishes it)
        self.referee = None  # a Referee (verification/referee.py): the node sets it when config.referee
        self._pipeline = None
        self._runner: AuditRunner | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._sessions: OrderedDict[str, list[Audit] | None] = OrderedDict()  # worker thread only
        self._addresses: dict[str, str] = {}  # grpc address -> peer id, from chains seen
        self._pending = 0  # events queued or being handled
        self._pending_cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="verifier", daemon=True)
        self._thread.start()

    # ---- wiring ----------------------------------------------------------------------------------

    def bind(self, pipeline) -> None:
        """Called by SwarmPipeline: its peer list, bans and client are the verifier's too."""
        self._pipeline = pipeline
        self._runner = AuditRunner(
            pipeline.client, self.reputation, self.metrics, top_k=self.config.top_k,
            vote_peers=self.config.vote_peers, audit_rate=self.config.audit_rate, rng=self.rng,
            alternatives=self.alternatives, on_fail=self._on_fail, on_outcome=self._record_outcome,
            referee=self._referee_peer,
        )

    def _referee_peer(self, span: tuple[int, int], dtype: str) -> PeerAnnouncement | None:
        referee = self.referee
        return referee.peer(span, dtype) if referee is not None and self.config.referee else None

    def score(self, peer_id: str) -> float:
        """The coverage map's score hook (0, not routed to: below the reputation floor, or convicted by elimination,
        whose one failed audit may leave a smart liar's score above the floor: it passes every audit it recognises)."""
        return self.reputation.routing_score(peer_id) if not self.elimination.is_convicted(peer_id) else 0.0

    def routable(self, peer_id: str) -> bool:
        """Whether this coordinator routes to ``peer_id`` and asks it to vote: what ``score`` gives above 0."""
        return not self.elimination.is_convicted(peer_id) and not self.reputation.below_floor(peer_id)

    def alternatives(self, span: tuple[int, int], exclude: set[str],
                     like: PeerAnnouncement | None = None) -> list[PeerAnnouncement]:
        """Other routable peers serving exactly ``span``, sorted by peer id (the caller samples); with ``like``, only
        those that compute as it does: the same arithmetic (a record's ``backend``: unquantized, or which quantization
        on which kernel; ShardRuntime.numerics, compare.arithmetic_of). Peers that compute otherwise differ by far
        more than any dtype tolerance (int4 against fp32: 0.95 top-1 agreement): comparing them would accuse honest
        peers."""
        pipeline = self._pipeline
        seen: dict[str, PeerAnnouncement] = {}
        now = time.time()
        for r in pipeline.peers():  # is_banned: a single dict read, safe from this thread
            if ((r.start, r.end) == span and r.peer_id not in exclude and not pipeline.bans.is_banned(r.peer_id)
                    and r.announced_at + r.ttl_s > now and self.routable(r.peer_id)
                    and (like is None or arithmetic_of(r) == arithmetic_of(like))):
                seen[r.peer_id] = r
        return [seen[k] for k in sorted(seen)]

    # ---- hooks (user's thread: cheap, never block) -------------------------------------------------

    def step_extras(self) -> dict:
        return {"return_top_k": self.config.top_k} if self.config.enabled else {}

    def after_step(self, session_id: str, chain: Chain, tokens: list[int], start: int, step: int,
                   sampling: SamplingParams, result, elapsed_s: float) -> None:
        self.metrics.user_positions.inc(len(tokens))
        for hop in chain.hops:
            self._addresses[hop.peer.grpc_address] = hop.peer_id
            self.reputation.record(hop.peer_id, "ok")
            if len(tokens) == 1 and elapsed_s > 0:
                self.reputation.record(hop.peer_id, "latency", value=elapsed_s * 1000.0)
        if not self.config.enabled or self.config.sample_rate <= 0:
            return
        feed = Feed(tuple(tokens), start, step, sampling, Answer.of(result))
        self._put(("step", session_id, chain, feed))

    def on_close(self, session_id: str) -> None:
        if self.config.enabled:
            self._put(("close", session_id, None, None))

    def on_hop_failure(self, model_id: str, address: str) -> None:
        peer_id = self._addresses.get(address)
        if peer_id:
            self.reputation.record(peer_id, "down")

    def _put(self, item: tuple) -> None:
        with self._pending_cv:
            self._pending += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._done_one()
            self.metrics.dropped.inc()
            if item[0] == "step":  # a gap in the feeds would break the shadow's cache: drop its audits
                self._put_drop(item[1])
        self.metrics.queue_depth.set(self._queue.qsize())

    def _put_drop(self, session_id: str) -> None:
        with self._pending_cv:
            self._pending += 1
        try:
            self._queue.put_nowait(("drop", session_id, None, None))
        except queue.Full:
            self._done_one()
            log.warning("verification queue full; session %s keeps a broken audit until close", session_id)

    # ---- worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.is_set():
            try:
                kind, session_id, chain, feed = self._queue.get(timeout=0.2)
            except queue.Empty:
                self.reputation.flush()
                last_flush = time.monotonic()
                if self.referee is not None:
                    self.referee.expire()  # an idle referee's span goes after referee_keep_s
                continue
            try:
                self._handle(kind, session_id, chain, feed)
            except Exception:
                log.exception("verification of %s failed", session_id)
            finally:
                self.metrics.queue_depth.set(self._queue.qsize())
                self._done_one()
            if time.monotonic() - last_flush > FLUSH_INTERVAL_S:
                self.reputation.flush()
                last_flush = time.monotonic()

    def _done_one(self) -> None:
        with self._pending_cv:
            self._pending -= 1
            if self._pending <= 0:
                self._pending_cv.notify_all()

    def _handle(self, kind: str, session_id: str, chain: Chain | None, feed: Feed | None) -> None:
        runner = self._runner
        if runner is None:
            return
        if kind == "step":
            assert chain is not None and feed is not None
            if session_id not in self._sessions:
                self._sessions[session_id] = self._begin(session_id, chain, feed)
                while len(self._sessions) > MAX_TRACKED_SESSIONS:
                    self._finish(self._sessions.popitem(last=False)[1])
            audits = self._sessions[session_id]
            cap = self.config.max_steps_per_audit  # None (default): every step, so no step is safe to lie on
            for audit in audits or ():
                if audit.done:
                    continue
                if chain.hops[audit.hop_index].peer_id != audit.primary.peer_id or len(chain) != len(audit.chain):
                    runner.abandon(audit, "the session failed over to another chain")
                elif cap is not None and audit.compared >= cap:
                    runner.finish(audit)
                else:
                    runner.shadow_step(audit, feed)
        elif kind == "close":
            self._finish(self._sessions.pop(session_id, None))
        elif kind == "drop":
            for audit in self._sessions.get(session_id) or ():
                runner.abandon(audit, "verification queue overflowed")

    def _finish(self, audits: list[Audit] | None) -> None:
        for audit in audits or ():
            self._runner.finish(audit)

    def _begin(self, session_id: str, chain: Chain, feed: Feed) -> list[Audit] | None:
        if feed.start != 0:
            return None  # joined mid-session: the shadow could not rebuild the cache
        audits = []
        for index, hop in enumerate(chain.hops):
            if self.rng.random() >= self.config.sample_rate:
                continue
            options = self.alternatives((hop.start, hop.end), {hop.peer_id}, hop.peer)
            if not options:
                self.metrics.unverifiable.inc()
                continue
            self.metrics.audits.labels("1").inc()
            secondary = self.rng.choice(options)
            audits.append(Audit(session_id, index, chain, secondary, self.config.tolerance.model_dump()))
        return audits or None

    # ---- outcomes ----------------------------------------------------------------------------------

    def _on_fail(self, peer_id: str, detail: str) -> None:
        if self.slash is None or self.config.slash_hydra <= 0:
            return
        try:
            slashed = self.slash(peer_id, int(self.config.slash_hydra * 1_000_000), f"failed audit: {detail}")
            self.metrics.slashed.inc(slashed / 1_000_000)
        except Exception as exc:
            log.warning("slashing %s failed: %s", peer_id, exc)

    def _record_outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self._eliminate(outcome)
        if self.evidence is not None and outcome.failed and outcome.majority is not None:
            self._issue_evidence(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _eliminate(self, outcome: Outcome) -> None:
        """Feed the user chain's verdict to the elimination (verification/elimination.py); fail whom it convicts."""
        if not outcome.chain:
            return
        blamed = set(outcome.failed) | set(outcome.disputed)
        if not outcome.irreproducible and blamed & set(outcome.chain):
            return  # the chain held a peer this audit failed or disputed: that peer answers for it
        conviction = self.elimination.record(outcome.session_id, outcome.chain, bad=outcome.irreproducible)
        if conviction is None:
            return
        self.convictions.append(conviction)
        detail = (f"eliminated: in all {conviction.bad_sessions} user chains whose answers were not reproduced, while "
                  f"{', '.join(conviction.exonerated)} were reproduced without it")
        log.warning("verification: failing %s (%s)", conviction.peer_id, detail)
        self.reputation.record(conviction.peer_id, "fail", detail=detail)
        self.metrics.failures.labels("elimination").inc()
        self._on_fail(conviction.peer_id, detail)

    def avoid(self) -> tuple[frozenset[str], ...]:
        """The router's hook for a new user chain: sets of suspects to leave out while the elimination probes, to try
        in order (empty: route as usual)."""
        if not (self.config.enabled and self.config.probe_suspects):
            return ()
        return self.elimination.avoid()

    def _issue_evidence(self, outcome: Outcome) -> None:
        """Sign a :class:`~openhydra.verification.evidence.SlashEvidence` per failed peer and hand it to
        ``on_evidence`` (the node publishes it through discovery)."""
        from openhydra.verification.evidence import answer_digest, request_digest

        model_id = getattr(self._pipeline, "model_id", "") or "unknown"
        for peer_id in outcome.failed:
            answer = outcome.answers.get(peer_id)
            if answer is None:
                continue
            evidence = self.evidence.issue(
                accused=peer_id, model_id=model_id, request=request_digest(outcome.session_id),
                start=outcome.span[0], end=outcome.span[1], step=int(outcome.step or 0), tier=outcome.tier,
                accused_answer=answer_digest(answer), majority_answer=answer_digest(outcome.majority),
                voters=max(2, len(outcome.answers)), issued_at=time.time())
            if evidence is not None and self.on_evidence is not None:
                try:
                    self.on_evidence(evidence)
                except Exception as exc:
                    log.warning("publishing evidence against %s failed: %s", peer_id, exc)

    # ---- status ------------------------------------------------------------------------------------

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued event has been handled (tests, benchmarks)."""
        with self._pending_cv:
            return self._pending_cv.wait_for(lambda: self._pending <= 0, timeout=timeout_s)

    def status(self) -> dict:
        """``/v1/network/status`` section: the config in force, audit counts and every peer's score."""
        c = self.config
        body = self.reputation.status()
        for peer_id, row in body["peers"].items():  # convicted peers are not routed whatever their score
            row["routable"] = self.routable(peer_id)
        body["verification"] = {
            "enabled": c.enabled, "sample_rate": c.sample_rate, "vote_peers": c.vote_peers,
            "audit_rate": c.audit_rate, "tolerance": c.tolerance.model_dump(),
            "outcomes": len(self.outcomes), "queue_depth": self._queue.qsize(),
            "max_agreeing_diff": {str(tol): round(d, 6) for tol, d in
                                  (self._runner.max_agreeing_diff.items() if self._runner else ())},
            # verification/elimination.py: who is still suspected of irreproducible answers, and who was failed
            "suspects": self.elimination.candidates(),
            "referee": self.referee.status() if self.referee is not None else None,
            "eliminated": [{"peer_id": c.peer_id, "bad_sessions": c.bad_sessions, "cleared": list(c.exonerated)}
                           for c in self.convictions],
        }
        return body

    def network_status(self) -> dict:
        return self.status()

    def metrics_text(self) -> str:
        for peer_id in self.reputation.peer_ids():
            comp = self.reputation.components(peer_id)
            for name, value in comp.items():
                self.metrics.reputation.labels(peer_id, name).set(value)
            self.metrics.reputation.labels(peer_id, "score").set(self.reputation.score(peer_id))
        return self.metrics.text()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.referee is not None:
            self.referee.close()
        self.reputation.close()
