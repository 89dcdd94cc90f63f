"""The serving peer's side of swarm settlement: remember what it served, sign only that, apply receipts.

A peer records, per session, how many positions it computed (``served``: the positions of each step it ran,
added up, not the position a step reached: a session seeded from the prefix cache, or one that took over another
session's cache, did not compute what it was seeded with; a red team's coordinator had one 3,500-position prefill
signed for again and again). A session that takes over another's cache (a failover elsewhere in the chain) takes
its record with it (``adopt``). When the coordinator asks it to sign a settlement (the ``SignSettlement`` RPC) it
checks the claim against that record before signing the settlement body (economy/receipts.py) with its Ed25519
identity:

* the model and the span ``[start, end)`` are the ones this peer serves;
* the session is one it served, and ``tokens_served`` is at most the positions it computed for it;
* its own pipeline entry is its peer id, its key, and exactly ``end - start`` layers, once;
* a session is settled by one request only (the same claim may be signed again: retries are safe).

The fully signed receipt then comes back (``ApplySettlement``) and, after the signatures are verified and only if
this peer signed exactly that receipt, **this peer's share** of it is applied to its own ledger: the other peers it
names are the coordinator's word, which this hop cannot check (a stranger's coordinator listed made-up peers and had
this ledger mint them credits and HYDRA). The ledger's unique keys make the application at most once: a replay is
refused with :class:`~openhydra.economy.errors.ReceiptAlreadyApplied`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from openhydra.economy.receipts import PipelineEntry, ServedShare, SettlementRequest, settlement_body
from openhydra.economy.signing import SigningIdentity
from openhydra.economy.views import SettlementResult

SERVED_TTL_S = 900.0  # how long a finished session can still be settled, s
MAX_SESSIONS = 20_000  # sessions remembered (oldest forgotten first)


class SettlementRefused(ValueError):
    """The claim does not match what this peer served; nothing was signed."""


@dataclass
class _Served:
    positions: int  # computed by this peer for the session (and the sessions it adopted)
    touched: float
    reached: int = 0  # the furthest position a step ended at (a verify's rejected drafts are computed, not kept)
    first: int = 0  # where its first step started (past 0: the prompt blocks before it came from the prefix cache)
    signed_request: str | None = None
    signed_receipt: str | None = None
    auth: tuple[int, bytes] | None = None  # (hop index, settlement key) of a keyed session (peer/session_auth.py)
    auth_counter: int = 0  # last settlement-call counter accepted


@dataclass(frozen=True)
class Claim:
    """What the coordinator asks a peer to sign (the ``SettlementClaim`` message, parsed)."""

    session_id: str
    request_id: str
    model_id: str
    tokens_served: int
    start: int
    end: int
    pipeline: tuple[PipelineEntry, ...]


@dataclass(frozen=True)
class Signed:
    peer_id: str
    public_key: bytes
    positions_served: int
    signature: bytes  # b"" when the claim carried no pipeline (identity query)


class PeerSettlement:
    def __init__(
        self,
        identity: SigningIdentity,
        economy: Any,
        model_id: str,
        span: tuple[int, int],
        *,
        model_layers: int | None = None,
        ttl_s: float = SERVED_TTL_S,
        max_sessions: int = MAX_SESSIONS,
        clock=time.monotonic,
    ) -> None:
        self.identity = identity
        self.economy = economy
        self.model_id = model_id
        self.span = span
        # the model's layer count: a pipeline this peer signs must add up to it (None: not checked, tests only)
        self.model_layers = model_layers
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._sessions: OrderedDict[str, _Served] = OrderedDict()
        self._receipts: dict[str, str] = {}  # receipt id -> session, for receipts this peer signed
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"signed": 0, "refused": 0, "applied": 0, "replayed": 0}

    # -- the step path (cheap: one dict update) ---------------------------------------------------
    def served(self, session_id: str, start: int, positions: int, auth: tuple[int, bytes] | None = None) -> None:
        """This peer computed ``positions`` more positions for ``session_id``, from position ``start`` (a step's
        ``start_position`` and ``num_positions``); ``auth``: the session's (hop index, settlement key) when it agreed
        keys, kept so that the coordinator's settlement calls, which come after the session's keys are dropped, can
        still be authenticated (peer/session_auth.py)."""
        now = self.clock()
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                self._sessions[session_id] = _Served(positions, now, start + positions, start, auth=auth)
                self._evict(now)
            else:
                entry.positions += positions
                entry.reached = max(entry.reached, start + positions)
                entry.first = min(entry.first, start)
                entry.touched = now
                if entry.auth is None:
                    entry.auth = auth
                self._sessions.move_to_end(session_id)

    def adopt(self, old: str, new: str) -> None:
        """Session ``new`` took over ``old``'s cache (peer/rebuild_service.py): what this peer computed for ``old``
        is now ``new``'s (a failover's final chain settles ``new`` for the whole history), and ``old`` is forgotten,
        so the same positions are never signed for twice, and a settled ``old`` leaves ``new`` settled too."""
        with self._lock:
            entry = self._sessions.pop(old, None)
            if entry is None:
                return
            entry.auth, entry.auth_counter = None, 0  # ``new``'s own keys authenticate its settlement calls
            mine = self._sessions.pop(new, None)
            if mine is not None:  # a step of ``new`` was recorded first (peer/rebuild_service.py refuses that)
                entry.positions += mine.positions
                entry.reached = max(entry.reached, mine.reached)
                entry.first = min(entry.first, mine.first)
                entry.auth, entry.auth_counter = mine.auth, mine.auth_counter
                if mine.signed_request is not None:  # ``new`` was settled: it stays settled
                    entry.signed_request, entry.signed_receipt = mine.signed_request, mine.signed_receipt
            entry.touched = self.clock()
            self._sessions[new] = entry
            if entry.signed_receipt is not None:
                self._receipts[entry.signed_receipt] = new

    # -- what settlement calls are authenticated with (peer/session_auth.py settlement_refusal) ----------
    def session_key(self, session_id: str) -> tuple[int, bytes, int] | None:
        """(hop index, settlement key, last accepted counter) of a keyed session this peer served; else None."""
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or entry.auth is None:
                return None
            return (*entry.auth, entry.auth_counter)

    def accept_counter(self, session_id: str, counter: int) -> None:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is not None:
                entry.auth_counter = max(entry.auth_counter, counter)

    def has_served(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def session_of(self, receipt_id: str) -> str | None:
        """The session a receipt this peer signed settles (None for any other receipt)."""
        with self._lock:
            return self._receipts.get(receipt_id)

    def _evict(self, now: float) -> None:
        while self._sessions:
            sid, oldest = next(iter(self._sessions.items()))
            if len(self._sessions) <= self.max_sessions and now - oldest.touched < self.ttl_s:
                break
            del self._sessions[sid]
            if oldest.signed_receipt is not None:
                self._receipts.pop(oldest.signed_receipt, None)

    # -- SignSettlement ---------------------------------------------------------------------------
    def sign(self, claim: Claim) -> Signed:
        try:
            return self._sign(claim)
        except SettlementRefused:
            self.counts["refused"] += 1
            raise

    def _sign(self, claim: Claim) -> Signed:
        me = self.identity
        if claim.model_id != self.model_id:
            raise SettlementRefused(f"this peer serves {self.model_id}, not {claim.model_id}")
        if (claim.start, claim.end) != self.span:
            raise SettlementRefused(f"this peer serves layers {list(self.span)}, not {[claim.start, claim.end]}")
        with self._lock:
            entry = self._sessions.get(claim.session_id)
            if entry is None or self.clock() - entry.touched >= self.ttl_s:
                raise SettlementRefused(f"this peer served no session {claim.session_id} (or it expired)")
            positions = entry.positions
            if not claim.pipeline:  # identity query
                return Signed(me.peer_id, me.public_key_bytes, positions, b"")
            if claim.tokens_served > positions:
                raise SettlementRefused(
                    f"claim of {claim.tokens_served} tokens, this peer computed {positions} for the session"
                )
            mine = [p for p in claim.pipeline if p.public_key == me.public_key_bytes.hex() or p.peer_id == me.peer_id]
            layers = self.span[1] - self.span[0]
            if len(mine) != 1 or mine[0].peer_id != me.peer_id or mine[0].layers_served != layers:
                raise SettlementRefused(
                    f"the pipeline must list this peer ({me.peer_id}) once with {layers} layers, got {mine}"
                )
            listed = sum(p.layers_served for p in claim.pipeline)
            if self.model_layers is not None and listed != self.model_layers:  # padded: this peer's share shrinks
                raise SettlementRefused(
                    f"the pipeline lists {listed} layers; {self.model_id} has {self.model_layers}"
                )
            body = settlement_body(claim.request_id, claim.model_id, claim.tokens_served, list(claim.pipeline))
            receipt_id = hashlib.sha256(body).hexdigest()
            if entry.signed_request is not None and entry.signed_receipt != receipt_id:
                raise SettlementRefused(
                    f"session {claim.session_id} was already settled by request {entry.signed_request}"
                )
            entry.signed_request, entry.signed_receipt = claim.request_id, receipt_id
            self._receipts[receipt_id] = claim.session_id
        self.counts["signed"] += 1
        return Signed(me.peer_id, me.public_key_bytes, positions, me.sign(body))

    # -- privacy=onion: a receipt naming only this peer, signed and applied at close --------------------
    def sign_own(self, session_id: str, request_id: str, model_layers: int,
                 apply: bool = True) -> SettlementRequest | None:
        """Sign a receipt for what this peer served in ``session_id`` that names only this peer (its layers'
        share of ``model_layers``), apply it to this peer's ledger and return it (peer/onion_control.py).
        None when the session is unknown, served nothing, or was settled already. Under onion no hop is told
        the pipeline, so each hop's receipt stands alone; the coordinator checks and records each one."""
        me = self.identity
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or entry.positions < 1 or entry.signed_request is not None:
                return None
            # what it computed, and no more than the positions from its first step to the furthest it reached (a
            # re-sent step is computed twice, a verify's rejected drafts are not kept; the coordinator checks it)
            tokens = min(entry.positions, entry.reached - entry.first)
            pipeline = [PipelineEntry(peer_id=me.peer_id, public_key=me.public_key_bytes.hex(),
                                      layers_served=self.span[1] - self.span[0])]
            body = settlement_body(request_id, self.model_id, tokens, pipeline, model_layers)
            receipt = SettlementRequest(
                request_id=request_id, model_id=self.model_id, tokens_served=tokens,
                model_layers=model_layers,
                shares=[ServedShare(**pipeline[0].model_dump(), signature=me.sign(body).hex())],
            )
            entry.signed_request, entry.signed_receipt = request_id, receipt.receipt_id
            self._receipts[receipt.receipt_id] = session_id
        self.counts["signed"] += 1
        if apply:
            self.apply_own(receipt)
        return receipt

    def apply_own(self, receipt: SettlementRequest) -> None:
        """Record a receipt from :meth:`sign_own` in this peer's ledger (at most once; a ledger write)."""
        if not getattr(self.economy, "enabled", False):
            return
        try:
            self.economy.settle(receipt)
            self.counts["applied"] += 1
        except Exception as exc:
            if getattr(exc, "code", "") != "receipt_already_applied":
                raise
            self.counts["replayed"] += 1

    # -- ApplySettlement --------------------------------------------------------------------------
    def apply(self, receipt: SettlementRequest) -> SettlementResult | None:
        """Verify and apply a fully signed receipt this peer signed; None when its economy is off.

        Raises InvalidReceipt/InvalidSignature (tampered), SettlementRefused (not a receipt this peer
        signed) or ReceiptAlreadyApplied (a replay: this ledger already holds it)."""
        receipt_id = receipt.receipt_id  # a hash of the body: checked before any signature (cheap refusals first)
        with self._lock:
            signed = receipt_id in self._receipts
        if not signed or all(s.peer_id != self.identity.peer_id for s in receipt.shares):
            raise SettlementRefused(f"this peer did not sign receipt {receipt_id}")
        receipt.verify()
        if not getattr(self.economy, "enabled", False):
            return None
        try:
            result = self.economy.settle(receipt, only=self.identity.peer_id)
        except Exception as exc:
            if getattr(exc, "code", "") == "receipt_already_applied":
                self.counts["replayed"] += 1
            raise
        self.counts["applied"] += 1
        return result
