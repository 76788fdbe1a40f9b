"""Eager coroutines: run a coroutine's first step at once, pay for asyncio only if it must wait.

What it does: most policy work finishes without ever waiting — pure CPU, or a limit store in
memory whose "I/O" returns at once — yet wrapping it in a timeout or a task costs a timer, a task
and extra turns of the event loop, every message. :func:`resume` lets the caller start a coroutine
with ``coro.send(None)`` and, only when it does wait, hand the rest of it to the current task,
exactly as ``await coro`` would have done from the start. :func:`gather` is ``asyncio.gather`` for
coroutines that may not need to wait: each is started at once, in order; those that finished are
not wrapped in tasks; those that wait run concurrently as tasks, as with ``asyncio.gather`` (so a
Redis store still receives all their calls in one pipeline). Python 3.12's eager task factory does
the same for every task; this is the part of it the pipeline needs, on 3.11.

Reads: nothing.

Security notes: none (control flow only). Exceptions, cancellation and timeouts pass through
unchanged: the coroutine sees exactly what it would see if it had been awaited.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar, overload

T = TypeVar("T")
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
T4 = TypeVar("T4")
T5 = TypeVar("T5")


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], waiting_on: Any) -> Generator[Any, Any, T]:
    """Go on with ``coro``, which ``coro.send(None)`` started and which then waits on
    ``waiting_on`` (what it yielded): hand that to the task, and pass what the task sends or throws
    back into the coroutine, as ``await coro`` would have done from the start (cancellation and
    timeouts included). Await it in the task that started the coroutine, or in a new one."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # CancelledError from a timeout or a cancelled task
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                result: T = done.value
                return result
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                result = done.value
                return result


async def _rest(coro: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    return await resume(coro, waiting_on)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback: mark a task's exception retrieved (asyncio.gather does the same for the
    children still running when it has already raised)."""
    if not task.cancelled():
        task.exception()


@overload
async def gather(c1: Coroutine[Any, Any, T1], /) -> tuple[T1]: ...
@overload
async def gather(c1: Coroutine[Any, Any, T1], c2: Coroutine[Any, Any, T2], /) -> tuple[T1, T2]: ...
@overload
async def gather(
    c1: Coroutine[Any, Any, T1], c2: Coroutine[Any, Any, T2], c3: Coroutine[Any, Any, T3], /
) -> tuple[T1, T2, T3]: ...
@overload
async def gather(
    c1: Coroutine[Any, Any, T1],
    c2: Coroutine[Any, Any, T2],
    c3: Coroutine[Any, Any, T3],
    c4: Coroutine[Any, Any, T4],
    /,
) -> tuple[T1, T2, T3, T4]: ...
@overload
async def gather(
    c1: Coroutine[Any, Any, T1],
    c2: Coroutine[Any, Any, T2],
    c3: Coroutine[Any, Any, T3],
    c4: Coroutine[Any, Any, T4],
    c5: Coroutine[Any, Any, T5],
    /,
) -> tuple[T1, T2, T3, T4, T5]: ...
async def gather(*coros: Coroutine[Any, Any, Any]) -> tuple[Any, ...]:
    """The results of ``coros``, in order, like ``asyncio.gather(*coros)``: each is started at
    once (in order); the ones that must wait then run concurrently as tasks. The first exception
    raised (a coroutine that failed during its first step counts first) propagates; coroutines
    still running then go on, as with asyncio.gather (their exceptions are retrieved). Cancelling
    the caller cancels the ones still running."""
    results: list[Any] = [None] * len(coros)
    waiting: list[tuple[int, asyncio.Task[Any]]] = []
    error: Exception | None = None
    for i, coro in enumerate(coros):
        try:
            waiting_on = coro.send(None)
        except StopIteration as done:
            results[i] = done.value
            continue
        except Exception as exc:
            if error is None:
                error = exc
            continue
        except BaseException:
            for later in coros[i + 1 :]:  # never started: nothing to run, nothing to warn about
                later.close()
            for _, task in waiting:
                task.cancel()
            raise
        waiting.append((i, asyncio.ensure_future(_rest(coro, waiting_on))))
    if error is not None:
        for _, task in waiting:
            task.add_done_callback(_retrieve)
        raise error
    if waiting:
        values = await asyncio.gather(*(task for _, task in waiting))
        for (i, _), value in zip(waiting, values, strict=True):
            results[i] = value
    return tuple(results)
