"""SpeechEngine: text and streamed speech per request, the speech path batched across requests.

One per server, beside vLLM's `AsyncLLM` (the thinker). A request that asks for audio opts in to
the thinker's hidden states (omni_vllm.hidden_states); its rows reach this engine's sink as the
thinker runs, and one dedicated background thread (the *worker*) keeps a running batch of all
speaking requests:

    event loop (API server)                          worker thread (all torch work of the speech path)
    generate(): admission (limits), then a           each iteration:
      producer task per request iterating              1. commands: add / thinker rows / thinker
      AsyncLLM.generate -> text deltas                    finished / cancel / sync, in arrival order
    hidden-states sink (AsyncLLM's output task):       2. Talker steps, each ONE batched step of
      rows -> worker commands                             every request whose next input exists (the
                                                          talker follows the thinker token by token,
    consumer: merges text deltas and audio                waits when it catches up, then runs on
      pieces into SpeechChunks; the final chunk           tts_text_pad until it stops)
      comes after text AND audio are done              3. ONE batched streaming Token2Wav call: the
                                                          next window of each chosen stream
                         <---- loop.call_soon_threadsafe(results) once per iteration

Requests join and leave between iterations. Text-only requests go straight to AsyncLLM.

Scheduling. Step 2 runs for at most as long as one Token2Wav call takes (moving average, at least
`window_delay`), and stops early when a request's first window becomes decodable, so that both
halves progress when both have work. Step 3 picks, in this order: requests' first windows (time
to first audio), alone so the call stays short; else streams whose listener would run dry before
another call could finish (slack = audio decoded - time since its first audio, below `window_delay`
+ 2 calls); else every ready window, once the oldest has waited `window_delay` for company, every
speaking stream has one, or the talker is idle. Chunks to the consumer merge whatever is ready when
it asks, so a slow consumer gets fewer, larger chunks.

Limits and waiting: at most `max_speaking` requests speak at once (the talker has that many
KV-cache slots) and, while `max_queued_windows` or more decodable windows wait for Token2Wav, the
talker pauses and no new speaker is admitted. A new audio request then waits for a slot, in arrival
order (FIFO: nobody overtakes a waiter), for as long as its caller waits, as vLLM's scheduler keeps
text requests waiting: a caller that goes away (closes the generator, cancels its task, `abort`)
leaves the queue at once, before its thinker request was ever started. Only two things refuse a
request for load, with SpeechBusy (its `code` says which, its `retry_after` when to come back):
`max_waiting` requests waiting already (the bound on what waiters hold), and the optional
server-side wait limit `queue_timeout`. Text requests are never held back.

Cancellation: closing the generator, cancelling its task, or `abort(request_id)` frees the
request's talker slot, stream state and queued windows (worker command) and aborts its thinker
request in AsyncLLM at once.

Determinism: a request's codes depend only on its own inputs and talker sampling settings (give
`TalkerSampling(seed=...)` when sampling), and its audio only on its codes, voice and `noise`;
batching changes float rounding only (~1e-7).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2_5OmniConfig

from omni_vllm.checkpoint import engine_checkpoint
from omni_vllm.errors import SpeechBusy, SpeechLoadError, SpeechUnavailable, UnknownVoice
from omni_vllm.hidden_states import (
    HiddenStatesChunk,
    check_speech_config,
    request_hidden_states,
    set_hidden_states_sink,
)
from omni_vllm.memory import speech_dtypes
from omni_vllm.streaming import StreamConfig, StreamingToken2Wav, StreamState, decode_windows
from omni_vllm.talker import Talker, TalkerSampling
from omni_vllm.token2wav import SAMPLE_RATE, Token2Wav

__all__ = [
    "SAMPLE_RATE",
    "SpeechBusy",
    "SpeechChunk",
    "SpeechEngine",
    "SpeechLoadError",
    "SpeechUnavailable",
    "TalkerSampling",
    "UnknownVoice",
]

logger = logging.getLogger("omni_vllm.speech")

RUNAWAY_FLOOR_CODES = 100  # the runaway guard never cuts a reply's speech below 2 s


@dataclass
class SpeechChunk:
    """What one request produced since its previous chunk."""

    text: str  # new text since the previous chunk (delta)
    token_ids: list[int]  # new thinker token ids
    audio: np.ndarray | None  # new float32 mono samples at SAMPLE_RATE (24 kHz), or None
    finished: bool = False
    finish_reason: str | None = None  # the thinker's ("stop", "length", "abort", ...)
    # Filled on the final chunk.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_tokens: int = 0  # talker codec codes (50 per second of speech)
    # The talker codes whose audio is in this chunk or earlier (codes travel with audio).
    audio_codes: list[int] = field(default_factory=list)
    # Seconds the request waited for its speaking slot (audio requests; the same on every chunk).
    queue_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Worker thread: the Talker and the streaming Token2Wav, batched across requests
# ---------------------------------------------------------------------------------------------


@dataclass
class _Result:
    """One request's output of one worker iteration."""

    audio: list[np.ndarray] = field(default_factory=list)
    talker_reason: str | None = None  # with done: "stop", "length", or "runaway" (the guard cut it)
    codes: list[int] = field(default_factory=list)
    done: bool = False  # the last samples (stream closed)
    error: BaseException | None = None


