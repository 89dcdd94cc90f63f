"""openhydra.testing.wait: polls until a condition holds, hands back the value that satisfied it, and fails
with a message naming what was awaited. Driven by real threads and tasks, with no fixed sleeps."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from openhydra.testing.wait import async_wait_until, wait_until


def test_returns_the_first_truthy_value_once_another_thread_makes_it_true():
    box: list[int] = []
    done = threading.Event()

    def producer() -> None:
        done.wait(10)
        box.append(42)

    thread = threading.Thread(target=producer)
    thread.start()
    polls = []

    def ready() -> list[int]:
        polls.append(1)
        if len(polls) == 3:
            done.set()  # the condition becomes true only after a few polls
        return list(box)

    assert wait_until(ready, 30, 0.01, "the producer's value") == [42]
    assert len(polls) >= 3
    thread.join(10)


def test_timeout_names_what_was_awaited_and_the_last_value():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2 s \(\d+ polls\) waiting for the moon; last value 0"):
        wait_until(lambda: 0, 0.2, 0.01, "the moon")
    assert time.monotonic() - started >= 0.2


def test_ignored_errors_count_as_not_yet_and_others_propagate():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not up yet")
        return "up"

    assert wait_until(flaky, 30, 0.01, "server", ignore=ConnectionError) == "up"
    with pytest.raises(AssertionError, match="last error ConnectionError: down"):
        wait_until(lambda: (_ for _ in ()).throw(ConnectionError("down")), 0.1, 0.01, "x", ignore=ConnectionError)
    with pytest.raises(KeyError):  # a real bug fails at once, it is not retried until the deadline
        wait_until(lambda: {}["missing"], 30, 0.01, "y", ignore=ConnectionError)


def test_the_predicate_is_tried_at_least_once_even_with_a_tiny_timeout():
    assert wait_until(lambda: "now", 1e-9, 1.0, "z") == "now"
    with pytest.raises(ValueError):
        wait_until(lambda: True, 0, 0.1)


def test_async_variant_accepts_sync_and_async_predicates_and_lets_tasks_run():
    async def scenario() -> None:
        flag = asyncio.Event()

        async def setter() -> None:
            await asyncio.sleep(0)
            flag.set()

        task = asyncio.get_running_loop().create_task(setter())
        assert await async_wait_until(flag.is_set, 30, 0.01, "the flag") is True  # the task ran while we waited
        await task

        async def lookup() -> list[str]:
            return ["a"]

        assert await async_wait_until(lookup, 30, 0.01, "a lookup") == ["a"]

        async def never() -> list[str]:
            return []

        with pytest.raises(AssertionError, match="waiting for records; last value \\[\\]"):
            await async_wait_until(never, 0.1, 0.01, "records")

    asyncio.run(scenario())
