"""The speech worker's scheduling policy (omni_vllm.speech.scheduler) on fake streams and a fake
clock: no model, no thread, no torch work."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from omni_vllm.speech.scheduler import Speaker, SpeechScheduler

DELAY = 0.05


@dataclass
class FakeStream:
    ready: bool = False
    done: bool = False
    queued: int = 0

    def queued_windows(self) -> int:
        return self.queued


def scheduler(**kw) -> SpeechScheduler:
    return SpeechScheduler(**{"max_queued_windows": 4, "window_delay": DELAY, **kw})


def speaking(now: float, audio_seconds: float) -> Speaker:
    """A speaker whose first audio left at `now` with `audio_seconds` decoded since."""
    sp = Speaker()
    sp.decoded(audio_seconds, now)
    return sp


def test_nothing_ready_means_no_decode_and_no_wake_up():
    s = scheduler()
    streams = {"a": FakeStream(), "b": FakeStream()}
    speakers = {"a": Speaker(), "b": Speaker()}
    assert s.plan(10.0, streams, speakers, talker_idle=False) == ([], None)
    assert (
        s.idle_wait(10.0, streams, speakers, talker_idle=True) is None
    )  # sleep until a command
    assert (
        s.idle_wait(10.0, streams, speakers, talker_idle=False) == 0.0
    )  # the talker has work


def test_first_windows_go_at_once_and_alone():
    s = scheduler()
    streams = {
        "old": FakeStream(ready=True),
        "new": FakeStream(ready=True),
        "idle": FakeStream(),
    }
    speakers = {"old": speaking(0.0, 10.0), "new": Speaker(), "idle": Speaker()}
    s.window_ready("old", 1.0)
    assert s.plan(1.0, streams, speakers, talker_idle=False) == (["new"], 0.0)
    assert Speaker().slack(5.0) == float(
        "-inf"
    )  # no audio yet: time to first audio counts


def test_starving_stream_goes_alone_before_the_company_wait():
    s = scheduler()
    s.record_call(0.2)  # expected call: 0.2 s, margin = DELAY + 2 calls = 0.45 s
    streams = {
        "dry": FakeStream(ready=True),
        "ok": FakeStream(ready=True),
        "busy": FakeStream(),
    }
    # 'dry' has 0.4 s of audio left at t=10, 'ok' 5 s.
    speakers = {
        "dry": speaking(0.0, 10.4),
        "ok": speaking(0.0, 15.0),
        "busy": Speaker(first_audio=0.0),
    }
    for rid in ("dry", "ok"):
        s.window_ready(rid, 10.0)
    assert speakers["dry"].slack(10.0) == pytest.approx(0.4)
    assert s.plan(10.0, streams, speakers, talker_idle=False) == (["dry"], 0.0)
    speakers["dry"].decoded(
        1.0, 10.1
    )  # its window was decoded: 1.4 s left, not urgent any more
    assert s.plan(10.0, streams, speakers, talker_idle=False)[0] == []


def test_ready_windows_wait_for_company_up_to_window_delay():
    s = scheduler()
    streams = {"a": FakeStream(ready=True), "b": FakeStream()}
    speakers = {"a": speaking(0.0, 100.0), "b": speaking(0.0, 100.0)}
    assert s.window_ready("a", 5.0) and not s.window_ready(
        "a", 5.01
    )  # the wait starts once
    chosen, wait = s.plan(5.02, streams, speakers, talker_idle=False)
    assert chosen == [] and wait == pytest.approx(DELAY - 0.02)
    assert (
        s.idle_wait(5.02, streams, speakers, talker_idle=True) == 0.0
    )  # idle talker: nobody to wait for
    assert s.plan(5.0 + DELAY, streams, speakers, talker_idle=False) == (
        ["a"],
        0.0,
    )  # waited long enough
    # ... or at once when every speaking stream has a window, or the talker has nothing to do.
    assert s.plan(5.01, streams, speakers, talker_idle=True) == (["a"], 0.0)
    streams["b"].ready = True
    s.window_ready("b", 5.01)
    assert s.plan(5.01, streams, speakers, talker_idle=False) == (["a", "b"], 0.0)


def test_idle_worker_wakes_when_a_decode_falls_due():
    s = scheduler()
    streams = {"a": FakeStream(ready=True), "b": FakeStream()}
    speakers = {"a": speaking(0.0, 100.0), "b": speaking(0.0, 100.0)}
    s.window_ready("a", 1.0)
    # The talker has work: the worker runs now; idle with a finished stream: now, to close it.
    assert s.idle_wait(1.0, streams, speakers, talker_idle=False) == 0.0
    streams["b"].done = True
    assert s.idle_wait(1.0, streams, speakers, talker_idle=True) == 0.0


def test_decoded_window_restarts_or_ends_the_wait():
    s = scheduler()
    s.window_ready("a", 1.0)
    s.decoded("a", still_ready=True, now=2.0)
    assert s.ready_since == {"a": 2.0}
    s.decoded("a", still_ready=False, now=3.0)
    assert s.ready_since == {}
    s.window_ready("a", 4.0)
    s.forget("a")
    assert s.ready_since == {}


def test_talker_budget_follows_the_token2wav_call_time():
    s = scheduler()
    assert s.talker_budget() == DELAY  # no call yet: at least window_delay
    s.record_call(0.5)
    assert s.call_seconds == 0.5 and s.talker_budget() == 0.5  # the first call as it is
    s.record_call(1.0)
    assert s.call_seconds == pytest.approx(
        0.6
    )  # then a moving average (0.8 old + 0.2 new)
    for _ in range(50):
        s.record_call(0.01)
    assert s.talker_budget() == DELAY


def test_queued_windows_pause_the_talker():
    s = scheduler(max_queued_windows=4)
    streams = {"a": FakeStream(queued=2), "b": FakeStream(queued=1)}
    assert s.count_queued(streams) == 3 and not s.talker_paused
    streams["b"].queued = 2
    assert s.count_queued(streams) == 4 and s.talker_paused
    streams["a"].queued = 0
    assert s.count_queued(streams) == 2 and not s.talker_paused


def test_stream_state_counts_its_queued_windows():
    """StreamState.queued_windows (what the scheduler sums): chunks whose codes and look-ahead exist."""
    from omni_vllm.streaming import StreamConfig, StreamState

    st = StreamState("Chelsie", noise=0, config=StreamConfig(chunk=36, look_ahead=12))
    st.append(range(47))
    assert (
        st.queued_windows() == 0 and not st.ready
    )  # chunk 0 needs codes [0, 36) + 12 ahead
    st.append([0])
    assert st.queued_windows() == 1 and st.ready
    st.append(range(36))  # 84: chunk 1 ([36, 72)) has its look-ahead
    assert st.queued_windows() == 2
    st.append([1], finished=True)  # finished: the partial chunk 2 is decodable too
    assert st.queued_windows() == 3
