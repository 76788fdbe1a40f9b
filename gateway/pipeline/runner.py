"""The ordered-checks runner: Postfix restriction lists with rspamd-style explicit modes.

What it does: for one stage, walks the configured checks in order. Each check returns a Verdict; the
first decisive verdict (defer/reject) in ``enforce`` mode wins and ends the walk. ``warn`` mode records
the verdict as "would have" and continues; ``off`` checks are never called. A check that raises or
exceeds its timeout is an error: ``on_error = "defer"`` (default) answers 451 4.3.0 — never fail open —
while ``continue`` records the error and goes on. The global ``soft_fail`` turns a permanent
verdict into its 4xx twin. Every non-continue result is appended to the transaction's verdict list,
which the audit stores as is. ``close()`` retires the pipeline: it calls each check's optional
``close()`` (e.g. spam-score's worker processes).

Timeouts cost nothing for checks that do not wait: each check is started in the caller's task
(``coro.send(None)``, see :mod:`gateway.pipeline.eager`); one that finishes without waiting for
anything (pure CPU, or a limit store in memory: most checks, most of the time) gets no timer,
since a timer could never have interrupted it (asyncio timeouts act only while a coroutine waits).
One that waits (a Redis store, a database read, the spam-scan workers, rspamd) finishes under its
``timeout`` counted from its start, exactly as if the timer had been set before it began.

Reads: the checks and their settings given at construction (built by the registry from config).

Security notes: exception text from a check goes to the log with an incident id, never to the client.
The runner knows nothing of SMTP text: replies come from the catalog via the checks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.schema import CheckSettings
from gateway.core import replies
from gateway.core.model import (
    CONTINUE,
    Action,
    Mode,
    OnError,
    Recipient,
    Stage,
    Transaction,
    Verdict,
    VerdictRecord,
    new_id,
)
from gateway.pipeline.eager import resume

log = logging.getLogger("mailward.pipeline")


class Check(Protocol):
    """A policy check. It returns verdicts; it never writes to the socket or formats SMTP text."""

    id: str
    stages: frozenset[Stage]

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict: ...


@dataclass(frozen=True)
class ConfiguredCheck:
    check: Check
    mode: Mode
    timeout: float
    on_error: OnError

    @property
    def id(self) -> str:
        return self.check.id

    @classmethod
    def from_settings(cls, check: Check, settings: CheckSettings) -> ConfiguredCheck:
        return cls(check, Mode(settings.mode), settings.timeout, OnError(settings.on_error))


def _usable(verdict: object, stage: Stage) -> bool:
    """A decisive verdict needs a 4xx/5xx reply; HOLD (no reply) exists only at end of data."""
    if not isinstance(verdict, Verdict):
        return False
    if verdict.action is Action.HOLD:
        return stage is Stage.DATA
    return not verdict.decisive or (verdict.reply is not None and not verdict.reply.is_positive)


def _unusable(configured: ConfiguredCheck) -> TypeError:
    # a defective check is an error like any other: on_error applies, never pass
    return TypeError(f"check {configured.id} returned an unusable verdict")


class Pipeline:
    def __init__(
        self, stages: Mapping[Stage, Sequence[ConfiguredCheck]], *, soft_fail: bool = False
    ) -> None:
        for stage, checks in stages.items():
            for c in checks:
                if stage not in c.check.stages:
                    raise ValueError(f"check {c.id} does not run at stage {stage}")
        self._stages = {
            stage: tuple(c for c in checks if c.mode is not Mode.OFF)
            for stage, checks in stages.items()
        }
        self._all = {stage: tuple(checks) for stage, checks in stages.items()}
        # the end-of-data checks with a ``finish`` hook, each once (found once, not per message)
        finishing: dict[str, ConfiguredCheck] = {}
        for configured in self._stages.get(Stage.DATA, ()):
            if getattr(configured.check, "finish", None) is not None:
                finishing.setdefault(configured.id, configured)
        self._finishing = tuple(finishing.values())
        self.soft_fail = soft_fail

    def describe(self) -> dict[Stage, tuple[ConfiguredCheck, ...]]:
        """Every configured check per stage, in order, ``off`` ones included (policy show)."""
        return {stage: self._all.get(stage, ()) for stage in Stage}

    async def run(self, stage: Stage, txn: Transaction, rcpt: Recipient | None = None) -> Verdict:
        """The stage's decision: CONTINUE or the first decisive enforced verdict."""
        checks = self._stages.get(stage)
        if not checks:
            return CONTINUE
        loop = asyncio.get_running_loop()
        for configured in checks:
            # Start the check in this task, without a timer: most checks finish without waiting
            # for anything (pure CPU, or a limit store in memory), and a timeout could never cut
            # those short (it fires only while the check waits). Only a check that does wait gets
            # its timeout, counted from its start (see _waiting).
            started = loop.time()
            verdict: Verdict
            try:
                coro = configured.check.evaluate(stage, txn, rcpt)
                waiting_on = coro.send(None)
            except StopIteration as done:
                verdict = done.value
                if verdict is CONTINUE:  # the common answer, nothing to do
                    continue
                if not _usable(verdict, stage):
                    verdict = self._failed(configured, stage, txn, rcpt, _unusable(configured))
            except Exception as exc:  # any failure of a check is handled by policy
                verdict = self._failed(configured, stage, txn, rcpt, exc)
            else:
                verdict = await self._waiting(
                    configured, stage, txn, rcpt, coro, waiting_on, started + configured.timeout
                )
            if verdict.headers and configured.mode is Mode.ENFORCE:
                txn.prepend_headers.extend(verdict.headers)
            if not verdict.decisive:
                continue
            applied = configured.mode is Mode.ENFORCE
            if applied and self.soft_fail and verdict.reply and verdict.reply.is_permanent:
                verdict = Verdict(
                    Action.DEFER,
                    verdict.reply.softened(),
                    verdict.reason + " (soft_fail)",
                    verdict.measured,
                    verdict.limit,
                )
            self._record(configured, stage, txn, rcpt, verdict, applied)
            if applied:
                return verdict
            log.info(
                "check %s would %s (warn mode) txn=%s: %s",
                configured.id,
                verdict.action,
                txn.id,
                verdict.reason,
            )
        return CONTINUE

    async def auth_result(self, attempt: Transaction, success: bool) -> None:
        """Tell AUTH-stage checks how the attempt ended (``record_auth``), e.g. to count failures
        or to tarpit a failure before its 535 is sent."""
        for configured in self._stages.get(Stage.AUTH, ()):
            record = getattr(configured.check, "record_auth", None)
            if record is None:
                continue
            try:
                await record(attempt, success)
            except Exception:
                log.exception("check %s record_auth failed session=%s", configured.id, attempt.id)

    async def finish(self, txn: Transaction, delivered: bool) -> None:
        """Tell checks that keep per-transaction state how it ended (e.g. refund a charge).

        Called once per transaction that reached end of data; checks without a ``finish``
        method are skipped. A failing ``finish`` is logged; the client's reply is decided."""
        for configured in self._finishing:
            try:
                await configured.check.finish(txn, delivered)  # type: ignore[attr-defined]
            except Exception:
                log.exception("check %s finish failed txn=%s", configured.id, txn.id)

    async def close(self) -> None:
        """Release what checks hold (e.g. spam-score's worker processes): ``close()`` of every
        configured check that has one, ``off`` checks included, once each. Call it when the
        pipeline is retired: at shutdown, and for the old pipeline after a reload swapped in a new
        one. A failing ``close`` is logged and the others still run."""
        seen: set[int] = set()
        for checks in self._all.values():
            for configured in checks:
                if id(configured.check) in seen:
                    continue
                seen.add(id(configured.check))
                close = getattr(configured.check, "close", None)
                if close is None:
                    continue
                try:
                    await close()
                except Exception:
                    log.exception("check %s close failed", configured.id)

    async def _waiting(
        self,
        configured: ConfiguredCheck,
        stage: Stage,
        txn: Transaction,
        rcpt: Recipient | None,
        coro: Coroutine[Any, Any, Verdict],
        waiting_on: Any,
        deadline: float,
    ) -> Verdict:
        """Finish a check that waits for something (I/O, a worker), under its timeout: the
        deadline is its start plus ``timeout``, as if the timer had run from the start."""
        try:
            async with asyncio.timeout_at(deadline):
                verdict = await resume(coro, waiting_on)
        except Exception as exc:  # any failure of a check is handled by policy, never fails open
            return self._failed(configured, stage, txn, rcpt, exc)
        if not _usable(verdict, stage):
            return self._failed(configured, stage, txn, rcpt, _unusable(configured))
        return verdict

    def _failed(
        self,
        configured: ConfiguredCheck,
        stage: Stage,
        txn: Transaction,
        rcpt: Recipient | None,
        exc: Exception,
    ) -> Verdict:
        """The verdict for a check that raised or timed out: on_error decides, never pass."""
        incident = new_id()
        timed_out = isinstance(exc, TimeoutError)
        log.error(
            "check %s %s at %s txn=%s incident=%s: %s",
            configured.id,
            "timed out" if timed_out else "failed",
            stage,
            txn.id,
            incident,
            "timeout" if timed_out else repr(exc),
        )
        reason = (
            f"check timed out after {configured.timeout}s"
            if timed_out
            else f"check error (incident {incident})"
        )
        reply = replies.POLICY_TEMPFAIL.format(check=configured.id)
        verdict = Verdict(Action.DEFER, reply, reason)
        if configured.on_error is OnError.CONTINUE:
            self._record(configured, stage, txn, rcpt, verdict, applied=False)
            return CONTINUE
        # on_error=defer applies even in warn mode: an erroring check never lets mail through
        # silently when it is meant to be enforced; in warn mode it is only recorded.
        if configured.mode is Mode.WARN:
            self._record(configured, stage, txn, rcpt, verdict, applied=False)
            return CONTINUE
        return verdict

    @staticmethod
    def _record(
        configured: ConfiguredCheck,
        stage: Stage,
        txn: Transaction,
        rcpt: Recipient | None,
        verdict: Verdict,
        applied: bool,
    ) -> None:
        txn.verdicts.append(
            VerdictRecord(
                check_id=configured.id,
                stage=stage,
                action=verdict.action,
                mode=configured.mode,
                reply=verdict.reply.line() if verdict.reply else "",
                reason=verdict.reason,
                recipient=rcpt.address if rcpt else None,
                measured=verdict.measured,
                limit=verdict.limit,
                applied=applied,
            )
        )
