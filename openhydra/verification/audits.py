"""The three tiers, executed on the verification worker thread (never on the user's critical path).

Which span, on which peers. An audit checks one hop of a request's primary chain: the *secondary*
chain is the primary chain with that hop's peer swapped for another peer serving exactly the same
span, so a disagreement can only come from the two peers of that span. The coordinator sees only a
chain's final answer (token + top-k log-probabilities), never a middle peer's hidden states, so
single-hop swaps are what make blame precise.

Same cache history. The secondary chain runs in a *shadow session* fed the very same steps as the
user's session, in order, as they happen (tier 1); a late checker (tier 2 voter, tier 3 auditor)
replays the recorded steps from position 0 on its own session. Either way every peer builds its
cache from the same inputs, so decode steps are comparable, not only the prefill.

- Tier 1 (mystery shopper): compare each shadow answer with the user's answer.
- Tier 2 (redundant execution): at the first disagreement, ``vote_peers - 2`` more peers of the
  span replay up to that step; the answers fall into agreement classes; the class strictly larger
  than every other wins and the peers outside it fail. No strict winner is a tie: every voter gets a
  ``dispute`` (half a failure), no one is slashed.
- The primary votes with a *replay* of its own chain, never with the user's recorded answer. The
  user's answer passed through the other hops in the user's session; the voters' answers pass
  through them in replays. A hop on another span that lies only in sessions it does not take for
  audits would otherwise make the user's answer differ from every replay and the honest primary of
  the audited span would be outvoted (framed). When the primary's replay sides with the majority
  while the user's answer does not, the user's answer is *irreproducible*: some hop of the chain
  behaved differently in the user's session than in replays. Nobody of the span is blamed for it; the
  outcome lists the chain's peers as suspects and is counted (``irreproducible``).
- Tier 3 (auditor): when primary and secondary agreed on every compared step, with probability
  ``audit_rate`` the most reputable other peer of the span (the auditor) replays the request. If it
  disagrees, the pair cannot vote for itself (two colluders would outvote any auditor): up to
  ``vote_peers - 2`` further independent peers replay to that step and the independents' majority
  decides. A lone auditor (no independent peer answered) decides alone unless it has been through fewer
  audits than each peer of the pair; then only the auditor is disputed (a fresh liar drawn as the
  auditor of an honest pair with a history must not fail two peers on its word; the price: a colluding
  pair with a longer audit history than the only other peer of its span is not punished by it).
- Referee (verification/referee.py): when a tier-2 vote ties, or a tier-3 auditor stands alone, the
  coordinator loads the span itself and replays as one more voter. It breaks a tie only by agreeing with a
  peer's answer (tier 3: with the pair's answer counts), and is never itself passed, failed or disputed.
- Majority voting assumes an honest majority among the voters of a span: two colluders and one
  honest peer win a tier-2 vote. The auditor tier is what catches an agreeing pair.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec
from openhydra.router.coverage import Chain
from openhydra.runtime.sampling import SamplingParams
from openhydra.verification.compare import Answer, Comparison, Verdict, arithmetic_of, compare, tolerance_for
from openhydra.verification.metrics import VerificationMetrics
from openhydra.verification.referee import REFEREE
from openhydra.verification.reputation import ReputationStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Feed:
    """One step of the user's session and the primary chain's answer to it."""

    tokens: tuple[int, ...]
    start: int
    step: int
    sampling: SamplingParams
    answer: Answer


@dataclass
class Audit:
    session_id: str
    hop_index: int
    chain: Chain  # the primary chain when the audit began
    secondary: PeerAnnouncement
    tolerances: dict[str, float]  # by dtype (VerificationConfig.tolerance)
    dtypes: set[str] = field(default_factory=set)  # of every peer whose answers are compared
    shadow_session: str = field(default_factory=lambda: uuid.uuid4().hex)  # the same format as a user session
    feeds: list[Feed] = field(default_factory=list)
    compared: int = 0
    done: bool = False

    @property
    def primary(self) -> PeerAnnouncement:
        return self.chain.hops[self.hop_index].peer

    def __post_init__(self) -> None:
        self.dtypes |= {h.peer.dtype for h in self.chain.hops} | {self.secondary.dtype}

    @property
    def tol(self) -> float:
        """The loosest tolerance among the dtypes involved: a bf16 auditor loosens an fp32 pair's."""
        return tolerance_for(self.dtypes, self.tolerances)

    @property
    def span(self) -> tuple[int, int]:
        hop = self.chain.hops[self.hop_index]
        return hop.start, hop.end


