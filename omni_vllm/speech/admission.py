"""Admission: the FIFO wait of audio requests for a speaking slot.

Kept apart from the engine (omni_vllm.speech.engine) because it is a policy, not request
running: who may start speaking now, who waits and in which order, and who is refused for
load (SpeechBusy, with a `retry_after`). It lives on the event loop and holds no tensors,
so it can be tested alone with fake slot counts.

At most `max_speaking` requests hold a slot, and none is given while `max_queued_windows`
or more decodable windows wait for Token2Wav. A request that cannot have one at once waits
in arrival order (nobody overtakes a waiter) for as long as its caller waits; a caller that
goes away leaves the queue at once. Only `max_waiting` requests waiting already, and the
optional wait limit `queue_timeout`, refuse a request.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any, Protocol

from omni_vllm.errors import SpeechBusy


class AdmissionLimits(Protocol):
    """The settings admission reads on every request (a SpeechConfig; live-changeable)."""

    max_speaking: int
    max_queued_windows: int
    max_waiting: int
    queue_timeout: float | None


class Ticket:
    """Admission state of one request: its wait, and the slot once it has one."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future | None = None  # while waiting for admission
        self.admitted = False  # holds a speaking slot
        self.t_admitted: float | None = None


class Admission:
    """Speaking slots and the FIFO queue of requests waiting for one (see the module
    docstring). `queued_windows` reports the decodable windows waiting for Token2Wav."""

    def __init__(self, limits: AdmissionLimits, queued_windows: Callable[[], int]):
        self.limits = limits
        self.queued_windows = queued_windows
        self.speaking = 0  # admitted requests not yet released (slots reserved)
        self.refused = 0
        self._waiters: collections.deque[asyncio.Future] = (
            collections.deque()
        )  # FIFO; result: admission time
        self._holders: set[Ticket] = set()  # admitted, not yet released
        self.hold_seconds: collections.deque[float] = collections.deque(
            maxlen=64
        )  # slot held, recent requests

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def can_admit(self) -> bool:
        return (
            self.speaking < self.limits.max_speaking
            and self.queued_windows() < self.limits.max_queued_windows
        )

    async def admit(
        self, ticket: Ticket, on_queued: Callable[[], Any] | None = None
    ) -> None:
        """Reserve a speaking slot: at once when one is free and nobody waits, else after
        waiting in FIFO order for as long as the caller waits (or `queue_timeout`). SpeechBusy
        at once when `max_waiting` requests wait already. Cancelling the caller leaves the
        queue."""
        queue_timeout = self.limits.queue_timeout
        if not self._waiters and self.can_admit():
            self.speaking += 1
            ticket.admitted, ticket.t_admitted = True, time.monotonic()
            self._holders.add(ticket)
            return
        if len(self._waiters) >= self.limits.max_waiting or (
            queue_timeout is not None and queue_timeout <= 0
        ):
            raise self._refuse(
                SpeechBusy.QUEUE_FULL,
                f"speech engine busy: {self.speaking} speaking, "
                f"{len(self._waiters)} waiting (at most {self.limits.max_waiting})",
            )
        ticket.waiter = fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if on_queued is not None:
            on_queued()
        try:
            ticket.t_admitted = await asyncio.wait_for(
                fut, queue_timeout
            )  # the waker reserves our slot
            ticket.admitted = True
            self._holders.add(ticket)
        except BaseException as e:
            if fut in self._waiters:
                self._waiters.remove(fut)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.speaking -= 1  # a slot was reserved for us, but we are leaving
                self.wake()
            if isinstance(e, TimeoutError):
                raise self._refuse(
                    SpeechBusy.WAIT_TIMEOUT,
                    f"speech engine busy: no speaking slot within {queue_timeout:g} s",
                ) from None
            raise
        finally:
            ticket.waiter = None

    def drop_waiter(self, ticket: Ticket, exc: BaseException) -> bool:
        """If `ticket` is still waiting: it leaves the queue now and its `admit` raises
        `exc`; True. False when it is not waiting (admitted, or never queued)."""
        fut = ticket.waiter
        if fut is None or fut.done():
            return False
        if fut in self._waiters:
            self._waiters.remove(fut)
        fut.set_exception(exc)
        return True

    def leave(self, ticket: Ticket) -> None:
        """The request is released: free its slot if it holds one. Call `wake()` after."""
        if ticket.admitted:
            self.speaking -= 1
            self._holders.discard(ticket)

    def wake(self) -> None:
        """Hand free slots to the waiters, oldest first."""
        while self._waiters and self.can_admit():
            fut = self._waiters.popleft()
            if not fut.done():
                self.speaking += 1
                fut.set_result(time.monotonic())

    def record_hold(self, ticket: Ticket) -> None:
        """A request held its slot for a full service time (for `retry_after()`)."""
        self.hold_seconds.append(time.monotonic() - ticket.t_admitted)

    def _refuse(self, code: str, message: str) -> SpeechBusy:
        self.refused += 1
        return SpeechBusy(message, code=code, retry_after=self.retry_after())

    def retry_after(self) -> float:
        """Seconds until a request refused now would likely be taken (at least 1): until the
        requests waiting now have got a slot, `max_speaking` at a time, each holding it for
        the mean time recent requests held theirs (before any finished: the oldest speaker's
        age)."""
        if self.hold_seconds:
            hold = sum(self.hold_seconds) / len(self.hold_seconds)
        else:
            now = time.monotonic()
            hold = max((now - t.t_admitted for t in self._holders), default=1.0)
        return max(1.0, (len(self._waiters) + 1) * hold / self.limits.max_speaking)
