"""Swarm settlement under ``privacy=onion``: one receipt per hop, collected along the onion, never the pipeline.

The whole-pipeline protocol (economy/swarm_settlement.py) asks every hop directly to sign a body naming every
hop: under onion that would hand each hop the route and make the coordinator contact middle hops. Instead, the
session's close travels the onion (peer/onion_control.py) and each hop signs a receipt naming only itself, with
``model_layers`` so that it earns its layers' share of the tokens' credits (what the pipeline receipt would have
given it), applies it to its own ledger and returns it sealed to the coordinator. Here the coordinator checks each
receipt against the hop it routed to (its peer id, its span, this model, no more tokens than the session ran),
records the good ones in its ledger and charges the requester (itself) for the others' credits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from openhydra.economy.errors import InsufficientFunds, InvalidReceipt, LedgerError, ReceiptAlreadyApplied
from openhydra.economy.receipts import SettlementRequest
from openhydra.economy.views import SettlementResult

log = logging.getLogger(__name__)


def settle_onion(settler: Any, request_id: str, peer_session: str, tokens: int,
                 hops: Sequence[tuple[str, int, int]], caps: Sequence[int] | None = None) -> SettlementResult | None:
    """Record the receipts the hops returned with the session's close (``settler``: a SwarmSettler). ``caps``: per
    hop, the most positions its receipt may claim (default ``tokens``, what every hop computed)."""
    from openhydra.economy.swarm_settlement import SettlementFailed

    entries = settler.client.onion_receipts.pop(peer_session, None)
    if entries is None:
        raise SettlementFailed("onion", f"no receipts came back with the close of {peer_session}")
    from openhydra.peer.onion_control import own_request_id

    own = getattr(settler.economy, "peer_id", "")
    model_layers = max(end for _, _, end in hops)  # a route covers the model: layers [0, L)
    cost, last = 0, None
    caps = list(caps) if caps is not None else [tokens] * len(hops)
    for index, ((hop, blob), (address, start, end), cap) in enumerate(zip(entries, hops, caps, strict=True)):
        if blob is None:
            settler.counts["peer_failed"] += 1
            log.warning("hop %s returned no receipt for %s", address, peer_session)
            continue
        try:
            receipt = _checked(SettlementRequest.model_validate_json(blob), hop, settler.model_id, cap, end - start,
                               model_layers, own_request_id(peer_session, index))
            try:
                result = settler.economy.settle(receipt)
            except ReceiptAlreadyApplied:  # this node's own hop applied it to this ledger already
                result = None
        except (ValueError, InvalidReceipt, LedgerError) as exc:
            settler.counts["peer_failed"] += 1
            log.warning("receipt of hop %s for %s refused: %s", address, peer_session, exc)
            continue
        settler.counts["peer_applied"] += 1
        if result is not None:
            last = result
            cost += sum(c for peer, c in result.credits.items() if peer != own)
    settler.counts["settled"] += 1
    _charge(settler, request_id, cost, tokens)
    return last


def _checked(receipt: SettlementRequest, hop: Any, model_id: str, tokens: int, layers: int, model_layers: int,
             request_id: str) -> SettlementRequest:
    """``receipt`` if it is the one this hop owes: its key, its span of this model's ``model_layers`` (a hop that
    named fewer would earn more than its layers' share), at most the session's tokens, and this hop's own request
    id (another hop's would take that hop's place in the ledger and leave its receipt unrecorded)."""
    receipt.verify()
    if len(receipt.shares) != 1 or receipt.model_layers is None:
        raise ValueError("an onion receipt names exactly one hop and the model's layer count")
    if receipt.model_layers != model_layers:
        raise ValueError(f"claims a model of {receipt.model_layers} layers, the route's has {model_layers}")
    if receipt.request_id != request_id:
        raise ValueError(f"request id {receipt.request_id!r} is not this hop's ({request_id!r})")
    share = receipt.shares[0]
    if getattr(hop, "peer_id", None) and share.peer_id != hop.peer_id:
        raise ValueError(f"signed by {share.peer_id}, the route's hop is {hop.peer_id}")
    if share.layers_served != layers or receipt.model_id != model_id:
        raise ValueError(f"claims {share.layers_served} layers of {receipt.model_id}, ran {layers} of {model_id}")
    if receipt.tokens_served > tokens:
        raise ValueError(f"claims {receipt.tokens_served} tokens, the session ran {tokens}")
    return receipt


def _charge(settler: Any, request_id: str, cost: int, tokens: int) -> None:
    if cost <= 0:
        outcome = "self_served"
    else:
        try:
            settler.economy.spend_credits(cost, ref=f"request:{request_id}")
            outcome = "charged"
        except InsufficientFunds:
            outcome = "free_tier" if settler.free_tier.take(tokens) else "over_free_tier"
    settler.counts[outcome] += 1
