"""The coordinator's side of swarm settlement: collect every hop's signature, record, charge, distribute.

When a session served through the swarm ends (router/swarm.py calls :meth:`SwarmSettler.submit` from
``SwarmPipeline.close``), the settler, on its own thread and never on the request path:

1. asks every hop of the session's final chain who it is and what it served (``SignSettlement`` with
   no pipeline: peer id, Ed25519 key, positions computed);
2. builds the pipeline ``[(peer_id, key, layers), ...]`` and asks every hop to sign the settlement body
   for ``tokens_served`` = the positions every hop computed (prompt + generated tokens fed back, less the
   prompt blocks seeded from the prefix cache); each peer checks the claim against what it served before
   signing (economy/peer_settlement.py);
3. applies the fully signed receipt to this node's ledger (1,000 tokens = 1 credit, split by layers);
4. charges the requester (this node, see :meth:`SwarmSettler._charge` and docs/economy.md);
5. sends the same receipt to every other hop (``ApplySettlement``), which verifies it and applies its own
   share to its own ledger, once: the coordinator's ledger pays every hop, a hop's ledger pays that hop.

Every call names (or, for a receipt, settles) a session, so each carries this coordinator's tag under that hop's
settlement key (peer/session_auth.py), which the session's close kept (``client.take_settlement_keys``); a hop
refuses an untagged call about a keyed session with PERMISSION_DENIED. Without encryption there are no keys and
no tags (privacy=off protects nothing).

Any failure is logged and counted (``counts``, ``/metrics``) and never reaches the client: serving
does not depend on settlement.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc

from openhydra.economy.errors import InsufficientFunds, LedgerError
from openhydra.economy.peer_settlement import Claim
from openhydra.economy.receipts import PipelineEntry, ServedShare, SettlementRequest
from openhydra.economy.settlement_wire import claim_to_pb, receipt_to_pb
from openhydra.economy.views import SettlementResult
from openhydra.peer.session_auth import SettlementKeys

log = logging.getLogger(__name__)

DAY_S = 86_400.0
MAX_QUEUE = 1024  # sessions waiting to settle; beyond this new ones are dropped (and counted)

OUTCOMES = ("settled", "failed", "dropped", "peer_applied", "peer_replayed", "peer_failed",
            "charged", "free_tier", "over_free_tier", "self_served")


class SettlementFailed(RuntimeError):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


class FreeTier:
    """Tokens a requester without credits may use per rolling 24 h (in memory, per node)."""

    def __init__(self, tokens_per_day: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.tokens_per_day = tokens_per_day
        self.clock = clock
        self._used: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def used(self) -> int:
        with self._lock:
            self._expire(self.clock())
            return sum(n for _, n in self._used)

    def take(self, tokens: int) -> bool:
        """Use ``tokens`` of the allowance; False (nothing taken) when it would go over."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            if sum(n for _, n in self._used) + tokens > self.tokens_per_day:
                return False
            self._used.append((now, tokens))
            return True

    def _expire(self, now: float) -> None:
        while self._used and now - self._used[0][0] >= DAY_S:
            self._used.popleft()


