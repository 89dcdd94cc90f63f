"""Slashing as evidence: a proven lie, signed by the auditor, spread through the DHT, applied by every coordinator.

When an audit fails a peer (tier 2 or 3 majority), the coordinator that ran it signs a
:class:`SlashEvidence` with its Ed25519 identity (crypto/identity.py): it names the request (a digest
of the auditor's session id, not the id itself), the model, the span, the step, the accused peer and
the digests of the two answers (the accused's and the majority's). Anyone can check the signature
against the auditor's peer id (the peer id *is* the public key, libp2p form), without trusting the
carrier.

Spread. An auditor keeps its latest evidence (at most ``MAX_CARRIED``) in one *carrier* record per
model: an ordinary :class:`PeerAnnouncement` under the model id ``EVIDENCE_PREFIX + model``, signed
like any announcement, whose ``evidence`` field holds the base64 JSON list. It goes through the
public ``Discovery.announce``/``lookup`` interface, so every backend (HTTP DHT, Kademlia) carries it
unchanged; a newer carrier from the same auditor replaces the older one.

Applied. A coordinator that reads evidence (:meth:`EvidenceBook.receive`) records a failed audit for
the accused in its own reputation store (so its routing drops the peer below the floor) when:
the signature is valid; the auditor is not the accused and the two digests differ; the evidence is
younger than ``max_age_s``; the auditor is a peer *this* coordinator trusts (not below its floor,
and with at least ``min_auditor_passes`` audits passed here, so a fresh identity cannot slash
anyone); and the same (auditor, accused) pair has not been applied already within ``max_age_s``.
What a receiver cannot check is whether the lie happened: it did not see the request. Evidence is
an attributable accusation by a trusted auditor, not a proof the receiver can re-execute.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openhydra.crypto.identity import Identity, public_key_from_peer_id, verify_signature
from openhydra.discovery.records import PeerAnnouncement
from openhydra.verification.compare import Answer
from openhydra.verification.reputation import ReputationStore

log = logging.getLogger(__name__)

DOMAIN = b"openhydra-slash-evidence:v1"
EVIDENCE_PREFIX = "openhydra-evidence/"
MAX_CARRIED = 4  # evidence items per carrier record (the record's base64 field is capped at 4096 chars)


def answer_digest(answer: Answer) -> str:
    """SHA-256 of an answer's token, top-k ids and log-probabilities (canonical JSON)."""
    body = json.dumps([answer.token, list(answer.top_ids), [round(x, 6) for x in answer.top_logprobs]],
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def request_digest(session_id: str) -> str:
    return hashlib.sha256(b"openhydra-request:" + session_id.encode()).hexdigest()[:32]


class SlashEvidence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    auditor: str = Field(min_length=1, max_length=128)
    accused: str = Field(min_length=1, max_length=128)
    model_id: str = Field(min_length=1, max_length=200)
    request: str = Field(pattern=r"^[0-9a-f]{32}$")
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    step: int = Field(ge=0)
    tier: int = Field(ge=2, le=3)
    accused_answer: str = Field(pattern=r"^[0-9a-f]{64}$")
    majority_answer: str = Field(pattern=r"^[0-9a-f]{64}$")
    voters: int = Field(ge=2, le=64)
    issued_at: float = Field(gt=0.0, le=4_102_444_800.0)
    signature: str = ""  # base64 Ed25519 over DOMAIN || canonical JSON of every other field

    def signing_payload(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"signature"})
        return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def key(self) -> str:
        return hashlib.sha256(self.signing_payload()).hexdigest()


def sign_evidence(identity: Identity, **fields) -> SlashEvidence:
    unsigned = SlashEvidence(auditor=identity.peer_id, **fields)
    return unsigned.model_copy(update={"signature": base64.b64encode(identity.sign(unsigned.signing_payload()))
                                       .decode()})


def check_evidence(evidence: SlashEvidence, now: float | None = None, max_age_s: float = 3600.0) -> str | None:
    """Why ``evidence`` is invalid on its face (None: valid). Trust in the auditor is the receiver's call."""
    try:
        key = public_key_from_peer_id(evidence.auditor)
        signature = base64.b64decode(evidence.signature, validate=True)
    except Exception as exc:
        return f"unusable auditor id or signature: {exc}"
    if not verify_signature(key, signature, evidence.signing_payload()):
        return "bad signature"
    if evidence.accused == evidence.auditor:
        return "an auditor cannot accuse itself"
    if evidence.accused_answer == evidence.majority_answer:
        return "the two answers are the same"
    if evidence.end <= evidence.start:
        return "empty span"
    now = time.time() if now is None else now
    if not now - max_age_s <= evidence.issued_at <= now + 60.0:
        return f"issued at {evidence.issued_at:.0f}, outside the last {max_age_s:.0f} s"
    return None