@dataclass
class _Speaker:
    """Worker-side state of one speaking request."""

    new_codes: list[int] = field(default_factory=list)  # not yet sent back (they ride with audio)
    talker_done: bool = False
    talker_reason: str | None = None  # "stop" | "length" once talker_done
    guarded: bool = False  # the runaway guard lowered its cap on codes
    thinker_done: bool = False
    first_audio: float | None = None  # when its first samples were decoded (worker clock)
    samples: int = 0  # decoded so far

    def slack(self, now: float) -> float:
        """Seconds until a listener who started playing at the first samples runs out of audio."""
        if self.first_audio is None:
            return float("-inf")  # no audio yet: time to first audio is what counts
        return self.first_audio + self.samples / SAMPLE_RATE - now


def queued_windows(s: StreamState) -> int:
    """Chunks of `s` whose codes exist (with their look-ahead) but which are not decoded yet."""
    n, k = 0, s.next_chunk
    while True:
        start, end = s.bounds(k)
        ready = start < s.num_codes if s.finished else s.num_codes >= end + s.config.look_ahead
        if not ready:
            return n
        n, k = n + 1, k + 1


class _Worker(threading.Thread):
    """The speech path's one thread: owns the Talker and the stream states, and is the only one
    to touch them. Fed through `submit` (thread-safe), answers through `post` once per iteration."""

    def __init__(self, talker: Talker, streamer: StreamingToken2Wav, post, *, max_queued_windows: int,
                 window_delay: float, log_interval: float, thinker_busy: Callable[[], bool] = lambda: False):
        super().__init__(name="omni-speech", daemon=True)
        self.talker, self.streamer, self.post = talker, streamer, post
        self.thinker_busy = thinker_busy  # whether the thinker has any request (text-only ones too)
        self.max_queued_windows, self.window_delay, self.log_interval = max_queued_windows, window_delay, log_interval
        self.cond = threading.Condition()
        self.inbox: collections.deque = collections.deque()
        self.stopping = False
        self.speakers: dict[str, _Speaker] = {}
        self.ready_since: dict[str, float] = {}  # stream -> when its oldest undecoded window became ready
        self.queued = 0  # decodable windows not decoded yet, all streams
        self.call_seconds = 0.0  # moving average of one Token2Wav call
        self.totals = dict(talker_steps=0, talker_codes=0, talker_seconds=0.0, token2wav_calls=0,
                           token2wav_windows=0, token2wav_seconds=0.0, audio_samples=0, iterations=0)
        self._last_log, self._logged = time.monotonic(), dict(self.totals)

    # -- from the event loop -----------------------------------------------------------------

    def submit(self, *cmd) -> None:
        with self.cond:
            self.inbox.append(cmd)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

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
        busy = any(not sp.thinker_done for sp in self.speakers.values()) or self.thinker_busy()
        n = base if busy else cores
        if n != torch.get_num_threads():
            logger.debug("speech worker: %d torch thread(s) (thinker %s)", n, "busy" if n == base else "idle")
            torch.set_num_threads(n)  # process-wide; the other threads here do little torch work

    def run(self) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        on_cpu = getattr(self.talker, "device", torch.device("cpu")).type == "cpu"
        own = torch.set_num_threads is torch._C.set_num_threads  # no in-process vLLM CPU worker
        self._threads = (torch.get_num_threads(), cores) if on_cpu and own and cores > torch.get_num_threads() else None
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
            results: dict[str, _Result] = collections.defaultdict(_Result)
            syncs = [cmd[1] for cmd in commands if cmd[0] == "sync"]
            try:
                for cmd in commands:
                    self._apply(cmd, results)
                self._cpu_threads()
                self._iteration(results)
            except Exception as e:  # a bug or a device error: fail every speaking request, keep serving
                logger.exception("speech worker iteration failed; failing %d speaking request(s)", len(self.speakers))
                for rid in list(self.speakers):
                    self._drop(rid)
                    results[rid].error = e
            self.post(dict(results), self._snapshot(), syncs)
            self._maybe_log()

    def _apply(self, cmd: tuple, results: dict[str, _Result]) -> None:
        kind, rid = cmd[0], cmd[1]
        if kind == "add":
            spec = cmd[2]
            try:
                self.talker.add_request(
                    rid,
                    prompt_ids=spec["prompt_ids"],
                    prompt_embeds=spec["prompt_rows"][:, 0],
                    prompt_hidden=spec["prompt_rows"][:, 1],
                    prompt_positions=spec["positions"],
                    voice=spec["voice"],
                    sampling=spec["sampling"],
                    max_codes=spec["max_codes"],
                )
                self.streamer.open(rid, spec["voice"], spec["noise"])
            except Exception as e:
                self.talker.remove(rid)
                results[rid].error = e
                return
            self.speakers[rid] = _Speaker()
            self._add_rows(rid, spec["rows"])
        elif kind == "rows":
            self._add_rows(rid, cmd[2])
        elif kind == "finish":  # ("finish", rid, cap on codes from the runaway guard or None)
            if rid in self.talker and self.talker.finish_thinker(rid, max_codes=cmd[2]):
                self.speakers[rid].guarded = True
            if rid in self.speakers:
                self.speakers[rid].thinker_done = True
        elif kind == "cancel":
            self._drop(rid)
            results.pop(rid, None)
        # "sync" (a future resolved once this iteration's results are posted) needs nothing here

    def _add_rows(self, rid: str, rows: torch.Tensor | None) -> None:
        if rows is None or rid not in self.talker:  # the talker may already have stopped
            return
        for row in rows:
            self.talker.add_thinker_token(rid, row[0], row[1])

    def _drop(self, rid: str) -> None:
        self.talker.remove(rid)
        self.streamer.cancel(rid)
        self.speakers.pop(rid, None)
        self.ready_since.pop(rid, None)

    # -- scheduling ----------------------------------------------------------------------------

    def _talker_ready(self) -> list:
        return [] if self.queued >= self.max_queued_windows else self.talker.ready()

    def _plan(self, now: float) -> tuple[list[str], float | None]:
        """(streams to decode now, seconds until a decode is due otherwise / None: nothing ready).

        Requests' first windows go at once and alone (time to first audio comes first), then
        streams about to run dry (slack below the expected call time), again alone so that their
        call stays small. Other ready windows wait for company up to `window_delay`, unless every
        speaking stream has one or the talker has nothing to do."""
        streams = self.streamer.streams
        ready = [rid for rid, st in streams.items() if st.ready]
        if not ready:
            return [], None
        first = [rid for rid in ready if self.speakers[rid].first_audio is None]
        if first:
            return first, 0.0
        margin = self.window_delay + 2.0 * self.call_seconds
        urgent = [rid for rid in ready if self.speakers[rid].slack(now) <= margin]
        if urgent:
            return urgent, 0.0
        if len(ready) == len(streams) or not self._talker_ready():
            return ready, 0.0
        due = min(self.ready_since.get(rid, now) for rid in ready) + self.window_delay
        return (ready, 0.0) if due <= now else ([], due - now)

    def _idle_wait(self) -> float | None:
        """0: work now; seconds: a decode falls due then; None: nothing to do until a command."""
        if self._talker_ready() or any(st.done for st in self.streamer.streams.values()):
            return 0.0
        return self._plan(time.monotonic())[1]

    def _iteration(self, results: dict[str, _Result]) -> None:
        self.totals["iterations"] += 1
        streams = self.streamer.streams

        # 1. Talker steps for every request with input (each step one batched call), for up to as
        #    long as a Token2Wav call takes, so that both halves progress when both are busy; cut
        #    short when a request's first window becomes decodable (time to first audio).
        t_start, steps0 = time.perf_counter(), self.totals["talker_steps"]
        budget = max(self.window_delay, self.call_seconds)
        while ready := self._talker_ready():
            first_window = self._talker_step(ready)
            if first_window or time.perf_counter() - t_start >= budget:
                break
            self.queued = sum(queued_windows(st) for st in streams.values())
        self.totals["talker_seconds"] += time.perf_counter() - t_start

        # 2. One batched Token2Wav call over the chosen streams' next windows.
        for rid in [rid for rid, st in streams.items() if st.done]:  # finished, nothing left to decode
            self._close(rid, results[rid])
        now = time.monotonic()
        chosen, _ = self._plan(now)
        steps = self.totals["talker_steps"] - steps0
        if chosen:
            self._decode(chosen, results, now)
        self.queued = sum(queued_windows(st) for st in streams.values())
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("iteration: %d results, %d talker steps (%d ready now), decoded %s in %.3f s, %d queued",
                         len(results), steps, len(self.talker.ready()), chosen, time.monotonic() - now, self.queued)

    def _talker_step(self, ready: list) -> bool:
        """One talker step; returns whether a request's first window became decodable."""
        streams, now, first_window = self.streamer.streams, time.monotonic(), False
        self.totals["talker_steps"] += 1
        for rid, out in self.talker.step(ready).items():
            sp = self.speakers[rid]
            new = [] if out.code is None else [out.code]
            sp.new_codes += new
            self.totals["talker_codes"] += len(new)
            self.streamer.push(rid, new, finished=out.finished)
            sp.talker_done = out.finished
            if out.finished:
                sp.talker_reason = out.reason
            if streams[rid].ready and rid not in self.ready_since:
                self.ready_since[rid] = now
                first_window = first_window or sp.first_audio is None
        return first_window

    def _decode(self, rids: list[str], results: dict[str, _Result], now: float) -> None:
        streams = self.streamer.streams
        t0 = time.perf_counter()
        wavs = decode_windows(self.streamer.t2w, [streams[rid] for rid in rids], max_windows=1)
        seconds = time.perf_counter() - t0
        self.call_seconds = seconds if not self.totals["token2wav_calls"] else 0.8 * self.call_seconds + 0.2 * seconds
        self.totals["token2wav_calls"] += 1
        self.totals["token2wav_windows"] += len(rids)
        self.totals["token2wav_seconds"] += seconds
        done_at = time.monotonic()
        for rid, wav in zip(rids, wavs, strict=True):
            res, sp = results[rid], self.speakers[rid]
            if len(wav):
                res.audio.append(wav.detach().float().cpu().numpy())
                self.totals["audio_samples"] += len(wav)
                if sp.first_audio is None:
                    sp.first_audio = done_at
                sp.samples += len(wav)
            res.codes, sp.new_codes = res.codes + sp.new_codes, []  # codes travel with their audio
            if streams[rid].done:
                self._close(rid, res)
            elif streams[rid].ready:
                self.ready_since[rid] = now
            else:
                self.ready_since.pop(rid, None)

    def _close(self, rid: str, res: _Result) -> None:
        """The stream emitted its last samples: free it and send what is left."""
        sp = self.speakers.pop(rid, None)
        if sp is not None and sp.new_codes:
            res.codes = res.codes + sp.new_codes
        if sp is not None:
            res.talker_reason = "runaway" if sp.guarded and sp.talker_reason == "length" else sp.talker_reason
        res.done = True
        self.streamer.cancel(rid)
        self.ready_since.pop(rid, None)

    # -- reporting -----------------------------------------------------------------------------

    def _snapshot(self) -> dict:
        return dict(
            talker_slots_used=self.talker.max_slots - self.talker.num_free_slots,
            stream_states=len(self.streamer.streams),
            queued_windows=self.queued,
            worker_requests=len(self.speakers),
            **self.totals,
        )

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_interval or self.totals == self._logged:
            return
        d = {k: self.totals[k] - self._logged[k] for k in self.totals}
        span = now - self._last_log
        audio_s = d["audio_samples"] / SAMPLE_RATE
        logger.info(
            "speech: %d speaking, %d queued windows; last %.1f s: %d talker steps (%d codes, %.1f s), "
            "%d token2wav calls (%d windows, %.1f s), %.1f s of audio (%.2fx real time)",
            len(self.speakers), self.queued, span, d["talker_steps"], d["talker_codes"], d["talker_seconds"],
            d["token2wav_calls"], d["token2wav_windows"], d["token2wav_seconds"], audio_s, audio_s / span,
        )
        self._last_log, self._logged = now, dict(self.totals)