class SwarmSettler:
    def __init__(self, economy: Any, client: Any, model_id: str, *, free_tier_tokens_per_day: int = 100_000) -> None:
        self.economy = economy
        self.client = client  # PeerChainClient: peer_calls([(address, method, request), ...])
        self.model_id = model_id
        self.free_tier = FreeTier(free_tier_tokens_per_day)
        self.counts: collections.Counter[str] = collections.Counter({k: 0 for k in OUTCOMES})
        self.failures: collections.Counter[str] = collections.Counter()  # by stage
        self.last_ms: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle")
        self._queued = 0
        self.completed = 0  # settlements finished, whatever their outcome
        self._lock = threading.Lock()

    # -- entry point (called from SwarmPipeline.close, on a decode thread) ---------------------------
    def submit(self, request_id: str, peer_session: str, positions: int, hops: Sequence[Any],
               caps: Sequence[int] | None = None) -> Future | None:
        """Queue the settlement of a finished session; returns its future (None when dropped). ``positions``: what
        every hop computed; ``caps``: per hop, the most its own receipt may claim (privacy=onion: a hop that
        replaced a failed span recomputed the prompt blocks the others took from their prefix caches)."""
        if positions < 1 or not hops:
            return None
        with self._lock:
            if self._queued >= MAX_QUEUE:
                self.counts["dropped"] += 1
                log.warning("settlement queue full; request %s is not settled", request_id)
                return None
            self._queued += 1
        spans = [(h.address, int(h.start), int(h.end)) for h in hops]
        routed = [getattr(h, "peer_id", "") or "" for h in hops]
        try:
            return self._executor.submit(self._run, request_id, peer_session, positions, spans, routed,
                                         list(caps) if caps is not None else None)
        except RuntimeError:  # shut down: the node is stopping (a session that closed after the node's shutdown)
            with self._lock:
                self._queued -= 1
            self.counts["dropped"] += 1
            log.info("the node is stopping: request %s is not settled", request_id)
            return None

    def _run(self, request_id: str, peer_session: str, positions: int, hops: list[tuple[str, int, int]],
             routed: list[str] | None = None, caps: list[int] | None = None):
        began = time.perf_counter()
        try:
            return self.settle(request_id, peer_session, positions, hops, routed, caps)
        except Exception as exc:  # never raised to anyone: serving does not depend on settlement
            stage = exc.stage if isinstance(exc, SettlementFailed) else type(exc).__name__
            self.counts["failed"] += 1
            self.failures[stage] += 1
            log.warning("settlement of request %s failed (%s): %s", request_id, stage, exc)
            return None
        finally:
            self.last_ms = (time.perf_counter() - began) * 1000
            with self._lock:
                self._queued -= 1
                self.completed += 1  # last: a reader that sees it also sees last_ms and the outcome counts

    # -- the protocol --------------------------------------------------------------------------------
    def settle(self, request_id: str, peer_session: str, tokens: int, hops: list[tuple[str, int, int]],
               routed: list[str] | None = None, caps: list[int] | None = None) -> SettlementResult | None:
        """``tokens``: the positions every hop of the final chain computed (the session's, less the prompt blocks
        taken from the hops' prefix caches); ``routed``: the peer ids the hops were routed as ("" unknown);
        ``caps``: per hop, the most its own receipt may claim under onion (default ``tokens``)."""
        if getattr(getattr(self.client, "privacy", None), "onion", False):  # one receipt per hop, via the onion
            from openhydra.economy.onion_settlement import settle_onion

            return settle_onion(self, request_id, peer_session, tokens, hops, caps)

        take = getattr(self.client, "take_settlement_keys", None)
        keys = take(peer_session) if take is not None else None  # None: privacy off, nothing to tag

        def claim(address: str, start: int, end: int, pipeline: tuple[PipelineEntry, ...] = ()) -> Any:
            message = claim_to_pb(Claim(peer_session, request_id, self.model_id, tokens, start, end, pipeline))
            return message if keys is None else keys.sign_claim(address, message)

        who = self._ask("identity", [(a, "SignSettlement", claim(a, s, e)) for a, s, e in hops])
        for (address, _, _), answer, peer in zip(hops, who, routed or [""] * len(hops), strict=True):
            # A keyed session was sealed to the routed record's key, so the hop that served it is that peer: one
            # answering as another identity (a Sybil that never served) is not paid. Without keys (privacy=off) the
            # address is all that was routed to, and whoever answers there served.
            if keys is not None and peer and answer.peer_id != peer:
                raise SettlementFailed("identity", f"{address} answers as {answer.peer_id}, routed as {peer}")
            if answer.positions_served < tokens:
                served = answer.positions_served
                raise SettlementFailed("identity", f"{address} computed {served} of {tokens} positions")
        pipeline = tuple(
            PipelineEntry(peer_id=a.peer_id, public_key=a.public_key.hex(), layers_served=e - s)
            for (_, s, e), a in zip(hops, who, strict=True)
        )
        signed = self._ask("sign", [(a, "SignSettlement", claim(a, s, e, pipeline)) for a, s, e in hops])
        receipt = SettlementRequest(
            request_id=request_id, model_id=self.model_id, tokens_served=tokens,
            shares=[ServedShare(**p.model_dump(), signature=a.signature.hex()) for p, a in zip(pipeline, signed,
                                                                                             strict=True)],
        )
        receipt.verify()
        try:
            result = self.economy.settle(receipt)
        except LedgerError as exc:
            raise SettlementFailed("ledger", str(exc)) from exc
        self.counts["settled"] += 1
        if result is not None:
            self._charge(receipt, result)
        self._distribute(receipt, [(address, p) for (address, _, _), p in zip(hops, pipeline, strict=True)], keys)
        return result

    def _ask(self, stage: str, calls: list[tuple[str, str, Any]]) -> list[Any]:
        answers = self.client.peer_calls(calls)
        for (address, _, _), answer in zip(calls, answers, strict=True):
            if isinstance(answer, BaseException):
                detail = answer.details() if isinstance(answer, grpc.aio.AioRpcError) else str(answer)
                raise SettlementFailed(stage, f"{address}: {detail}")
        return answers

    def _distribute(self, receipt: SettlementRequest, hops: list[tuple[str, PipelineEntry]],
                    keys: SettlementKeys | None = None) -> None:
        """Every other serving peer applies the same receipt to its own ledger (at most once), each copy tagged
        for its hop when the session agreed keys."""
        own = getattr(self.economy, "peer_id", "")
        others = [address for address, entry in hops if entry.peer_id != own]
        if not others:
            return
        message = receipt_to_pb(receipt)
        replies = self.client.peer_calls([
            (a, "ApplySettlement", message if keys is None else keys.sign_receipt(a, message, receipt.receipt_id))
            for a in others])
        for address, reply in zip(others, replies, strict=True):
            if not isinstance(reply, BaseException):
                self.counts["peer_applied"] += 1
            elif isinstance(reply, grpc.aio.AioRpcError) and reply.code() == grpc.StatusCode.ALREADY_EXISTS:
                self.counts["peer_replayed"] += 1  # it already holds this receipt: the goal is met
            else:
                self.counts["peer_failed"] += 1
                log.warning("peer %s did not apply receipt %s: %s", address, receipt.receipt_id, reply)

    def _charge(self, receipt: SettlementRequest, result: SettlementResult) -> str:
        """The requester (this node) pays for the layers others served.

        With enough barter credits it spends (burns) exactly what the other peers earned; without, the
        request is on the free tier (``free_tier_tokens_per_day`` tokens per rolling day); beyond that it
        is counted as ``over_free_tier``. The answer was already delivered, so nothing is refused here."""
        own = getattr(self.economy, "peer_id", "")
        cost = sum(c for peer, c in result.credits.items() if peer != own)
        if cost <= 0:
            outcome = "self_served"
        else:
            try:
                self.economy.spend_credits(cost, ref=f"request:{receipt.request_id}")
                outcome = "charged"
            except InsufficientFunds:
                outcome = "free_tier" if self.free_tier.take(receipt.tokens_served) else "over_free_tier"
                if outcome == "over_free_tier":
                    log.warning("request %s: no credits and the free tier (%d tokens/day) is used up",
                                receipt.request_id, self.free_tier.tokens_per_day)
        self.counts[outcome] += 1
        return outcome

    # -- status ----------------------------------------------------------------------------------------
    def network_status(self) -> dict[str, Any]:
        counts = dict(self.counts)
        free_requests = counts.pop("free_tier", 0)
        return {
            **counts,
            "free_tier_requests": free_requests,
            "completed": self.completed,
            "queued": self._queued,
            "failures_by_stage": dict(self.failures),
            "last_ms": None if self.last_ms is None else round(self.last_ms, 2),
            "free_tier": {"tokens_per_day": self.free_tier.tokens_per_day, "used_tokens": self.free_tier.used()},
        }

    def metrics_text(self) -> str:
        lines = ["# HELP openhydra_swarm_settlements_total Swarm settlements by outcome (coordinator side).",
                 "# TYPE openhydra_swarm_settlements_total counter"]
        lines += [f'openhydra_swarm_settlements_total{{outcome="{k}"}} {v}' for k, v in sorted(self.counts.items())]
        return "\n".join(lines) + "\n"

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for queued settlements (shutdown, tests)."""
        self._executor.submit(lambda: None).result(timeout=timeout_s)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
