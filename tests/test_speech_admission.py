"""Admission alone (omni_vllm.speech.admission): FIFO waits for a speaking slot, refusals
and retry_after, with fake slot counts and no model."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from omni_vllm.errors import SpeechBusy
from omni_vllm.speech.admission import Admission, Ticket


@dataclasses.dataclass
class Limits:
    max_speaking: int = 1
    max_queued_windows: int = 4
    max_waiting: int = 8
    queue_timeout: float | None = None


def make(**kwargs) -> tuple[Admission, Limits, list[int]]:
    limits, windows = Limits(**kwargs), [0]
    return Admission(limits, lambda: windows[0]), limits, windows


def run(coro):
    return asyncio.run(coro)


def release(adm: Admission, ticket: Ticket) -> None:
    adm.leave(ticket)
    adm.wake()


def test_free_slot_admits_at_once():
    adm, _, _ = make(max_speaking=2)

    async def scenario():
        a, b = Ticket(), Ticket()
        await adm.admit(a)
        await adm.admit(b)
        assert a.admitted and b.admitted and a.t_admitted <= b.t_admitted
        assert adm.speaking == 2 and adm.waiting == 0
        release(adm, a)
        assert adm.speaking == 1
        adm.leave(Ticket())  # never admitted: holds nothing
        assert adm.speaking == 1

    run(scenario())


def test_waiters_are_admitted_in_arrival_order():
    adm, _, _ = make(max_speaking=1)

    async def scenario():
        first = Ticket()
        await adm.admit(first)
        order, queued = [], []
        tickets = [Ticket() for _ in range(4)]

        async def wait(i):
            await adm.admit(tickets[i], on_queued=lambda: queued.append(i))
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(4)]
        await asyncio.sleep(0)
        assert queued == [0, 1, 2, 3] and adm.waiting == 4 and adm.speaking == 1
        holder = first
        for i in range(4):
            release(adm, holder)
            await asyncio.sleep(0)
            assert order == list(range(i + 1)) and adm.speaking == 1
            holder = tickets[i]
        await asyncio.gather(*tasks)
        assert adm.waiting == 0 and all(t.waiter is None for t in tickets)

    run(scenario())


def test_nobody_overtakes_a_waiter():
    adm, limits, windows = make(max_speaking=1)

    async def scenario():
        holder = Ticket()
        await adm.admit(holder)
        waiter = asyncio.create_task(adm.admit(Ticket()))
        await asyncio.sleep(0)
        limits.max_speaking = 2  # a slot is free now, but one request waits
        late = asyncio.create_task(adm.admit(Ticket()))
        await asyncio.sleep(0)
        assert adm.waiting == 2 and not waiter.done() and not late.done()
        adm.wake()
        await asyncio.sleep(0)
        assert waiter.done() and not late.done() and adm.speaking == 2
        windows[0] = 4  # Token2Wav backlog: no slot even when one is free
        release(adm, holder)
        await asyncio.sleep(0)
        assert not late.done() and adm.speaking == 1
        windows[0] = 0
        adm.wake()
        await late
        assert adm.speaking == 2

    run(scenario())


def test_cancelled_waiter_leaves_at_once():
    adm, _, _ = make(max_speaking=1)

    async def scenario():
        holder = Ticket()
        await adm.admit(holder)
        gone, stays = Ticket(), Ticket()
        t_gone = asyncio.create_task(adm.admit(gone))
        t_stays = asyncio.create_task(adm.admit(stays))
        await asyncio.sleep(0)
        assert adm.waiting == 2
        t_gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t_gone
        assert adm.waiting == 1 and not gone.admitted and gone.waiter is None
        release(adm, holder)
        await t_stays
        assert stays.admitted and adm.speaking == 1 and adm.refused == 0

    run(scenario())


def test_waiter_cancelled_after_its_slot_was_reserved_gives_it_on():
    adm, _, _ = make(max_speaking=1)

    async def scenario():
        holder = Ticket()
        await adm.admit(holder)
        a, b = Ticket(), Ticket()
        t_a = asyncio.create_task(adm.admit(a))
        t_b = asyncio.create_task(adm.admit(b))
        await asyncio.sleep(0)
        release(adm, holder)  # reserves a's slot; a has not resumed yet
        t_a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t_a
        await t_b  # the slot passed on to b
        assert b.admitted and not a.admitted and adm.speaking == 1

    run(scenario())


def test_drop_waiter():
    adm, _, _ = make(max_speaking=1)

    class Gone(Exception):
        pass

    async def scenario():
        holder, waiting = Ticket(), Ticket()
        await adm.admit(holder)
        assert not adm.drop_waiter(holder, Gone())  # admitted: not waiting
        task = asyncio.create_task(adm.admit(waiting))
        await asyncio.sleep(0)
        assert adm.drop_waiter(waiting, Gone()) and adm.waiting == 0
        with pytest.raises(Gone):
            await task
        assert adm.speaking == 1 and waiting.waiter is None

    run(scenario())


def test_max_waiting_refuses_with_queue_full():
    adm, _, _ = make(max_speaking=1, max_waiting=2)

    async def scenario():
        await adm.admit(Ticket())
        tasks = [asyncio.create_task(adm.admit(Ticket())) for _ in range(2)]
        await asyncio.sleep(0)
        queued = []
        with pytest.raises(SpeechBusy) as e:
            await adm.admit(Ticket(), on_queued=lambda: queued.append(1))
        assert e.value.code == SpeechBusy.QUEUE_FULL and e.value.retry_after >= 1
        assert "2 waiting (at most 2)" in str(e.value)
        assert not queued and adm.refused == 1 and adm.waiting == 2
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run(scenario())


def test_zero_queue_timeout_refuses_instead_of_waiting():
    adm, _, _ = make(max_speaking=1, queue_timeout=0)

    async def scenario():
        await adm.admit(Ticket())  # a free slot is still taken
        with pytest.raises(SpeechBusy) as e:
            await adm.admit(Ticket())
        assert e.value.code == SpeechBusy.QUEUE_FULL and adm.waiting == 0

    run(scenario())


def test_queue_timeout_refuses_with_wait_timeout():
    adm, _, _ = make(max_speaking=1, queue_timeout=0.05)

    async def scenario():
        await adm.admit(Ticket())
        late = Ticket()
        t0 = time.monotonic()
        with pytest.raises(SpeechBusy) as e:
            await adm.admit(late)
        assert time.monotonic() - t0 >= 0.04
        assert e.value.code == SpeechBusy.WAIT_TIMEOUT and "0.05 s" in str(e.value)
        assert adm.waiting == 0 and adm.refused == 1 and not late.admitted

    run(scenario())


def test_retry_after():
    adm, limits, _ = make(max_speaking=2)

    async def scenario():
        assert adm.retry_after() == 1.0  # nobody speaks: at least 1 s
        a = Ticket()
        await adm.admit(a)
        a.t_admitted -= 10  # the oldest speaker's age, before any finished
        assert adm.retry_after() == pytest.approx(10 / 2, rel=1e-3)
        adm.hold_seconds.extend([4.0, 8.0])  # then the mean hold of recent requests
        assert adm.retry_after() == pytest.approx(6 / 2)
        await adm.admit(Ticket())
        waiters = [asyncio.create_task(adm.admit(Ticket())) for _ in range(3)]
        await asyncio.sleep(0)
        assert adm.retry_after() == pytest.approx((3 + 1) * 6 / 2)
        limits.max_speaking = 100
        assert adm.retry_after() == 1.0
        adm.wake()
        await asyncio.gather(*waiters)
        adm.record_hold(a)
        assert adm.hold_seconds[-1] == pytest.approx(10, rel=1e-2)

    run(scenario())
