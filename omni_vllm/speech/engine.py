"""SpeechEngine: text and streamed speech per request, the speech path batched across requests.

One per server, beside vLLM's `AsyncLLM` (the thinker). A request that asks for audio opts in to
the thinker's hidden states (omni_vllm.hidden_states); its rows reach this engine's sink as the
thinker runs, and one dedicated background thread (the *worker*) keeps a running batch of all
speaking requests:

    event loop (API server)                          worker thread (omni_vllm.speech.worker)
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
                         <---- loop.call_soon_threadsafe(outputs) once per iteration

Requests join and leave between iterations. Text-only requests go straight to AsyncLLM.

Scheduling: omni_vllm.speech.scheduler (how long the talker runs per iteration, which windows
Token2Wav decodes together). Each request's state is a `SpeechJob` (omni_vllm.speech.job); its
outputs gather in its `RequestCollector` until its consumer asks, so a slow consumer gets
fewer, larger chunks.

Limits and waiting (omni_vllm.speech.admission): at most `max_speaking` requests speak at once
(the talker has that many KV-cache slots) and, while `max_queued_windows` or more decodable
windows wait for Token2Wav, the talker pauses and no new speaker is admitted. A new audio
request then waits for a slot, in arrival order (FIFO: nobody overtakes a waiter), for as long
as its caller waits, as vLLM's scheduler keeps text requests waiting: a caller that goes away
(closes the generator, cancels its task, `abort`) leaves the queue at once, before its thinker
request was ever started. Only two things refuse a request for load, with SpeechBusy (its `code`
says which, its `retry_after` when to come back): `max_waiting` requests waiting already (the
bound on what waiters hold), and the optional server-side wait limit `queue_timeout`. Text
requests are never held back.

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
import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from omni_vllm.checkpoint import engine_checkpoint
from omni_vllm.errors import (
    SpeechBusy,
    SpeechUnavailable,
    UnknownVoice,
)
from omni_vllm.hidden_states import (
    HiddenStatesChunk,
    HiddenStatesOutOfOrder,
    request_hidden_states,
    set_hidden_states_sink,
)
from omni_vllm.memory import DEFAULT_MAX_SPEAKING
from omni_vllm.speech.admission import Admission
from omni_vllm.speech.config import SpeechConfig
from omni_vllm.speech.job import SpeechJob
from omni_vllm.speech.loading import default_device, load_speech_path, log_speech_path
from omni_vllm.speech.outputs import SpeechChunk
from omni_vllm.speech.worker import (
    Cancel,
    SpeechWorker,
    Sync,
    ThinkerFinished,
    ThinkerRows,
    WorkerOutput,
    WorkerStats,
)
from omni_vllm.streaming import StreamingToken2Wav
from omni_vllm.talker import TalkerSampling
from omni_vllm.token2wav import SAMPLE_RATE
from omni_vllm.voices import DEFAULT_VOICE_ALIASES, check_aliases, resolve_voice

logger = logging.getLogger("omni_vllm.speech")

RUNAWAY_FLOOR_CODES = 100  # the runaway guard never cuts a reply's speech below 2 s


class _Aborted(Exception):
    """abort() reached a request still waiting for admission."""


class SpeechEngine:
    """Text and streamed speech for AsyncLLM requests (see the module docstring)."""

    def __init__(
        self,
        engine,
        model_dir: str | Path,
        *,
        config: SpeechConfig | None = None,
        text_only_reason: str | None = None,
        **kwargs,
    ):
        """`engine`: a vLLM AsyncLLM serving the checkpoint's thinker; `model_dir`: the
        checkpoint directory, from which the talker, Token2Wav and voices are loaded. `config`:
        the speech settings (omni_vllm.speech.SpeechConfig); keyword arguments override its fields.

        A speech path that fails to load raises SpeechLoadError naming the flag to change, or with
        `allow_text_only` leaves a text-only engine (logged); so does `text_only_reason` (the
        server's memory plan found no room) without loading anything. A checkpoint without speech
        modules, or an engine configuration in which the thinker cannot send its hidden states, is
        served text-only."""
        config = dataclasses.replace(config or SpeechConfig(), **kwargs)
        model_config = getattr(engine, "model_config", None)
        if config.max_speaking is None:
            config.max_speaking = DEFAULT_MAX_SPEAKING
        if (
            config.talker_max_len is None and model_config is not None
        ):  # a longer request never reaches the talker
            config.talker_max_len = model_config.max_model_len + config.max_codes
        self.config = config
        self.engine = engine
        self.model_dir = Path(model_dir)
        self.device = torch.device(config.device or default_device())
        self._owns_engine = False

        t0 = time.perf_counter()
        self.talker, self.token2wav, self.unavailable_reason = load_speech_path(
            self.model_dir,
            config,
            device=self.device,
            thinker_dtype=getattr(model_config, "dtype", torch.float32),
            vllm_config=getattr(engine, "vllm_config", None),
            text_only_reason=text_only_reason,
        )
        self.has_speech = self.talker is not None
        self.voices: list[str] = list(self.token2wav.voices) if self.has_speech else []

        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: SpeechWorker | None = None
        self._snapshot = WorkerStats()
        if self.has_speech:
            try:
                # The operator's own table must name real voices; the default one is
                # trimmed to the voices this checkpoint has.
                config.voice_aliases = check_aliases(
                    config.voice_aliases,
                    self.voices,
                    strict=config.voice_aliases != DEFAULT_VOICE_ALIASES,
                )
            except UnknownVoice as e:
                raise UnknownVoice(f"voice aliases: {e}") from None
            try:
                config.default_voice = self.resolve_voice(config.default_voice)
            except UnknownVoice as e:
                raise UnknownVoice(f"default voice: {e}") from None
            streamer = StreamingToken2Wav(
                self.token2wav,
                config.stream_config,
                enforce_eager=config.enforce_eager,
            )  # validates the config
            self._worker = SpeechWorker(
                self.talker,
                streamer,
                self._post,
                config,
                thinker_busy=lambda: engine.get_num_unfinished_requests() > 0,
            )
            self._snapshot = self._worker.stats()
            self._worker.start()
            log_speech_path(
                self.model_dir,
                self.device,
                config,
                self.talker,
                self.token2wav,
                time.perf_counter() - t0,
            )
        else:
            logger.warning(
                "speech engine: %s cannot speak (%s); serving text only",
                self.model_dir,
                self.unavailable_reason,
            )

        self._jobs: dict[str, SpeechJob] = {}
        self._admission = Admission(config, lambda: self._snapshot.queued_windows)
        self._counters = dict(
            audio_requests=0,
            text_requests=0,
            aborted=0,
            failed=0,
            audio_samples_total=0,
            runaway_capped=0,
        )
        self._ttfa: collections.deque[float] = collections.deque(maxlen=1024)
        self._aborts: set[asyncio.Task] = set()
        self._closed = False
        self._previous_sink = set_hidden_states_sink(self._on_hidden_states)

    # Settings read on every request (tests and operators may change them on a live engine).
    max_speaking = property(lambda self: self.config.max_speaking)
    max_queued_windows = property(lambda self: self.config.max_queued_windows)
    max_codes = property(lambda self: self.config.max_codes)
    default_voice = property(lambda self: self.config.default_voice)
    stream_config = property(lambda self: self.config.stream_config)

    @property
    def queue_timeout(self) -> float | None:
        return self.config.queue_timeout

    @queue_timeout.setter
    def queue_timeout(self, value: float | None) -> None:
        self.config.queue_timeout = value

    @property
    def max_waiting(self) -> int:
        return self.config.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int) -> None:
        self.config.max_waiting = value

    def resolve_voice(self, name: str | None) -> str:
        """The checkpoint's spelling of voice `name` (case-insensitive, or an alias of
        `config.voice_aliases`; None: the default voice); UnknownVoice otherwise."""
        return resolve_voice(
            name or self.config.default_voice, self.voices, self.config.voice_aliases
        )

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
            raise SpeechUnavailable(
                f"this checkpoint cannot speak: {self.unavailable_reason}"
            )
        voice = self.resolve_voice(voice)
        if request_id in self._jobs:
            raise ValueError(f"request id {request_id!r} is already speaking")
        self._bind_loop()
        job = SpeechJob(
            request_id, voice, talker_sampling, noise, max_codes or self.max_codes
        )
        self._jobs[request_id] = job
        try:
            try:
                await self._admission.admit(job, on_queued)
            except _Aborted:
                yield SpeechChunk(
                    "",
                    [],
                    None,
                    finished=True,
                    finish_reason="abort",
                    queue_seconds=time.monotonic() - job.t_arrival,
                )
                return
            self._counters["audio_requests"] += 1
            job.producer = asyncio.get_running_loop().create_task(
                self._produce(job, prompt, request_hidden_states(params)),
                name=f"omni-speech-{request_id}",
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
        ratio = self.config.max_codes_per_text_token
        if not ratio:
            return None
        return max(RUNAWAY_FLOOR_CODES, math.ceil(ratio * text_tokens))

    async def abort(self, request_id: str) -> None:
        """Stop a request now; its stream then ends with a chunk with finish_reason "abort"."""
        job = self._jobs.get(request_id)
        if job is None:
            await self.engine.abort(
                request_id
            )  # a text request (its stream ends with "abort")
            return
        self._counters["aborted"] += 1
        if self._admission.drop_waiter(job, _Aborted()):  # it leaves the queue now
            return
        await self._release(job)
        job.out.abort()

    def stats(self) -> dict:
        """Counters and gauges of the speech path (worker gauges as of its last iteration; await
        `sync()` first for an exact picture)."""
        ttfa = sorted(self._ttfa)
        c = self._counters  # with admission's refusals, in their old place
        counters = (
            dict(audio_requests=0, text_requests=0, refused=self._admission.refused) | c
        )
        return dict(
            active_speaking=self._admission.speaking,
            waiting=self._admission.waiting,
            thinker_unfinished=self.engine.get_num_unfinished_requests(),
            **dataclasses.asdict(self._snapshot),
            **counters,
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
        self._worker.submit(Sync(fut))
        await fut

    async def shutdown(self) -> None:
        """Abort every speaking or waiting request, stop the worker, unregister the sink (and stop
        the AsyncLLM if this engine started it)."""
        if self._closed:
            return
        self._closed = True
        for job in list(self._jobs.values()):
            if self._admission.drop_waiter(
                job, SpeechBusy("speech engine shut down", code=SpeechBusy.SHUTDOWN)
            ):
                continue
            await self._release(job)
            job.out.fail(RuntimeError("speech engine shut down"))
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        if self._worker is not None:
            self._worker.stop()
            await asyncio.to_thread(self._worker.join)
        if set_hidden_states_sink(self._previous_sink) != self._on_hidden_states:
            logger.warning(
                "speech engine: another hidden-states sink was registered after this one"
            )
        if self._owns_engine:
            self.engine.shutdown()
        logger.info("speech engine shut down")

    # ------------------------------------------------------------------------------ text

    async def _generate_text(
        self, prompt, params, request_id
    ) -> AsyncIterator[SpeechChunk]:
        completion = 0
        gen = self.engine.generate(prompt, params, request_id)
        try:
            async for out in gen:
                c = out.outputs[0]
                completion += len(c.token_ids)
                chunk = SpeechChunk(c.text, list(c.token_ids), None)
                if out.finished:
                    chunk.finished, chunk.finish_reason = True, c.finish_reason
                    chunk.prompt_tokens, chunk.completion_tokens = (
                        len(out.prompt_token_ids or ()),
                        completion,
                    )
                yield chunk
        finally:
            await gen.aclose()  # consumer gone: AsyncLLM aborts the request now

    # ---------------------------------------------------------------------------- admission

    def retry_after(self) -> float:
        """Seconds until a request refused now would likely be taken (at least 1); see
        omni_vllm.speech.admission.Admission.retry_after."""
        return self._admission.retry_after()

    # ---------------------------------------------------------------------------- one request

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "SpeechEngine is bound to another event loop (the AsyncLLM's)"
            )

    async def _produce(self, job: SpeechJob, prompt, params) -> None:
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
                    job.out.add_text(c.text, list(c.token_ids))
                if out.finished:
                    job.thinker_done = True
                    if job.submitted:
                        self._worker.submit(
                            ThinkerFinished(job.rid, self.runaway_cap(completion))
                        )
                    job.out.end_text(
                        c.finish_reason, len(out.prompt_token_ids), completion
                    )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            job.out.fail(e)

    def _submit(self, job: SpeechJob, prompt_ids) -> None:
        """Hand the request to the worker once its prompt ids are known (first output)."""
        self._worker.submit(job.add_request(prompt_ids))
        job.submitted = True

    def _on_hidden_states(self, chunk: HiddenStatesChunk) -> None:
        """The hidden-states sink (AsyncLLM's output task, on the event loop)."""
        job = self._jobs.get(chunk.request_id)
        if job is None:
            if self._previous_sink is not None:
                self._previous_sink(chunk)
            return
        if job.released or job.rows_failed:
            return
        try:
            rows = job.take_rows(chunk)
        except HiddenStatesOutOfOrder as e:
            # Its speech ends with this error (the consumer raises it, then releases the
            # request: talker slot, windows, thinker request); later rows are ignored.
            job.rows_failed = True
            job.out.fail(e)
            return
        if rows is not None:
            self._worker.submit(ThinkerRows(job.rid, rows))

    async def _consume(self, job: SpeechJob) -> AsyncIterator[SpeechChunk]:
        """One chunk per wake-up with whatever arrived; the last after text and audio."""
        out, codes_total = job.out, 0
        while True:
            try:
                chunk = await out.get()
            except Exception:
                self._counters["failed"] += 1
                raise
            codes_total += len(chunk.audio_codes)
            if out.aborted or (out.text_end is not None and out.audio_done):
                job.finish(chunk, codes_total)
                if not out.aborted:  # a full service time, for retry_after()
                    self._admission.record_hold(job)
                self._release_now(
                    job
                )  # before the last yield: a consumer may stop iterating there
                yield chunk
                return
            if (
                chunk.text
                or chunk.token_ids
                or chunk.audio is not None
                or chunk.audio_codes
            ):
                yield chunk

    def _post(
        self, results: dict[str, WorkerOutput], snapshot: WorkerStats, syncs: list
    ) -> None:
        """Worker -> event loop, once per worker iteration."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._on_results, results, snapshot, syncs)

    def _on_results(
        self, results: dict[str, WorkerOutput], snapshot: WorkerStats, syncs: list
    ) -> None:
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
                job.out.fail(res.error)
                continue
            if (audio := job.add_output(res)) is not None:
                self._counters["audio_samples_total"] += len(audio)
                if job.t_first_audio is None:
                    job.t_first_audio = now
                    self._ttfa.append(now - job.t_arrival)
            if res.talker_reason == "runaway":
                self._counters["runaway_capped"] += 1
        self._admission.wake()

    def _release_now(self, job: SpeechJob) -> None:
        """Free the request's slot, worker state and producer (all but the thinker abort)."""
        if job.released:
            return
        job.released = True
        if self._jobs.get(job.rid) is job:
            del self._jobs[job.rid]
        self._admission.leave(job)
        if job.submitted:
            self._worker.submit(
                Cancel(job.rid)
            )  # harmless if the worker already closed it
        job.pending_rows = []
        producer = job.producer
        if (
            producer is not None
            and producer is not asyncio.current_task()
            and not producer.done()
        ):
            producer.cancel()
        self._admission.wake()

    async def _release(self, job: SpeechJob) -> None:
        """Free everything the request holds; abort its thinker request now if still running."""
        was_released = job.released
        self._release_now(job)
        if was_released or job.thinker_done or not job.admitted:
            return
        task = asyncio.get_running_loop().create_task(self.engine.abort(job.rid))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        # We may be cancelled too; the abort itself goes on.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