class EvidenceBook:
    """What a coordinator does with evidence it reads: check it, decide whether to trust it, apply it."""

    def __init__(self, reputation: ReputationStore, *, own_peer_id: str | None = None, max_age_s: float = 3600.0,
                 min_auditor_passes: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.reputation, self.own_peer_id = reputation, own_peer_id
        self.max_age_s, self.min_auditor_passes, self.clock = max_age_s, min_auditor_passes, clock
        self._applied: dict[tuple[str, str], float] = {}  # (auditor, accused) -> when applied
        self.applied = 0
        self.rejected: dict[str, int] = {}

    def _reject(self, why: str, evidence: SlashEvidence | None = None) -> bool:
        self.rejected[why.split(":")[0]] = self.rejected.get(why.split(":")[0], 0) + 1
        log.info("evidence %s ignored: %s", evidence.key[:12] if evidence else "?", why)
        return False

    def trusts(self, auditor: str) -> bool:
        return (auditor == self.own_peer_id or (not self.reputation.below_floor(auditor)
                and self.reputation.counts(auditor)["pass"] >= self.min_auditor_passes))

    def receive(self, evidence: SlashEvidence) -> bool:
        """Apply ``evidence`` to the reputation store (a failed audit of the accused); False if ignored."""
        now = self.clock()
        why = check_evidence(evidence, now, self.max_age_s)
        if why:
            return self._reject(why, evidence)
        if evidence.auditor == self.own_peer_id:
            return False  # our own audits are in the store already
        if not self.trusts(evidence.auditor):
            return self._reject(f"untrusted auditor: {evidence.auditor} (below the floor or no passed audits here)",
                                evidence)
        pair = (evidence.auditor, evidence.accused)
        if now - self._applied.get(pair, -1e18) < self.max_age_s:
            return False  # one accusation per auditor and accused per max_age_s: no amplification by repeats
        self._applied[pair] = now
        self.reputation.record(evidence.accused, "fail", detail=(
            f"evidence from {evidence.auditor}: request {evidence.request} span [{evidence.start},{evidence.end}) "
            f"step {evidence.step} tier {evidence.tier}: answer {evidence.accused_answer[:12]} vs majority "
            f"{evidence.majority_answer[:12]}"))
        self.applied += 1
        return True


def carrier_record(evidence: list[SlashEvidence], template: PeerAnnouncement, now: float,
                   ttl_s: float) -> PeerAnnouncement:
    """The auditor's carrier: its own announcement re-labelled under the evidence model id, with the list."""
    body = json.dumps([e.model_dump(mode="json") for e in evidence[-MAX_CARRIED:]], separators=(",", ":"))
    return PeerAnnouncement.model_validate({
        **template.model_dump(exclude={"signature", "public_key", "static_key", "geo_proof", "swarm_tag"}),
        "model_id": EVIDENCE_PREFIX + template.model_id, "announced_at": now, "ttl_s": ttl_s,
        "evidence": base64.b64encode(body.encode()).decode(),
    })


def evidence_of(record: PeerAnnouncement) -> list[SlashEvidence]:
    """Evidence items a carrier holds, each signed by the carrier's peer (others are dropped)."""
    raw = getattr(record, "evidence", None)
    if not raw:
        return []
    try:
        items = json.loads(base64.b64decode(raw, validate=True))
    except (ValueError, TypeError):
        return []
    out = []
    for item in items if isinstance(items, list) else []:
        try:
            evidence = SlashEvidence.model_validate(item)
        except ValidationError:
            continue
        if evidence.auditor == record.peer_id:
            out.append(evidence)
    return out


class EvidenceBoard:
    """Publishes this coordinator's evidence and reads everyone's, through a :class:`Discovery` backend."""

    def __init__(self, discovery, book: EvidenceBook, *, identity: Identity | None = None,
                 template: Callable[[], PeerAnnouncement] | None = None,
                 sign: Callable[[PeerAnnouncement], PeerAnnouncement] = lambda r: r, ttl_s: float = 3600.0) -> None:
        self.discovery, self.book, self.identity = discovery, book, identity
        self.template, self.sign, self.ttl_s = template, sign, ttl_s
        self.mine: list[SlashEvidence] = []

    def issue(self, **fields) -> SlashEvidence | None:
        if self.identity is None:
            return None
        evidence = sign_evidence(self.identity, **fields)
        self.mine = [*self.mine, evidence][-MAX_CARRIED:]
        return evidence

    async def publish(self) -> None:
        if not self.mine or self.template is None:
            return
        await self.discovery.announce(self.sign(carrier_record(self.mine, self.template(), time.time(), self.ttl_s)))

    async def pull(self, model_id: str) -> int:
        """Read every carrier for ``model_id``; returns how many evidence items were newly applied."""
        applied = 0
        for record in await self.discovery.lookup(EVIDENCE_PREFIX + model_id):
            for evidence in evidence_of(record):
                applied += self.book.receive(evidence)
        return applied


def attach_evidence(verifier, discovery, identity: Identity, template: Callable[[], PeerAnnouncement],
                    sign: Callable[[PeerAnnouncement], PeerAnnouncement], loop, model_id: str,
                    pull_every_s: float = 30.0) -> EvidenceBoard:
    """Wire a node's verifier to discovery: each failed audit is signed and published at once, and every
    ``pull_every_s`` the other coordinators' evidence is read and applied (``loop``: the node's asyncio loop)."""
    import asyncio
    import threading

    book = EvidenceBook(verifier.reputation, own_peer_id=identity.peer_id)
    board = EvidenceBoard(discovery, book, identity=identity, template=template, sign=sign)
    verifier.evidence = board
    verifier.evidence_book = book

    def publish(_evidence: SlashEvidence) -> None:
        asyncio.run_coroutine_threadsafe(board.publish(), loop)

    verifier.on_evidence = publish
    stop = threading.Event()

    def pull_forever() -> None:
        while not stop.wait(pull_every_s):
            try:
                asyncio.run_coroutine_threadsafe(board.pull(model_id), loop).result(pull_every_s)
            except Exception as exc:  # discovery down: try again next round
                log.debug("reading slash evidence failed: %s", exc)

    threading.Thread(target=pull_forever, name="evidence-pull", daemon=True).start()
    board.stop = stop.set
    return board
