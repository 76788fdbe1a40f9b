"""Eager coroutines (gateway.pipeline.eager): start at once, pay for asyncio only when waiting.

What it tests: :func:`resume` continues a started coroutine exactly as ``await`` would (results,
exceptions, cancellation, timeouts); :func:`gather` returns results in order like
``asyncio.gather``, runs coroutines that never wait without turning the event loop, still runs the
waiting ones concurrently, propagates the first exception and cancels what is left when cancelled.
"Without turning the event loop" is observed with a ``call_soon`` callback that has not run yet.

Reads: nothing.

Security notes: none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from gateway.pipeline import eager


async def value(v: int) -> int:
    return v


async def after_wait(v: int, event: asyncio.Event) -> int:
    await event.wait()
    return v


async def failing(message: str) -> int:
    raise ValueError(message)


def loop_turned() -> list[bool]:
    """A flag set by the next turn of the event loop."""
    turned: list[bool] = []
    asyncio.get_running_loop().call_soon(turned.append, True)
    return turned


async def start(coro: Coroutine[Any, Any, int]) -> int:
    """What the runner does: start a coroutine, and resume it only if it waits."""
    try:
        waiting_on = coro.send(None)
    except StopIteration as done:
        result: int = done.value
        return result
    return await eager.resume(coro, waiting_on)


async def test_resume_continues_a_waiting_coroutine() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)
    assert await start(after_wait(7, event)) == 7


async def test_resume_passes_exceptions_and_timeouts_through() -> None:
    async def waits_then_fails() -> int:
        await asyncio.sleep(0)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await start(waits_then_fails())
    seen: list[str] = []

    async def slow() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")  # the coroutine itself sees the timeout's cancellation
            raise
        return 1

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await start(slow())
    assert seen == ["cancelled"]


async def test_resume_propagates_cancellation_of_the_task() -> None:
    event = asyncio.Event()
    task = asyncio.ensure_future(start(after_wait(1, event)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_gather_of_coroutines_that_never_wait_does_not_turn_the_loop() -> None:
    turned = loop_turned()
    assert await eager.gather(value(1), value(2), value(3)) == (1, 2, 3)
    assert turned == []  # no task, no timer, no turn of the loop


async def test_gather_mixes_finished_and_waiting_in_order() -> None:
    first, second = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_soon(second.set)  # the later one is ready first: they wait concurrently
    loop.call_soon(first.set)
    results = await eager.gather(
        after_wait(1, first), value(2), after_wait(3, second), value(4), value(5)
    )
    assert results == (1, 2, 3, 4, 5)


async def test_gather_raises_the_first_exception_and_lets_the_others_finish() -> None:
    event = asyncio.Event()
    finished: list[int] = []

    async def waits(v: int) -> int:
        await event.wait()
        finished.append(v)
        return v

    with pytest.raises(ValueError, match="first"):
        await eager.gather(waits(1), failing("first"), failing("second"))
    event.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert finished == [1]  # not cancelled, as with asyncio.gather


async def test_cancelling_gather_cancels_the_waiting_ones() -> None:
    event = asyncio.Event()
    cancelled: list[bool] = []

    async def waits() -> int:
        try:
            await event.wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return 1

    task = asyncio.ensure_future(eager.gather(waits(), value(2)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == [True]