@dataclass
class Outcome:
    """What one audit concluded (tests read it; the reputation store records it)."""

    session_id: str
    span: tuple[int, int]
    tier: int
    failed: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    disputed: list[str] = field(default_factory=list)
    step: int | None = None
    reason: str = ""
    irreproducible: bool = False  # the user's answer differed from a replay of its own chain
    answers: dict[str, Answer] = field(default_factory=dict)  # each voter's answer at ``step`` (evidence digests)
    majority: Answer | None = None  # the winning class's answer (tiers 2 and 3, when someone failed)
    chain: list[str] = field(default_factory=list)  # the user's chain (peer ids) whose answer was audited
    refereed: bool = False  # the coordinator's referee voted (verification/referee.py)

    @property
    def suspects(self) -> list[str]:
        """Irreproducible: every peer of the user's chain (one of them behaved differently in the user's session)."""
        return list(self.chain) if self.irreproducible else []


def swapped_route(chain: Chain, hop_index: int, peer: PeerAnnouncement) -> list[HopSpec]:
    """The chain with ``peer`` at ``hop_index``. The swapped hop carries its static key: the referee is not
    announced, so the client's lookup by address would not find it."""
    return [
        HopSpec(address=peer.grpc_address, start=h.start, end=h.end, peer_id=peer.peer_id,
                static_key=peer.static_key) if i == hop_index else
        HopSpec(address=h.peer.grpc_address, start=h.start, end=h.end)
        for i, h in enumerate(chain.hops)
    ]