# ---------------------------------------------------------------------------------------------
# Event-loop side
# ---------------------------------------------------------------------------------------------


class _Job:
    """Loop-side state of one audio request."""

    def __init__(self, rid: str, voice: str, sampling: TalkerSampling, noise: Any, max_codes: int | None):
        self.rid, self.voice, self.sampling, self.noise, self.max_codes = rid, voice, sampling, noise, max_codes
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t_arrival = time.monotonic()
        self.t_first_audio: float | None = None
        self.waiter: asyncio.Future | None = None  # while waiting for admission
        self.admitted = False  # holds a speaking slot
        self.t_admitted: float | None = None
        self.pending_rows: list[torch.Tensor] = []  # rows before the prompt ids are known
        self.positions: torch.Tensor | None = None
        self.rows_seen = 0
        self.submitted = False  # the worker has the request
        self.thinker_done = False
        self.released = False
        self.producer: asyncio.Task | None = None


class _Aborted(Exception):
    """abort() reached a request still waiting for admission."""


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"



_FIX_MEMORY = ("give it more memory with --speech-gpu-memory-gb (on the GPU vLLM uses), lower --max-speaking or "
               "--talker-max-len, use --speech-dtype bfloat16, put it on its own GPU with --speech-device cuda:1, "
               "or serve text only with --allow-text-only")


