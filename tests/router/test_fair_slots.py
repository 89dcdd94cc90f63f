"""Generation slots handed out in turn between clients (router/admission.py FairSlots): a client that queues many
requests delays another client's by at most one of its own; a full waiting room makes room for a newcomer at the
expense of the client with the most waiting; waits that time out or are cancelled leave the counts right."""

from __future__ import annotations

import asyncio

import pytest

from openhydra.router.admission import FairSlots, Refused


async def _queue(slots: FairSlots, client: str, name: str, served: list[str], hold: asyncio.Event | None = None,
                 timeout_s: float = 30.0) -> None:
    await slots.acquire(client, timeout_s)
    served.append(name)
    if hold is not None:
        await hold.wait()
    slots.release()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_freed_slot_goes_to_each_waiting_client_in_turn() -> None:
    async def scenario() -> list[str]:
        slots, served, hold = FairSlots(1, 64), [], asyncio.Event()
        holder = asyncio.create_task(_queue(slots, "attacker", "held", served, hold))
        await _settle()
        tasks = [asyncio.create_task(_queue(slots, "attacker", f"a{i}", served)) for i in range(6)]
        await _settle()
        tasks += [asyncio.create_task(_queue(slots, "honest", "h", served)),
                  asyncio.create_task(_queue(slots, "third", "t", served))]
        await _settle()
        assert (slots.running, slots.waiting) == (1, 8)
        hold.set()
        await asyncio.gather(holder, *tasks)
        assert (slots.running, slots.waiting) == (0, 0)
        return served

    served = asyncio.run(scenario())
    # FIFO would serve h 8th and t 9th; in turn they wait for one attacker request each
    assert served == ["held", "a0", "h", "t", "a1", "a2", "a3", "a4", "a5"]


def test_a_full_room_makes_room_for_a_newcomer_from_the_longest_line() -> None:
    async def scenario() -> None:
        slots, served, hold = FairSlots(1, 4), [], asyncio.Event()
        holder = asyncio.create_task(_queue(slots, "attacker", "held", served, hold))
        await _settle()
        attackers = [asyncio.create_task(_queue(slots, "attacker", f"a{i}", served)) for i in range(4)]
        await _settle()
        assert slots.waiting == 4
        honest = asyncio.create_task(_queue(slots, "honest", "h", served))
        await _settle()
        assert attackers[3].done() and isinstance(attackers[3].exception(), Refused)  # the newest gave way
        assert slots.waiting == 4
        # the attacker, with the most waiting, cannot take anyone's place
        with pytest.raises(Refused):
            await slots.acquire("attacker", 30)
        # nor can a client whose line would become as long as the longest
        second = asyncio.create_task(_queue(slots, "honest", "h2", served))
        await _settle()
        assert attackers[2].done() and isinstance(attackers[2].exception(), Refused)
        with pytest.raises(Refused):
            await slots.acquire("honest", 30)  # honest 3 would equal the attacker's 2 + 1
        hold.set()
        await asyncio.gather(holder, honest, second, *attackers[:2])
        assert served == ["held", "a0", "h", "a1", "h2"]
        assert (slots.running, slots.waiting) == (0, 0)

    asyncio.run(scenario())


def test_waits_that_end_early_leave_the_counts_right() -> None:
    async def scenario() -> None:
        slots, served, hold = FairSlots(1, 8), [], asyncio.Event()
        holder = asyncio.create_task(_queue(slots, "x", "held", served, hold))
        await _settle()
        with pytest.raises(TimeoutError):
            await slots.acquire("y", 0.01)
        assert (slots.running, slots.waiting) == (1, 0)
        cancelled = asyncio.create_task(slots.acquire("z", 30))
        await _settle()
        assert slots.waiting == 1
        cancelled.cancel()
        await _settle()
        assert (slots.running, slots.waiting) == (1, 0)
        hold.set()
        await holder
        assert (slots.running, slots.waiting) == (0, 0)
        # a slot handed over the moment its waiter is cancelled is passed on, not lost
        await slots.acquire("x", 1)
        late = asyncio.create_task(slots.acquire("y", 30))
        after = asyncio.create_task(_queue(slots, "w", "w", served))
        await _settle()
        slots.release()  # hands the slot to `late`'s future...
        late.cancel()  # ...whose task is cancelled before it resumes
        (outcome,) = await asyncio.gather(late, return_exceptions=True)
        if outcome is None:  # Python 3.11's wait_for returns a result that came with the cancellation: it holds
            slots.release()  # the slot, as a request that goes on would, and frees it when done
        else:
            assert isinstance(outcome, asyncio.CancelledError)  # else the slot was passed on at once
        await asyncio.wait_for(after, 5)  # the slot went on to `after`
        assert served[-1] == "w" and (slots.running, slots.waiting) == (0, 0)

    asyncio.run(scenario())