class AuditRunner:
    def __init__(
        self,
        client,
        reputation: ReputationStore,
        metrics: VerificationMetrics,
        *,
        top_k: int,
        vote_peers: int,
        audit_rate: float,
        rng: random.Random,
        alternatives: Callable[[tuple[int, int], set[str], PeerAnnouncement | None], list[PeerAnnouncement]],
        on_fail: Callable[[str, str], None],
        on_outcome: Callable[[Outcome], None] | None = None,
        referee: Callable[[tuple[int, int], str], PeerAnnouncement | None] | None = None,
    ) -> None:
        self.client, self.reputation, self.metrics = client, reputation, metrics
        self.referee = referee  # (span, dtype) -> the coordinator's own copy of the span (verification/referee.py)
        self.top_k, self.vote_peers, self.audit_rate = top_k, vote_peers, audit_rate
        self.rng, self.alternatives, self.on_fail, self.on_outcome = rng, alternatives, on_fail, on_outcome
        self.max_agreeing_diff: dict[float, float] = {}  # tolerance -> largest diff among agreeing answers

    # ---- re-execution -------------------------------------------------------------------------------

    def _run(self, session: str, feed: Feed, route: Sequence[HopSpec]) -> Answer:
        started = time.perf_counter()
        try:
            result = self.client.step_result(session, list(feed.tokens), feed.start, feed.sampling, feed.step,
                                             return_top_k=self.top_k, route=route)
        finally:
            self.metrics.busy_seconds.inc(time.perf_counter() - started)
            self.metrics.extra_steps.inc()
            self.metrics.extra_positions.inc(len(feed.tokens))
        return Answer.of(result)

    def _replay(self, feeds: Sequence[Feed], route: Sequence[HopSpec]) -> list[Answer]:
        session = uuid.uuid4().hex  # the same format as a user session: no name gives an audit away
        try:
            return [self._run(session, f, route) for f in feeds]
        finally:
            self._close(session, route)

    def _close(self, session: str, route: Sequence[HopSpec]) -> None:
        try:
            self.client.close(session, route=route)
        except Exception as exc:  # best effort: a dead hop holds nothing
            log.debug("closing audit session %s: %s", session, exc)

    def _compare(self, a: Answer, b: Answer, audit: Audit, feed: Feed) -> Comparison:
        result = compare(a, b, audit.tol, feed.sampling.greedy)
        self.metrics.verdicts.labels(result.verdict.value).inc()
        if result.verdict is not Verdict.DISAGREE:
            self.max_agreeing_diff[audit.tol] = max(self.max_agreeing_diff.get(audit.tol, 0.0), result.max_diff)
        return result

    def _agree(self, a: Answer, b: Answer, audit: Audit, feed: Feed) -> bool:
        return compare(a, b, audit.tol, feed.sampling.greedy).verdict is not Verdict.DISAGREE

    # ---- tier 1 -------------------------------------------------------------------------------------

    def shadow_step(self, audit: Audit, feed: Feed) -> None:
        """Run ``feed`` on the shadow session and compare; escalate to a vote on disagreement."""
        route = swapped_route(audit.chain, audit.hop_index, audit.secondary)
        try:
            answer = self._run(audit.shadow_session, feed, route)
        except HopError as exc:
            self.abandon(audit, f"shadow hop failed: {exc}")
            return
        audit.feeds.append(feed)
        audit.compared += 1
        self.metrics.steps_compared.inc()
        result = self._compare(feed.answer, answer, audit, feed)
        if result.verdict is Verdict.DISAGREE:
            self._finish_shadow(audit)
            self._vote(audit, answer, result.reason)

    def abandon(self, audit: Audit, why: str) -> None:
        log.info("audit of %s span [%d, %d) abandoned: %s", audit.session_id, *audit.span, why)
        self.metrics.abandoned.inc()
        self._finish_shadow(audit)

    def _finish_shadow(self, audit: Audit) -> None:
        if not audit.done:
            audit.done = True
            self._close(audit.shadow_session, swapped_route(audit.chain, audit.hop_index, audit.secondary))

    def finish(self, audit: Audit) -> None:
        """The request ended (or hit the step cap) with primary and secondary agreeing: maybe tier 3."""
        if audit.done:
            return
        self._finish_shadow(audit)
        if not audit.feeds:
            return
        pair = [audit.primary.peer_id, audit.secondary.peer_id]
        if self.rng.random() < self.audit_rate:
            self._audit(audit, pair)
        else:
            self._conclude(audit, Outcome(audit.session_id, audit.span, 1, passed=pair))

    # ---- tier 2 -------------------------------------------------------------------------------------

    def _vote(self, audit: Audit, secondary_answer: Answer, reason: str) -> None:
        self.metrics.audits.labels("2").inc()
        t = len(audit.feeds) - 1
        feed = audit.feeds[t]
        voters: list[tuple[str, Answer]] = [(audit.secondary.peer_id, secondary_answer)]
        exclude = {audit.primary.peer_id, audit.secondary.peer_id}
        try:  # the primary votes with a replay of its chain, like every other voter (see the module docstring)
            primary_replay = self._replay(audit.feeds, swapped_route(audit.chain, audit.hop_index, audit.primary))[-1]
            voters.insert(0, (audit.primary.peer_id, primary_replay))
        except HopError as exc:
            log.info("primary %s failed its replay: %s", audit.primary.peer_id, exc)
            primary_replay = None
            if exc.address == audit.primary.grpc_address:  # it refused its own replay: judged on the user's answer
                voters.insert(0, (audit.primary.peer_id, feed.answer))
        for peer in self._pick(audit.span, exclude, self.vote_peers - 2, audit.primary):
            audit.dtypes.add(peer.dtype)
            try:
                voters.append((peer.peer_id, self._replay(audit.feeds, swapped_route(audit.chain, audit.hop_index,
                                                                                      peer))[-1]))
            except HopError as exc:
                log.info("voter %s failed: %s", peer.peer_id, exc)
        if self._irreproducible(audit, voters, primary_replay, feed, tier=2, reason=reason):
            return
        if self._tied(self._classes(voters, audit, feed)):  # e.g. a span with only two peers: ask the referee
            self._ask_referee(audit, voters, audit.feeds)
        self._decide(audit, voters, feed, tier=2, reason=reason, step=feed.step)

    def _irreproducible(self, audit: Audit, voters: list[tuple[str, Answer]], primary_replay: Answer | None,
                        feed: Feed, *, tier: int, reason: str) -> bool:
        """True (and concluded) when the user's answer differs from a replay of its own chain while that replay
        agrees with every other voter: the span's peers agree with each other and the difference came from a
        hop that behaved differently in the user's session, so nobody of this span is blamed."""
        if primary_replay is None or self._agree(primary_replay, feed.answer, audit, feed):
            return False
        others = [a for p, a in voters if p != audit.primary.peer_id]
        if others and not all(self._agree(primary_replay, a, audit, feed) for a in others):
            return False  # the span's peers disagree among replays too: a vote decides
        self.metrics.irreproducible.inc()
        self._conclude(audit, Outcome(audit.session_id, audit.span, tier, step=feed.step, irreproducible=True,
                                      reason=f"user's answer not reproduced by its own chain ({reason})"))
        return True

    def _classes(self, voters: list[tuple[str, Answer]], audit: Audit, feed: Feed) -> list[list[tuple[str, Answer]]]:
        """Agreement classes, in the order their first voter voted."""
        classes: list[list[tuple[str, Answer]]] = []
        for voter in voters:
            home = next((c for c in classes if self._agree(c[0][1], voter[1], audit, feed)), None)
            if home is None:
                classes.append([voter])
            else:
                home.append(voter)
        return classes

    @staticmethod
    def _tied(classes: list[list[tuple[str, Answer]]]) -> bool:
        sizes = sorted((len(c) for c in classes), reverse=True)
        return len(sizes) > 1 and sizes[0] == sizes[1]

    def _ask_referee(self, audit: Audit, voters: list[tuple[str, Answer]], feeds: Sequence[Feed]) -> bool:
        """Add the referee's replay to ``voters`` (True), when this coordinator can serve the span itself."""
        if self.referee is None:
            return False
        record = self.referee(audit.span, audit.primary.dtype)
        if record is None or arithmetic_of(record) != arithmetic_of(audit.primary):  # not the audited peer's arithmetic
            self.metrics.referee.labels("unavailable").inc()
            return False
        audit.dtypes.add(record.dtype)
        try:
            voters.append((REFEREE, self._replay(feeds, swapped_route(audit.chain, audit.hop_index, record))[-1]))
        except HopError as exc:  # a hop of the replay failed (perhaps another span's): no referee this time
            log.info("referee replay of span [%d, %d) failed: %s", *audit.span, exc)
            self.metrics.referee.labels("failed").inc()
            return False
        return True

    def _decide(self, audit: Audit, voters: list[tuple[str, Answer]], feed: Feed, *, tier: int, reason: str,
                step: int, judged: list[str] | None = None) -> None:
        classes = self._classes(voters, audit, feed)
        sizes = sorted((len(c) for c in classes), reverse=True)
        everyone = [p for p, _ in voters if p != REFEREE] + (judged or [])
        refereed = any(p == REFEREE for p, _ in voters)
        winners = max(classes, key=len)
        if self._tied(classes):
            # The referee breaks a tie by siding with a peer: another voter, or (tier 3) the judged pair's answer.
            # Alone against everyone it proves nothing: its replay passed through the chain's other hops too.
            home = next((c for c in classes if any(p == REFEREE for p, _ in c)), None)
            if home is None or not (len(home) > 1 or (judged and self._agree(home[0][1], feed.answer, audit, feed))):
                self.metrics.ties.inc()
                if refereed:
                    self.metrics.referee.labels("tie").inc()
                self._conclude(audit, Outcome(audit.session_id, audit.span, tier, disputed=everyone, step=step,
                                              reason=f"tie {sizes}: {reason}", refereed=refereed))
                return
            winners = home
            reason = f"tie {sizes} broken by the referee: {reason}"
        if refereed:
            self.metrics.referee.labels("decided").inc()
        winning_ids = {p for p, _ in winners}
        failed = [p for p in everyone if p not in winning_ids]
        if judged:  # tier 3: the pair stands or falls with whether the independents' answer matches it
            pair_agrees = self._agree(winners[0][1], feed.answer, audit, feed)
            failed = [p for p, _ in voters if p not in winning_ids and p != REFEREE] + ([] if pair_agrees else judged)
            passed = [p for p in everyone if p not in failed]
        else:
            passed = sorted(winning_ids - {REFEREE})
        answers = dict(voters)
        if judged:
            answers.update(dict.fromkeys(judged, feed.answer))
        self._conclude(audit, Outcome(audit.session_id, audit.span, tier, failed=failed, passed=passed, step=step,
                                      reason=reason, answers=answers, majority=winners[0][1], refereed=refereed))

    # ---- tier 3 -------------------------------------------------------------------------------------

    def _audit(self, audit: Audit, pair: list[str]) -> None:
        auditors = self._most_trusted(audit.span, set(pair), audit.primary)
        if not auditors:
            self.metrics.unverifiable.inc()
            self._conclude(audit, Outcome(audit.session_id, audit.span, 1, passed=pair))
            return
        self.metrics.audits.labels("3").inc()
        auditor = auditors[0]
        audit.dtypes.add(auditor.dtype)
        try:
            answers = self._replay(audit.feeds, swapped_route(audit.chain, audit.hop_index, auditor))
        except HopError as exc:
            self.abandon(audit, f"auditor failed: {exc}")
            self._conclude(audit, Outcome(audit.session_id, audit.span, 1, passed=pair))
            return
        for t, (feed, answer) in enumerate(zip(audit.feeds, answers, strict=True)):
            result = self._compare(feed.answer, answer, audit, feed)
            self.metrics.steps_compared.inc()
            if result.verdict is not Verdict.DISAGREE:
                continue
            voters: list[tuple[str, Answer]] = [(auditor.peer_id, answer)]
            for peer in self._pick(audit.span, {*pair, auditor.peer_id}, self.vote_peers - 2, audit.primary):
                audit.dtypes.add(peer.dtype)
                try:
                    route = swapped_route(audit.chain, audit.hop_index, peer)
                    voters.append((peer.peer_id, self._replay(audit.feeds[: t + 1], route)[-1]))
                except HopError as exc:
                    log.info("independent voter %s failed: %s", peer.peer_id, exc)
            why = f"auditor {auditor.peer_id}: {result.reason}"
            try:  # before the pair is judged on the user's answer: does its own chain reproduce that answer?
                route = swapped_route(audit.chain, audit.hop_index, audit.primary)
                primary_replay = self._replay(audit.feeds[: t + 1], route)[-1]
            except HopError as exc:
                log.info("primary %s failed its replay: %s", audit.primary.peer_id, exc)
                primary_replay = None
            if self._irreproducible(audit, voters, primary_replay, feed, tier=3, reason=why):
                return
            if len(voters) == 1:  # a lone auditor: the referee checks its word before two peers fail on it
                self._ask_referee(audit, voters, audit.feeds[: t + 1])
            if len(voters) == 1 and self._newer(auditor.peer_id, pair):
                # A lone auditor with less audit history than either peer of the agreeing pair: its word alone
                # must not fail two peers (a fresh liar drawn as the auditor of an honest pair would frame both).
                # Only the auditor is disputed; the pair is neither passed nor failed.
                self.metrics.ties.inc()
                self._conclude(audit, Outcome(audit.session_id, audit.span, 3, disputed=[auditor.peer_id],
                                              step=feed.step,
                                              reason=f"lone auditor with less audit history than the pair: {why}"))
                return
            self._decide(audit, voters, feed, tier=3, reason=why, step=feed.step, judged=pair)
            return
        self._conclude(audit, Outcome(audit.session_id, audit.span, 3, passed=[*pair, auditor.peer_id]))

    # ---- bookkeeping --------------------------------------------------------------------------------

    def _pick(self, span: tuple[int, int], exclude: set[str], k: int, like: PeerAnnouncement) -> list[PeerAnnouncement]:
        candidates = self.alternatives(span, exclude, like)
        return self.rng.sample(candidates, min(k, len(candidates))) if k > 0 else []

    def _newer(self, auditor: str, pair: list[str]) -> bool:
        """Whether ``auditor`` has been through fewer audits (passed, failed or disputed) than each of ``pair``."""
        def history(peer_id: str) -> float:
            counts = self.reputation.counts(peer_id)
            return counts["pass"] + counts["fail"] + counts["dispute"]

        return all(history(auditor) < history(p) for p in pair)

    def _most_trusted(self, span: tuple[int, int], exclude: set[str],
                      like: PeerAnnouncement) -> list[PeerAnnouncement]:
        """The auditor: the most reputable peer of the span outside the pair that computes as ``like`` does (ties drawn
        at random)."""
        candidates = self.alternatives(span, exclude, like)
        if not candidates:
            return []
        scores = {p.peer_id: round(self.reputation.score(p.peer_id), 6) for p in candidates}
        best = max(scores.values())
        return [self.rng.choice([p for p in candidates if scores[p.peer_id] == best])]

    def _conclude(self, audit: Audit, outcome: Outcome) -> None:
        outcome.chain = list(audit.chain.peer_ids)
        detail = f"session {outcome.session_id} span {list(outcome.span)} tier {outcome.tier}: {outcome.reason}"
        for peer_id in outcome.passed:
            self.reputation.record(peer_id, "pass", detail=detail)
        for peer_id in outcome.disputed:
            self.reputation.record(peer_id, "dispute", detail=detail)
        for peer_id in outcome.failed:
            self.reputation.record(peer_id, "fail", detail=detail)
            self.metrics.failures.labels(str(outcome.tier)).inc()
            self.on_fail(peer_id, detail)
        if outcome.irreproducible:
            log.warning("verification: irreproducible answer, suspects %s (%s)", outcome.suspects, detail)
        if outcome.failed or outcome.disputed:
            log.warning("verification: failed %s disputed %s (%s)", outcome.failed, outcome.disputed, detail)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