def load_speech_modules(model_dir: str | Path, *, device: str | torch.device, dtypes: dict, max_slots: int,
                        max_len: int | None, kv_cache_tokens: int | None, max_codes: int) -> tuple[Talker, Token2Wav]:
    """The talker and Token2Wav of a checkpoint, on `device`, in `dtypes` (omni_vllm.memory.speech_dtypes).

    Raises SpeechUnavailable for a checkpoint without speech modules (a text-only export), and
    SpeechLoadError, naming the flag to change, for one whose speech path does not load: out of
    memory, tensors that do not match the config (missing, unexpected, wrong shape), a dtype the
    device cannot run."""
    from omni_vllm.checkpoint import tensor_files

    model_dir, device = Path(model_dir), torch.device(device)
    if not (model_dir / "spk_dict.pt").exists():
        raise SpeechUnavailable(f"{model_dir} has no spk_dict.pt (speaker table)")
    if not any(name.startswith("talker.") for name in tensor_files(model_dir)):
        raise SpeechUnavailable(f"{model_dir} holds no talker.* weights (a thinker-only checkpoint)")
    for role, dtype in dtypes.items():
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SpeechLoadError(f"the {role} cannot run in {dtype}: use --speech-dtype float32 or bfloat16")
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SpeechLoadError(f"{device} has no bfloat16 support: use --speech-dtype float32")
    config = Qwen2_5OmniConfig.from_pretrained(model_dir)
    limit = config.talker_config.max_position_embeddings
    talker_kwargs = dict(device=device, dtype=dtypes["talker"], max_slots=max_slots, max_codes=max_codes,
                         max_len=min(max_len or limit, limit), kv_cache_tokens=kv_cache_tokens)
    token2wav_kwargs = dict(device=device, dtype=dtypes["token2wav"], vocoder_dtype=dtypes["vocoder"])
    try:
        talker = Talker.from_pretrained(model_dir, **talker_kwargs)
        return talker, Token2Wav.from_pretrained(model_dir, **token2wav_kwargs)
    except torch.OutOfMemoryError as e:
        raise SpeechLoadError(f"out of memory loading the speech path on {device} ({e}): {_FIX_MEMORY}") from e
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, RuntimeError) and "state_dict" not in str(e):  # not load_state_dict's: a bug, show it
            raise
        raise SpeechLoadError(
            f"the speech modules' tensors in {model_dir} do not match its config ({str(e).strip()[:800]}): "
            "fetch the checkpoint again (--revision, --download-dir) or serve text only with --allow-text-only"
        ) from e


