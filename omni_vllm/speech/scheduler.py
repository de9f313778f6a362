"""The speech worker's scheduling policy: which Token2Wav windows to decode now, how long the
talker may run first, and when an idle worker must wake up. Pure (no torch, no threads), on a
clock given as `now`, so that it is tested with fake clocks (tests/test_speech_scheduler.py).

Each worker iteration runs the talker for at most `talker_budget()` (as long as one Token2Wav
call takes, at least `window_delay`), cut short when a request's first window becomes decodable,
so that both halves progress when both have work. Then `plan()` picks the streams whose next
window goes into the one batched Token2Wav call, in this order: requests' first windows (time to
first audio), alone so the call stays short; else streams whose listener would run dry before
another call could finish (`Speaker.slack` below `window_delay` + 2 calls); else every ready
window, once the oldest has waited `window_delay` for company, every speaking stream has one, or
the talker is idle. While `max_queued_windows` or more decodable windows wait, the talker pauses.

How windows are picked now that Token2Wav can run on its own thread (omni_vllm.speech.decoder;
the default on CUDA): at most one window call is in flight, and `plan()` is asked for the next
one only when the previous call's result has been applied, so the order above decides each call,
made as soon as the decoder is free. While a call runs the talker keeps stepping (it no longer
waits for Token2Wav: a call's duration only bounds how long one iteration's talker loop runs before
outputs are posted, `talker_budget()`), and the windows that become ready meanwhile wait for the
next call, which therefore batches everything that became ready during the previous one.
`record_call` gets the decoder's own time for the call's tensor work. On the CPU the call runs
inline (the decoder is not threaded), which is the order of one iteration before the decoder
existed: talker steps, then the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Stream(Protocol):
    """What the policy reads of a stream (omni_vllm.streaming.StreamState)."""

    @property
    def ready(
        self,
    ) -> bool: ...  # a window (or a finished stream's tail) can be decoded now

    @property
    def done(self) -> bool: ...  # finished and every sample emitted

    def queued_windows(self) -> int: ...


@dataclass
class Speaker:
    """Worker-side state of one speaking request."""

    new_codes: list[int] = field(
        default_factory=list
    )  # not yet sent back (they ride with audio)
    talker_done: bool = False
    talker_reason: str | None = None  # "stop" | "length" once talker_done
    guarded: bool = False  # the runaway guard lowered its cap on codes
    thinker_done: bool = False
    first_audio: float | None = (
        None  # when its first samples were decoded (worker clock)
    )
    audio_seconds: float = 0.0  # decoded so far

    def slack(self, now: float) -> float:
        """Seconds until a listener who started playing at the first samples runs out of audio."""
        if self.first_audio is None:
            return float("-inf")  # no audio yet: time to first audio is what counts
        return self.first_audio + self.audio_seconds - now

    def decoded(self, seconds: float, now: float) -> None:
        """`seconds` more audio were decoded at `now`."""
        if seconds and self.first_audio is None:
            self.first_audio = now
        self.audio_seconds += seconds


class SpeechScheduler:
    """The policy's state: when each stream's oldest undecoded window became ready, the decodable
    windows waiting over all streams, and the moving average of one Token2Wav call."""

    def __init__(self, *, max_queued_windows: int, window_delay: float):
        self.max_queued_windows, self.window_delay = max_queued_windows, window_delay
        self.ready_since: dict[
            str, float
        ] = {}  # stream -> when its oldest undecoded window became ready
        self.queued = 0  # decodable windows not decoded yet, all streams
        self.call_seconds = 0.0  # moving average of one Token2Wav call
        self.calls = 0

    # -- the talker ------------------------------------------------------------------------------

    @property
    def talker_paused(self) -> bool:
        """Too many windows wait for Token2Wav: no talker step (and no new speaker) now."""
        return self.queued >= self.max_queued_windows

    def talker_budget(self) -> float:
        """Seconds of talker steps per iteration: as long as one Token2Wav call takes."""
        return max(self.window_delay, self.call_seconds)

    def count_queued(self, streams: Mapping[str, Stream]) -> int:
        self.queued = sum(s.queued_windows() for s in streams.values())
        return self.queued

    # -- Token2Wav ---------------------------------------------------------------------------------

    def plan(
        self,
        now: float,
        streams: Mapping[str, Stream],
        speakers: Mapping[str, Speaker],
        talker_idle: bool,
    ) -> tuple[list[str], float | None]:
        """(streams to decode now, seconds until a decode is due otherwise / None: nothing ready).

        `talker_idle`: the talker has no step to run (or is paused)."""
        ready = [rid for rid, s in streams.items() if s.ready]
        if not ready:
            return [], None
        first = [rid for rid in ready if speakers[rid].first_audio is None]
        if first:
            return first, 0.0
        margin = self.window_delay + 2.0 * self.call_seconds
        urgent = [rid for rid in ready if speakers[rid].slack(now) <= margin]
        if urgent:
            return urgent, 0.0
        if len(ready) == len(streams) or talker_idle:
            return ready, 0.0
        due = min(self.ready_since.get(rid, now) for rid in ready) + self.window_delay
        return (ready, 0.0) if due <= now else ([], due - now)

    def idle_wait(
        self,
        now: float,
        streams: Mapping[str, Stream],
        speakers: Mapping[str, Speaker],
        talker_idle: bool,
    ) -> float | None:
        """0: work now; seconds: a decode falls due then; None: nothing to do until a command."""
        if not talker_idle or any(s.done for s in streams.values()):
            return 0.0
        return self.plan(now, streams, speakers, talker_idle)[1]

    def window_ready(self, rid: str, now: float) -> bool:
        """The stream has a decodable window after a talker step; its wait starts now unless it
        started before. Returns whether it started now."""
        if rid in self.ready_since:
            return False
        self.ready_since[rid] = now
        return True

    def decoded(self, rid: str, still_ready: bool, now: float) -> None:
        """The stream's window was decoded in the call planned at `now`."""
        if still_ready:
            self.ready_since[rid] = now
        else:
            self.ready_since.pop(rid, None)

    def record_call(self, seconds: float) -> None:
        """One Token2Wav call took `seconds` (moving average, the first call as it is)."""
        self.call_seconds = (
            seconds if not self.calls else 0.8 * self.call_seconds + 0.2 * seconds
        )
        self.calls += 1

    def forget(self, rid: str) -> None:
        self.ready_since.pop(rid, None)
