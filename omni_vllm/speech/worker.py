"""The speech worker: one thread that owns the Talker and the streaming Token2Wav's bookkeeping
and is the only one to touch them (as vLLM's EngineCore busy loop owns the model executor); the
tensor work of Token2Wav window calls goes to a `WindowDecoder` (omni_vllm.speech.decoder), on its
own thread and CUDA stream on CUDA, so that talker steps go on while a window call runs.

It takes typed commands (`AddRequest`, `ThinkerRows`, `ThinkerFinished`, `Cancel`, `Sync`) through
`submit` (thread-safe), and each iteration:
  1. applies the commands in arrival order;
  2. runs Talker steps, each ONE batched step of every request whose next input exists, for up to
     `SpeechScheduler.talker_budget()`;
  3. unless a window call is in flight, plans ONE batched window call over the streams the
     scheduler picks and hands it to the decoder (not threaded, the CPU default: it runs now);
     a call's result is applied (audio out, streams advanced) in the iteration it comes back;
then posts what each request produced (`WorkerOutput`) and its counters (`WorkerStats`) through
`post`, once per iteration.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omni_vllm.speech.config import SpeechConfig
from omni_vllm.speech.decoder import WindowDecoder
from omni_vllm.speech.scheduler import Speaker, SpeechScheduler
from omni_vllm.streaming import StreamingToken2Wav
from omni_vllm.talker import Talker, TalkerSampling
from omni_vllm.token2wav import SAMPLE_RATE, NoiseSource

logger = logging.getLogger("omni_vllm.speech")


# -- commands (event loop -> worker) --------------------------------------------------------------


@dataclass
class AddRequest:
    """Start speaking a request: its thinker prompt and the reply rows that came with it."""

    request_id: str
    prompt_ids: torch.Tensor  # (L,)
    prompt_rows: (
        torch.Tensor
    )  # (L, 2, E): input embedding and last hidden state per prompt token
    rows: (
        torch.Tensor | None
    )  # reply rows that arrived before the prompt ids were known
    positions: (
        torch.Tensor | None
    )  # the thinker's TMRoPE positions of the prompt (3, L)
    voice: str
    sampling: TalkerSampling
    noise: NoiseSource
    max_codes: int


@dataclass
class ThinkerRows:
    """More reply rows (embedding, hidden state) of a speaking request."""

    request_id: str
    rows: torch.Tensor


@dataclass
class ThinkerFinished:
    """The request's text is complete; `max_codes`: the runaway guard's cap on codes (or None)."""

    request_id: str
    max_codes: int | None


@dataclass
class Cancel:
    """Forget the request (harmless if the worker already closed it)."""

    request_id: str


@dataclass
class Sync:
    """Resolved once this iteration's outputs are posted (`done` travels back with them)."""

    done: Any


Command = AddRequest | ThinkerRows | ThinkerFinished | Cancel | Sync


# -- outputs (worker -> event loop) ---------------------------------------------------------------


@dataclass
class WorkerOutput:
    """One request's output of one worker iteration."""

    audio: list[np.ndarray] = field(default_factory=list)
    talker_reason: str | None = (
        None  # with done: "stop", "length", or "runaway" (the guard cut it)
    )
    codes: list[int] = field(default_factory=list)
    done: bool = False  # the last samples (stream closed)
    error: BaseException | None = None


@dataclass
class WorkerTotals:
    """Counters since start."""

    talker_steps: int = 0
    talker_codes: int = 0
    talker_seconds: float = 0.0
    token2wav_calls: int = 0
    token2wav_windows: int = 0
    token2wav_seconds: float = 0.0
    audio_samples: int = 0
    iterations: int = 0


@dataclass
class WorkerStats(WorkerTotals):
    """Gauges as of the end of an iteration, and the counters."""

    talker_slots_used: int = 0
    talker_kv_usage: float = 0.0
    talker_preemptions: int = 0
    stream_states: int = 0
    queued_windows: int = 0
    worker_requests: int = 0