class SpeechEngine:
    """Text and streamed speech for AsyncLLM requests (see the module docstring)."""

    def __init__(
        self,
        engine,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        max_speaking: int = 32,
        max_queued_windows: int = 256,
        stream_config: StreamConfig | None = None,
        default_voice: str = "Chelsie",
        queue_timeout: float | None = None,
        max_waiting: int = 1024,
        max_codes: int = 4096,
        max_codes_per_text_token: float | None = 40.0,
        talker_max_len: int | None = None,
        window_delay: float = 0.05,
        log_interval: float = 10.0,
        speech_dtype: str | torch.dtype = "auto",
        kv_cache_tokens: int | None = None,
        allow_text_only: bool = False,
        text_only_reason: str | None = None,
    ):
        """`engine`: a vLLM AsyncLLM serving the checkpoint's thinker; `model_dir`: the
        checkpoint directory, from which the talker, Token2Wav and voices are loaded.

        Extra settings: `queue_timeout` (s) an audio request may wait for admission (None: as long
        as its caller waits; 0: refuse at once), `max_waiting` waiters at most; `max_codes` per
        request (the talker also stops on its own stop codes); `max_codes_per_text_token`: the runaway
        guard, see `runaway_cap` (None: off); `talker_max_len` prompt + codes per request (None: the engine's max_model_len + max_codes, at most the talker config's
        max_position_embeddings); `window_delay` (s) a ready Token2Wav window may wait to share a
        batch; `log_interval` (s) of progress logs. `speech_dtype` (omni_vllm.memory.speech_dtypes;
        `auto`: the talker in the engine's dtype); `kv_cache_tokens` the talker's KV positions over
        all requests.

        A speech path that fails to load raises SpeechLoadError naming the flag to change, or with
        `allow_text_only` leaves a text-only engine (logged); so does `text_only_reason` (the
        server's memory plan found no room) without loading anything. A checkpoint without speech
        modules, or an engine configuration in which the thinker cannot send its hidden states, is
        served text-only."""
        if max_speaking < 1 or max_queued_windows < 1:
            raise ValueError("max_speaking and max_queued_windows must be >= 1")
        self.engine = engine
        self.model_dir = Path(model_dir)
        self.device = torch.device(device or _default_device())
        self.max_speaking, self.max_queued_windows = max_speaking, max_queued_windows
        self.queue_timeout, self.max_waiting = queue_timeout, max_waiting
        self.max_codes, self.max_codes_per_text_token = max_codes, max_codes_per_text_token
        self.stream_config = stream_config or StreamConfig()
        self.default_voice = default_voice
        self._owns_engine = False

        self.talker: Talker | None = None
        self.token2wav: Token2Wav | None = None
        self.unavailable_reason: str | None = None
        t0 = time.perf_counter()
        model_config = getattr(engine, "model_config", None)
        thinker_dtype = getattr(model_config, "dtype", torch.float32)
        if talker_max_len is None and model_config is not None:  # a longer request never reaches the talker
            talker_max_len = model_config.max_model_len + max_codes
        try:
            if text_only_reason is not None:
                raise SpeechUnavailable(text_only_reason)
            if (vllm_config := getattr(engine, "vllm_config", None)) is not None:
                try:
                    check_speech_config(vllm_config)
                except ValueError as e:
                    raise SpeechUnavailable(str(e)) from None
            self.talker, self.token2wav = load_speech_modules(
                self.model_dir, device=self.device, dtypes=speech_dtypes(speech_dtype, thinker_dtype),
                max_slots=max_speaking, max_len=talker_max_len, kv_cache_tokens=kv_cache_tokens, max_codes=max_codes)
        except SpeechUnavailable as e:
            self.unavailable_reason = str(e)
        except SpeechLoadError as e:
            if not allow_text_only:
                raise
            logger.error("speech engine: %s; serving text only (--allow-text-only)", e)
            self.unavailable_reason = str(e)
        self.has_speech = self.talker is not None
        self.voices: list[str] = list(self.token2wav.voices) if self.has_speech else []

        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _Worker | None = None
        self._streamer: StreamingToken2Wav | None = None
        self._worker_snapshot = dict(talker_slots_used=0, stream_states=0, queued_windows=0, worker_requests=0)
        if self.has_speech:
            if default_voice not in self.voices:
                raise UnknownVoice(f"default voice {default_voice!r} is not one of {', '.join(self.voices)}")
            self._streamer = StreamingToken2Wav(self.token2wav, self.stream_config)  # validates the config
            self._worker = _Worker(self.talker, self._streamer, self._post, max_queued_windows=max_queued_windows,
                                   window_delay=window_delay, log_interval=log_interval,
                                   thinker_busy=lambda: engine.get_num_unfinished_requests() > 0)
            self._worker_snapshot = self._worker._snapshot()
            self._worker.start()
            cfg, tcfg = self.stream_config, self.talker.model.config
            logger.info(
                "speech engine: talker (%d layers, hidden %d, %s) and token2wav (DiT %d layers, %s) loaded from "
                "%s on %s in %.1f s; voices %s (default %s); max_speaking=%d, max_queued_windows=%d, "
                "max_codes=%d, talker_max_len=%d; stream: first chunk %d codes, chunk %d, DiT context "
                "%d back / %d ahead, vocoder %d/%d frames, %d ODE points; first audio after %d codes "
                "(%.2f s of speech)",
                tcfg.num_hidden_layers, tcfg.hidden_size, self.talker.dtype, len(self.token2wav.dit.transformer_blocks),
                next(self.token2wav.dit.parameters()).dtype,
                self.model_dir, self.device, time.perf_counter() - t0, ", ".join(self.voices), default_voice,
                max_speaking, max_queued_windows, max_codes, self.talker.max_len, cfg.first, cfg.chunk,
                cfg.left_context, cfg.look_ahead, cfg.vocoder_left, cfg.vocoder_right, cfg.num_steps,
                cfg.first_audio_codes(), cfg.first_audio_codes() / 50,
            )
        else:
            logger.warning("speech engine: %s cannot speak (%s); serving text only",
                           self.model_dir, self.unavailable_reason)

        self._jobs: dict[str, _Job] = {}
        self._speaking = 0  # admitted audio requests not yet released (slots reserved)
        self._waiters: collections.deque[asyncio.Future] = collections.deque()  # FIFO; result: admission time
        self._hold_seconds: collections.deque[float] = collections.deque(maxlen=64)  # slot held, recent requests
        self._snapshot: dict = self._worker_snapshot
        self._counters = dict(audio_requests=0, text_requests=0, refused=0, aborted=0, failed=0,
                              audio_samples_total=0, runaway_capped=0)
        self._ttfa: collections.deque[float] = collections.deque(maxlen=1024)
        self._aborts: set[asyncio.Task] = set()
        self._closed = False
        self._previous_sink = set_hidden_states_sink(self._on_hidden_states)

    @property
    def talker_max_len(self) -> int | None:
        """Most talker positions of one request (prompt tokens + 2 must fit); None without speech."""
        return self.talker.max_len if self.talker is not None else None

    @classmethod
    def from_engine_args(cls, engine_args, **kwargs) -> SpeechEngine:
        """Start an AsyncLLM from `AsyncEngineArgs` and wrap it; `shutdown()` also stops it."""
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(engine_args)
        try:
            self = cls(engine, engine_checkpoint(engine.vllm_config), **kwargs)
        except BaseException:
            engine.shutdown()
            raise
        self._owns_engine = True
        return self

    # ---------------------------------------------------------------------------- requests

    async def generate(
        self,
        prompt,
        sampling_params,
        request_id: str,
        *,
        audio: bool = False,
        voice: str | None = None,
        talker_sampling: TalkerSampling = TalkerSampling(),
        noise=None,
        max_codes: int | None = None,
        on_queued: Callable[[], Any] | None = None,
    ) -> AsyncIterator[SpeechChunk]:
        """Stream one request's text (deltas) and, with `audio=True`, its speech.

        `prompt` and `sampling_params` are what AsyncLLM.generate takes (n must be 1; chunks are
        always deltas, whatever the params' output_kind). `noise` is Token2Wav's initial noise for
        the request (int seed, CPU torch.Generator, tensor, or None). `max_codes` caps this
        request's speech (codes, 50 per second). The last chunk has `finished=True` and the counts;
        it comes after both text and audio are done. `on_queued` is called (on the loop) if the
        request has to wait for a speaking slot: it is then in the queue, and only the optional
        wait limit can still refuse it (a server sends its response's first bytes then).

        Raises SpeechUnavailable (checkpoint cannot speak), UnknownVoice, SpeechBusy (load),
        ValueError (n > 1, duplicate request id)."""
        from vllm.sampling_params import RequestOutputKind

        if self._closed:
            raise RuntimeError("speech engine is shut down")
        if getattr(sampling_params, "n", 1) != 1:
            raise ValueError("SpeechEngine.generate supports n=1 only")
        params = copy.copy(sampling_params)
        params.output_kind = RequestOutputKind.DELTA
        if not audio:
            self._counters["text_requests"] += 1
            async for chunk in self._generate_text(prompt, params, request_id):
                yield chunk
            return

        if not self.has_speech:
            raise SpeechUnavailable(f"this checkpoint cannot speak: {self.unavailable_reason}")
        voice = voice or self.default_voice
        if voice not in self.voices:
            raise UnknownVoice(f"unknown voice {voice!r}; available voices: {', '.join(self.voices)}")
        if request_id in self._jobs:
            raise ValueError(f"request id {request_id!r} is already speaking")
        self._bind_loop()
        job = _Job(request_id, voice, talker_sampling, noise, max_codes or self.max_codes)
        self._jobs[request_id] = job
        try:
            try:
                await self._admit(job, on_queued)
            except _Aborted:
                yield SpeechChunk("", [], None, finished=True, finish_reason="abort",
                                  queue_seconds=time.monotonic() - job.t_arrival)
                return
            self._counters["audio_requests"] += 1
            job.producer = asyncio.get_running_loop().create_task(
                self._produce(job, prompt, request_hidden_states(params)), name=f"omni-speech-{request_id}"
            )
            async for chunk in self._consume(job):
                chunk.queue_seconds = job.t_admitted - job.t_arrival
                yield chunk
        finally:
            await self._release(job)

    def runaway_cap(self, text_tokens: int) -> int | None:
        """The most codes a reply of `text_tokens` may speak, once its text is known (None: no guard).

        A talker that never samples its stop code would otherwise speak pad until `max_codes`. Speech
        runs at 50 codes per second and Qwen2.5-Omni's replies at about 3-4 text tokens per second
        (English and Chinese alike), i.e. 12-17 codes per token; the default 40 leaves 2-3 times that,
        and a floor of RUNAWAY_FLOOR_CODES (2 s) lets the shortest replies finish."""
        if not self.max_codes_per_text_token:
            return None
        return max(RUNAWAY_FLOOR_CODES, math.ceil(self.max_codes_per_text_token * text_tokens))

    async def abort(self, request_id: str) -> None:
        """Stop a request now; its stream then ends with a chunk with finish_reason "abort"."""
        job = self._jobs.get(request_id)
        if job is None:
            await self.engine.abort(request_id)  # a text request (its stream ends with "abort")
            return
        self._counters["aborted"] += 1
        if job.waiter is not None and not job.waiter.done():  # still waiting: leaves the queue now
            self._waiters.remove(job.waiter)
            job.waiter.set_exception(_Aborted())
            return
        await self._release(job)
        job.queue.put_nowait(("aborted",))

    def stats(self) -> dict:
        """Counters and gauges of the speech path (worker gauges as of its last iteration; await
        `sync()` first for an exact picture)."""
        ttfa = sorted(self._ttfa)
        return dict(
            active_speaking=self._speaking,
            waiting=len(self._waiters),
            thinker_unfinished=self.engine.get_num_unfinished_requests(),
            **self._snapshot,
            **self._counters,
            audio_seconds_total=self._counters["audio_samples_total"] / SAMPLE_RATE,
            ttfa_samples=list(self._ttfa),
            ttfa_p50=ttfa[len(ttfa) // 2] if ttfa else None,
        )

    async def sync(self) -> None:
        """Wait until the worker has applied everything submitted so far (joins, rows,
        cancellations) and `stats()` shows the result."""
        if self._worker is None or not self._worker.is_alive():
            return
        self._bind_loop()
        fut = asyncio.get_running_loop().create_future()
        self._worker.submit("sync", fut)
        await fut

    async def shutdown(self) -> None:
        """Abort every speaking or waiting request, stop the worker, unregister the sink (and stop
        the AsyncLLM if this engine started it)."""
        if self._closed:
            return
        self._closed = True
        for job in list(self._jobs.values()):
            if job.waiter is not None and not job.waiter.done():
                job.waiter.set_exception(SpeechBusy("speech engine shut down", code=SpeechBusy.SHUTDOWN))
                continue
            await self._release(job)
            job.queue.put_nowait(("error", RuntimeError("speech engine shut down")))
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        if self._worker is not None:
            self._worker.stop()
            await asyncio.to_thread(self._worker.join)
        if set_hidden_states_sink(self._previous_sink) != self._on_hidden_states:
            logger.warning("speech engine: another hidden-states sink was registered after this one")
        if self._owns_engine:
            self.engine.shutdown()
        logger.info("speech engine shut down")

    # ------------------------------------------------------------------------------ text

    async def _generate_text(self, prompt, params, request_id) -> AsyncIterator[SpeechChunk]:
        completion = 0
        gen = self.engine.generate(prompt, params, request_id)
        try:
            async for out in gen:
                c = out.outputs[0]
                completion += len(c.token_ids)
                chunk = SpeechChunk(c.text, list(c.token_ids), None)
                if out.finished:
                    chunk.finished, chunk.finish_reason = True, c.finish_reason
                    chunk.prompt_tokens, chunk.completion_tokens = len(out.prompt_token_ids or ()), completion
                yield chunk
        finally:
            await gen.aclose()  # consumer gone: AsyncLLM aborts the request now

    # ---------------------------------------------------------------------------- admission

    def _can_admit(self) -> bool:
        return self._speaking < self.max_speaking and self._snapshot["queued_windows"] < self.max_queued_windows

    async def _admit(self, job: _Job, on_queued: Callable[[], Any] | None = None) -> None:
        """Reserve a speaking slot: at once when one is free and nobody waits, else after waiting in
        FIFO order for as long as the caller waits (or `queue_timeout`). SpeechBusy at once when
        `max_waiting` requests wait already. Cancelling the caller leaves the queue."""
        if not self._waiters and self._can_admit():
            self._speaking += 1
            job.admitted, job.t_admitted = True, time.monotonic()
            return
        if len(self._waiters) >= self.max_waiting or (self.queue_timeout is not None and self.queue_timeout <= 0):
            raise self._refuse(SpeechBusy.QUEUE_FULL, f"speech engine busy: {self._speaking} speaking, "
                               f"{len(self._waiters)} waiting (at most {self.max_waiting})")
        job.waiter = fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if on_queued is not None:
            on_queued()
        try:
            job.t_admitted = await asyncio.wait_for(fut, self.queue_timeout)  # the waker reserves our slot
            job.admitted = True
        except BaseException as e:
            if fut in self._waiters:
                self._waiters.remove(fut)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._speaking -= 1  # a slot was reserved for us, but we are leaving
                self._wake()
            if isinstance(e, TimeoutError):
                raise self._refuse(SpeechBusy.WAIT_TIMEOUT,
                                   f"speech engine busy: no speaking slot within {self.queue_timeout:g} s") from None
            raise
        finally:
            job.waiter = None

    def _wake(self) -> None:
        """Hand free slots to the waiters, oldest first."""
        while self._waiters and self._can_admit():
            fut = self._waiters.popleft()
            if not fut.done():
                self._speaking += 1
                fut.set_result(time.monotonic())

    def _refuse(self, code: str, message: str) -> SpeechBusy:
        self._counters["refused"] += 1
        return SpeechBusy(message, code=code, retry_after=self.retry_after())

    def retry_after(self) -> float:
        """Seconds until a request refused now would likely be taken (at least 1): until the
        requests waiting now have got a slot, `max_speaking` at a time, each holding it for the
        mean time recent requests held theirs (before any finished: the oldest speaker's age)."""
        if self._hold_seconds:
            hold = sum(self._hold_seconds) / len(self._hold_seconds)
        else:
            now = time.monotonic()
            hold = max((now - j.t_admitted for j in self._jobs.values() if j.admitted and not j.released),
                       default=1.0)
        return max(1.0, (len(self._waiters) + 1) * hold / self.max_speaking)

    # ---------------------------------------------------------------------------- one request

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("SpeechEngine is bound to another event loop (the AsyncLLM's)")

    async def _produce(self, job: _Job, prompt, params) -> None:
        """Iterate the thinker; text deltas to the consumer, prompt ids / end to the worker."""
        completion = 0
        try:
            async for out in self.engine.generate(prompt, params, job.rid):
                if job.released:
                    return
                if not job.submitted:
                    self._submit(job, out.prompt_token_ids)
                c = out.outputs[0]
                completion += len(c.token_ids)
                if c.text or c.token_ids:
                    job.queue.put_nowait(("text", c.text, list(c.token_ids)))
                if out.finished:
                    job.thinker_done = True
                    if job.submitted:
                        self._worker.submit("finish", job.rid, self.runaway_cap(completion))
                    job.queue.put_nowait(("text_end", c.finish_reason, len(out.prompt_token_ids), completion))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            job.queue.put_nowait(("error", e))

    def _submit(self, job: _Job, prompt_ids) -> None:
        """Hand the request to the worker once its prompt ids are known (first output)."""
        n = len(prompt_ids)
        rows = torch.cat(job.pending_rows) if job.pending_rows else None
        job.pending_rows = []
        if rows is None or len(rows) < n:
            raise RuntimeError(
                f"request {job.rid}: the thinker sent {0 if rows is None else len(rows)} of {n} prompt "
                "hidden-state rows; is the omni_vllm plugin (patches/) active in the engine?"
            )
        spec = dict(prompt_ids=torch.tensor(prompt_ids), prompt_rows=rows[:n], rows=rows[n:] if len(rows) > n else None,
                    positions=job.positions, voice=job.voice, sampling=job.sampling, noise=job.noise,
                    max_codes=job.max_codes)
        self._worker.submit("add", job.rid, spec)
        job.submitted = True

    def _on_hidden_states(self, chunk: HiddenStatesChunk) -> None:
        """The hidden-states sink (AsyncLLM's output task, on the event loop)."""
        job = self._jobs.get(chunk.request_id)
        if job is None:
            if self._previous_sink is not None:
                self._previous_sink(chunk)
            return
        if job.released:
            return
        if chunk.start != job.rows_seen:
            logger.error("request %s: hidden-state rows start at %d, expected %d", job.rid, chunk.start, job.rows_seen)
        job.rows_seen = chunk.start + len(chunk.rows)
        if chunk.prompt_positions is not None:
            job.positions = chunk.prompt_positions
        if job.submitted:
            self._worker.submit("rows", job.rid, chunk.rows)
        else:
            job.pending_rows.append(chunk.rows)

    async def _consume(self, job: _Job) -> AsyncIterator[SpeechChunk]:
        """Merge what is available into one chunk per wake-up; end after text and audio."""
        text_end = None
        audio_done = False
        talker_reason = None
        codes_total = 0
        while True:
            items = [await job.queue.get()]
            while not job.queue.empty():
                items.append(job.queue.get_nowait())
            text, ids, audio, codes = [], [], [], []
            aborted = False
            for item in items:
                kind = item[0]
                if kind == "text":
                    text.append(item[1])
                    ids += item[2]
                elif kind == "audio":
                    if item[1] is not None:
                        audio.append(item[1])
                    codes += item[2]
                    audio_done = audio_done or item[3]
                    talker_reason = item[4] or talker_reason
                elif kind == "text_end":
                    text_end = item[1:]
                elif kind == "error":
                    self._counters["failed"] += 1
                    raise item[1]
                elif kind == "aborted":
                    aborted = True
            codes_total += len(codes)
            chunk = SpeechChunk("".join(text), ids, np.concatenate(audio) if audio else None, audio_codes=codes)
            if aborted or (text_end is not None and audio_done):
                reason, prompt, completion = text_end if text_end is not None else ("abort", 0, 0)
                if talker_reason in ("length", "runaway") and reason == "stop":
                    reason = "length"  # the text is whole but its speech was cut (a cap on codes)
                chunk.finished, chunk.finish_reason = True, "abort" if aborted else reason
                chunk.prompt_tokens, chunk.completion_tokens, chunk.audio_tokens = prompt, completion, codes_total
                if not aborted:  # a full service time, for retry_after()
                    self._hold_seconds.append(time.monotonic() - job.t_admitted)
                self._release_now(job)  # before the last yield: a consumer may stop iterating there
                yield chunk
                return
            if chunk.text or chunk.token_ids or chunk.audio is not None or chunk.audio_codes:
                yield chunk

    def _post(self, results: dict[str, _Result], snapshot: dict, syncs: list) -> None:
        """Worker -> event loop, once per worker iteration."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._on_results, results, snapshot, syncs)
        except RuntimeError:  # loop closed meanwhile
            pass

    def _on_results(self, results: dict[str, _Result], snapshot: dict, syncs: list) -> None:
        self._snapshot = snapshot
        for fut in syncs:
            if not fut.done():
                fut.set_result(None)
        now = time.monotonic()
        for rid, res in results.items():
            job = self._jobs.get(rid)
            if job is None or job.released:
                continue
            if res.error is not None:
                job.queue.put_nowait(("error", res.error))
                continue
            audio = None
            if res.audio:
                audio = np.concatenate(res.audio) if len(res.audio) > 1 else res.audio[0]
                self._counters["audio_samples_total"] += len(audio)
                if job.t_first_audio is None:
                    job.t_first_audio = now
                    self._ttfa.append(now - job.t_arrival)
            if res.talker_reason == "runaway":
                self._counters["runaway_capped"] += 1
            if audio is not None or res.codes or res.done:
                job.queue.put_nowait(("audio", audio, res.codes, res.done, res.talker_reason))
        self._wake()

    def _release_now(self, job: _Job) -> None:
        """Free the request's slot, worker state and producer (all but the thinker abort)."""
        if job.released:
            return
        job.released = True
        if self._jobs.get(job.rid) is job:
            del self._jobs[job.rid]
        if job.admitted:
            self._speaking -= 1
        if job.submitted:
            self._worker.submit("cancel", job.rid)  # harmless if the worker already closed it
        job.pending_rows = []
        producer = job.producer
        if producer is not None and producer is not asyncio.current_task() and not producer.done():
            producer.cancel()
        self._wake()

    async def _release(self, job: _Job) -> None:
        """Free everything the request holds; abort its thinker request now if still running."""
        was_released = job.released
        self._release_now(job)
        if was_released or job.thinker_done or not job.admitted:
            return
        task = asyncio.get_running_loop().create_task(self.engine.abort(job.rid))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass  # we are being cancelled too; the abort itself goes on
