"""Recompute every balance from the append-only journal and check the ledger's invariants.

Holds when the ledger is healthy:
- each account pocket and each open channel's escrow equals the sum of its journal rows;
- no balance is negative;
- credits in all pockets == credits minted - burned; HYDRA in all pockets == HYDRA minted - burned;
- HYDRA supply (minted - burned) <= cap;
- every settlement has one receipt share per paid peer, and its shares add up to its totals.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func
from sqlmodel import Session, select

from openhydra.economy.tables import (
    ASSET_CREDIT,
    ASSET_HYDRA,
    POCKET_ASSET,
    POCKET_CREDITS,
    POCKET_ESCROW,
    POCKET_HYDRA,
    POCKET_STAKE,
    Account,
    Channel,
    JournalEntry,
    ReceiptShare,
    Settlement,
    Supply,
)
from openhydra.economy.views import AuditReport


def audit_session(s: Session, supply_cap: int) -> AuditReport:
    problems: list[str] = []
    from_journal: dict[tuple[str, str], int] = defaultdict(int)
    for holder, pocket, total in s.exec(
        select(JournalEntry.holder, JournalEntry.pocket, func.sum(JournalEntry.delta)).group_by(
            JournalEntry.holder, JournalEntry.pocket
        )
    ).all():
        from_journal[(holder, pocket)] = int(total)
    n_rows = int(s.exec(select(func.count()).select_from(JournalEntry)).one())

    materialized: dict[tuple[str, str], int] = {}
    for acct in s.exec(select(Account)).all():
        for pocket in (POCKET_CREDITS, POCKET_HYDRA, POCKET_STAKE):
            materialized[(acct.peer_id, pocket)] = getattr(acct, pocket)
    for ch in s.exec(select(Channel)).all():
        escrow = ch.deposit if ch.status == "open" else 0
        materialized[(f"channel:{ch.channel_id}", POCKET_ESCROW)] = escrow
        if not 0 <= ch.paid <= ch.deposit:
            problems.append(f"channel {ch.channel_id} paid {ch.paid} outside [0, {ch.deposit}]")

    per_asset: dict[str, int] = defaultdict(int)
    for key in sorted(set(from_journal) | set(materialized)):
        have, derived = materialized.get(key, 0), from_journal.get(key, 0)
        if have != derived:
            problems.append(f"{key[0]} {key[1]}: stored {have} but journal sums to {derived}")
        if have < 0:
            problems.append(f"{key[0]} {key[1]} is negative: {have}")
        per_asset[POCKET_ASSET[key[1]]] += have

    for asset in (ASSET_CREDIT, ASSET_HYDRA):
        row = s.get(Supply, asset)
        supply = (row.minted - row.burned) if row else 0
        if per_asset[asset] != supply:
            problems.append(f"{asset}: balances sum to {per_asset[asset]} but minted - burned = {supply}")
        if asset == ASSET_HYDRA and supply > supply_cap:
            problems.append(f"HYDRA supply {supply} exceeds the cap {supply_cap}")

    share_sums = {
        rid: (int(c), int(h))
        for rid, c, h in s.exec(
            select(ReceiptShare.request_id, func.sum(ReceiptShare.credits), func.sum(ReceiptShare.hydra))
            .group_by(ReceiptShare.request_id)
        ).all()
    }
    for st in s.exec(select(Settlement)).all():
        if share_sums.get(st.request_id) != (st.credits, st.hydra):
            problems.append(f"settlement {st.request_id} totals differ from its receipt shares")
    return AuditReport(problems=problems, journal_rows=n_rows)