class SpeechWorker(threading.Thread):
    """The speech path's one thread (see the module docstring)."""

    def __init__(
        self,
        talker: Talker,
        streamer: StreamingToken2Wav,
        post: Callable[[dict[str, WorkerOutput], WorkerStats, list], None],
        config: SpeechConfig,
        *,
        thinker_busy: Callable[[], bool] = lambda: False,
        threaded_token2wav: bool | None = None,
    ):
        """`threaded_token2wav`: window calls on the decoder's own thread (None: on CUDA)."""
        super().__init__(name="omni-speech", daemon=True)
        self.talker, self.streamer, self.post = talker, streamer, post
        self.scheduler = SpeechScheduler(
            max_queued_windows=config.max_queued_windows,
            window_delay=config.window_delay,
        )
        self.thinker_busy = (
            thinker_busy  # whether the thinker has any request (text-only ones too)
        )
        self.log_interval = config.log_interval
        self.cond = threading.Condition()
        self.inbox: collections.deque[Command] = collections.deque()
        self.stopping = False
        self.speakers: dict[str, Speaker] = {}
        self.totals = WorkerTotals()
        self._last_log, self._logged = (
            time.monotonic(),
            dataclasses.replace(self.totals),
        )
        self._threads: tuple[int, int] | None = None
        self.decoder = self._make_decoder(threaded_token2wav)

    def _make_decoder(self, threaded: bool | None) -> WindowDecoder:
        """The Token2Wav decoder: threaded by default where the talker and Token2Wav do not
        share CPU cores (CUDA)."""
        if threaded is None:
            threaded = self.streamer.t2w.device.type == "cuda"
        return WindowDecoder(self.streamer.runner, self._wake, threaded=threaded)

    def _wake(self) -> None:
        """A window call's result is ready (called from the decoder's thread)."""
        with self.cond:
            self.cond.notify()

    @property
    def ready_since(self) -> dict[str, float]:
        return self.scheduler.ready_since

    # -- from the event loop -----------------------------------------------------------------

    def submit(self, cmd: Command) -> None:
        with self.cond:
            self.inbox.append(cmd)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.decoder.stop()

    # -- the loop ------------------------------------------------------------------------------

    def _cpu_threads(self) -> None:
        """On the CPU, give the speech path every core this process may use while the thinker has
        no request at all (its process then idles: two busy processes on one core's threads would
        slow both), and the thread count it started with otherwise. Off when vLLM's CPU worker runs
        in this process (it pins threads to cores and replaces `torch.set_num_threads`; the thinker
        would not idle elsewhere anyway)."""
        if self._threads is None:
            return
        base, cores = self._threads
        busy = (
            any(not sp.thinker_done for sp in self.speakers.values())
            or self.thinker_busy()
        )
        n = base if busy else cores
        if n != torch.get_num_threads():
            logger.debug(
                "speech worker: %d torch thread(s) (thinker %s)",
                n,
                "busy" if n == base else "idle",
            )
            torch.set_num_threads(
                n
            )  # process-wide; the other threads here do little torch work

    def run(self) -> None:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
        on_cpu = getattr(self.talker, "device", torch.device("cpu")).type == "cpu"
        own = (
            torch.set_num_threads is torch._C.set_num_threads
        )  # no in-process vLLM CPU worker
        self._threads = (
            (torch.get_num_threads(), cores)
            if on_cpu and own and cores > torch.get_num_threads()
            else None
        )
        while True:
            with self.cond:
                while not self.inbox and not self.stopping:
                    wait = self._idle_wait()
                    if wait == 0:
                        break
                    self.cond.wait(wait)
                if self.stopping:
                    return
                commands = list(self.inbox)
                self.inbox.clear()
            outputs: dict[str, WorkerOutput] = collections.defaultdict(WorkerOutput)
            syncs = [cmd.done for cmd in commands if isinstance(cmd, Sync)]
            try:
                for cmd in commands:
                    self._apply(cmd, outputs)
                self._cpu_threads()
                self._iteration(outputs)
            except Exception as e:  # a bug or a device error: fail every speaking request, keep serving
                logger.exception(
                    "speech worker iteration failed; failing %d speaking request(s)",
                    len(self.speakers),
                )
                for rid in list(self.speakers):
                    self._drop(rid)
                    outputs[rid].error = e
            self.post(dict(outputs), self.stats(), syncs)
            self._maybe_log()

    def _apply(self, cmd: Command, outputs: dict[str, WorkerOutput]) -> None:
        if isinstance(cmd, AddRequest):
            rid = cmd.request_id
            try:
                self.talker.add_request(
                    rid,
                    prompt_ids=cmd.prompt_ids,
                    prompt_embeds=cmd.prompt_rows[:, 0],
                    prompt_hidden=cmd.prompt_rows[:, 1],
                    prompt_positions=cmd.positions,
                    voice=cmd.voice,
                    sampling=cmd.sampling,
                    max_codes=cmd.max_codes,
                )
                self.streamer.open(rid, cmd.voice, cmd.noise)
            except Exception as e:
                self.talker.remove(rid)
                outputs[rid].error = e
                return
            self.speakers[rid] = Speaker()
            self._add_rows(rid, cmd.rows)
        elif isinstance(cmd, ThinkerRows):
            self._add_rows(cmd.request_id, cmd.rows)
        elif isinstance(cmd, ThinkerFinished):
            rid = cmd.request_id
            if rid in self.talker and self.talker.finish_thinker(
                rid, max_codes=cmd.max_codes
            ):
                self.speakers[rid].guarded = True
            if rid in self.speakers:
                self.speakers[rid].thinker_done = True
        elif isinstance(cmd, Cancel):
            self._drop(cmd.request_id)
            outputs.pop(cmd.request_id, None)
        # Sync needs nothing here: its future is resolved when this iteration's outputs are posted

    def _add_rows(self, rid: str, rows: torch.Tensor | None) -> None:
        if (
            rows is None or rid not in self.talker
        ):  # the talker may already have stopped
            return
        self.talker.add_thinker_rows(rid, rows)

    def _drop(self, rid: str) -> None:
        self.talker.remove(rid)
        self.streamer.cancel(rid)
        self.speakers.pop(rid, None)
        self.scheduler.forget(rid)

    # -- one iteration -------------------------------------------------------------------------

    def _talker_ready(self) -> list:
        return [] if self.scheduler.talker_paused else self.talker.ready()

    def _idle_wait(self) -> float | None:
        if self.decoder.has_result or self.streamer.finished_streams():
            return 0.0
        if self.decoder.busy:
            # no other call can start: talker steps, or wait for the result (it wakes us)
            return 0.0 if self._talker_ready() else None
        return self.scheduler.idle_wait(
            time.monotonic(),
            self.streamer.streams,
            self.speakers,
            talker_idle=not self._talker_ready(),
        )

    def _iteration(self, outputs: dict[str, WorkerOutput]) -> None:
        self.totals.iterations += 1
        streams, sched, decoder = self.streamer.streams, self.scheduler, self.decoder
        # 0. The result of the window call in flight, if it is back.
        self._collect(outputs)

        # 1. Talker steps for every request with input (each step one batched call), for up to the
        #    scheduler's budget; cut short when a request's first window becomes decodable (and no
        #    call is in flight to delay it) or the call in flight is back.
        t_start, steps0 = time.perf_counter(), self.totals.talker_steps
        budget = sched.talker_budget()
        while ready := self._talker_ready():
            first_window = self._talker_step(ready) and not decoder.busy
            if (
                first_window
                or decoder.has_result
                or time.perf_counter() - t_start >= budget
            ):
                break
            sched.count_queued(streams)
        self.totals.talker_seconds += time.perf_counter() - t_start

        # 2. One batched Token2Wav call over the chosen streams' next windows, unless one is out.
        for rid in self.streamer.finished_streams():  # nothing left to decode
            self._close(rid, outputs[rid])
        now = time.monotonic()
        chosen = []
        if not decoder.busy:
            chosen, _ = sched.plan(
                now, streams, self.speakers, talker_idle=not self._talker_ready()
            )
        steps = self.totals.talker_steps - steps0
        if chosen:
            self._submit(chosen, outputs, now)
        sched.count_queued(streams)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "iteration: %d results, %d talker steps (%d ready now), decoded %s in %.3f s, %d queued",
                len(outputs),
                steps,
                len(self.talker.ready()),
                chosen,
                time.monotonic() - now,
                sched.queued,
            )

    def _talker_step(self, ready: list) -> bool:
        """One talker step; returns whether a request's first window became decodable."""
        streams, now, first_window = self.streamer.streams, time.monotonic(), False
        self.totals.talker_steps += 1
        for rid, out in self.talker.step(ready).items():
            sp = self.speakers[rid]
            new = [] if out.code is None else [out.code]
            sp.new_codes += new
            self.totals.talker_codes += len(new)
            self.streamer.push(rid, new, finished=out.finished)
            sp.talker_done = out.finished
            if out.finished:
                sp.talker_reason = out.reason
            if streams[rid].ready and self.scheduler.window_ready(rid, now):
                first_window = first_window or sp.first_audio is None
        return first_window

    def _submit(
        self, rids: list[str], outputs: dict[str, WorkerOutput], now: float
    ) -> None:
        """Plan a window call over these streams and hand it to the decoder (applied here at
        once when the decoder is not threaded)."""
        call = self.streamer.begin(request_ids=rids)
        call.planned_at = now
        self.decoder.submit(call)
        if not self.decoder.threaded:
            self._collect(outputs)

    def _collect(self, outputs: dict[str, WorkerOutput]) -> None:
        """Apply the result of the call in flight, if it is back: audio out, streams advanced
        (the ones that emitted their last samples closed)."""
        done = self.decoder.collect()
        if done is None:
            return
        if done.error is not None:
            self.streamer.in_flight.clear()
            raise done.error
        self.scheduler.record_call(done.seconds)
        self.totals.token2wav_calls += 1
        self.totals.token2wav_windows += len(done.call.request_ids)
        self.totals.token2wav_seconds += done.seconds
        with self.decoder.context():
            decoded = self.streamer.finish(done.call, done.result)
        done_at, planned_at = time.monotonic(), done.call.planned_at
        for rid, out in decoded.items():
            res, sp = outputs[rid], self.speakers[rid]
            if n := len(out.audio):
                res.audio.append(out.audio.detach().float().cpu().numpy())
                self.totals.audio_samples += n
                sp.decoded(n / SAMPLE_RATE, done_at)
            res.codes, sp.new_codes = (
                res.codes + sp.new_codes,
                [],
            )  # codes travel with their audio
            if out.done:
                self._close(rid, res)
            else:
                self.scheduler.decoded(
                    rid, self.streamer.streams[rid].ready, planned_at
                )

    def _close(self, rid: str, res: WorkerOutput) -> None:
        """The stream emitted its last samples: free it and send what is left."""
        sp = self.speakers.pop(rid, None)
        if sp is not None:
            res.codes = res.codes + sp.new_codes
            res.talker_reason = (
                "runaway"
                if sp.guarded and sp.talker_reason == "length"
                else sp.talker_reason
            )
        res.done = True
        self.streamer.cancel(rid)
        self.scheduler.forget(rid)

    # -- reporting -----------------------------------------------------------------------------

    def stats(self) -> WorkerStats:
        return WorkerStats(
            **vars(self.totals),  # flat counters (asdict's deep copy, every iteration)
            talker_slots_used=self.talker.max_slots - self.talker.num_free_slots,
            talker_kv_usage=getattr(self.talker, "kv_usage", 0.0),
            talker_preemptions=getattr(self.talker, "preemptions", 0),
            stream_states=len(self.streamer.streams),
            queued_windows=self.scheduler.queued,
            worker_requests=len(self.speakers),
        )

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_interval or self.totals == self._logged:
            return
        t, last = self.totals, self._logged
        span = now - self._last_log
        audio_s = (t.audio_samples - last.audio_samples) / SAMPLE_RATE
        logger.info(
            "speech: %d speaking, %d queued windows; last %.1f s: %d talker steps (%d codes, %.1f s), "
            "%d token2wav calls (%d windows, %.1f s), %.1f s of audio (%.2fx real time)",
            len(self.speakers),
            self.scheduler.queued,
            span,
            t.talker_steps - last.talker_steps,
            t.talker_codes - last.talker_codes,
            t.talker_seconds - last.talker_seconds,
            t.token2wav_calls - last.token2wav_calls,
            t.token2wav_windows - last.token2wav_windows,
            t.token2wav_seconds - last.token2wav_seconds,
            audio_s,
            audio_s / span,
        )
        self._last_log, self._logged = now, dataclasses.replace(self.totals)
