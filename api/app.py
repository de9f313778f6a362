"""Our routes on vLLM's OpenAI app: chat completions that speak, and /v1/audio/speech.

`OmniEndpoints` has the shape of a vLLM endpoint plugin (`attach_router` + `init_state`, see
`vllm.plugins.endpoint_plugins.interface`): `api.server` builds vLLM's own app, lets this replace
`POST /v1/chat/completions` and add `POST /v1/audio/speech`, and serves it. Everything else
(`/v1/models`, `/health`, `/metrics`, `/tokenize`, completions, ...) is vLLM's, unchanged.

Chat completions without `"audio"` in `modalities` are handed to vLLM's own handler untouched
(tools, logprobs, n, beam search, structured output, ... all work as in `vllm serve`). With audio,
the request is parsed and rendered by vLLM (ChatCompletionRequest, its chat template and media
loading, `mm_processor_kwargs`), sampled with vLLM's own SamplingParams, and run through the
SpeechEngine, which streams text and audio together. Details and limits: api/README.md.
"""

import asyncio
import base64
import inspect
import json
import math
import os
import time
import typing
from argparse import Namespace
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute, APIWebSocketRoute
from openai.types.chat.chat_completion_audio import ChatCompletionAudio
from pydantic import Field
from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.entrypoints.openai.chat_completion import api_router as vllm_chat_router
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.serve.engine.protocol import (
    CompletionTokenUsageInfo,
    ErrorResponse,
    OpenAIBaseModel,
    PromptTokenUsageInfo,
    UsageInfo,
)
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import (
    get_max_tokens,
    load_aware_call,
    should_include_usage,
    validate_json_request,
    with_cancellation,
)
from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive
from vllm.logger import init_logger

from api import audio as A
from api.audio_ids import ENV_KEY, AudioIdError, AudioIds
from api import limits as L
from api.realtime.router import router as realtime_router
from omni_vllm.checkpoint import engine_checkpoint
from omni_vllm.memory import DEFAULT_MAX_SPEAKING
from omni_vllm.speech import (
    SpeechBusy,
    SpeechEngine,
    SpeechLoadError,
    SpeechUnavailable,
    TalkerSampling,
    UnknownVoice,
)
from omni_vllm.streaming import StreamConfig
from omni_vllm.talker import kv_tokens_for

logger = init_logger("omni_vllm.api")

# Qwen2.5-Omni's model card: the talker was trained behind this system prompt; without it the
# speech of the real checkpoints degrades. Used when audio is asked for and no system message given.
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
# /v1/audio/speech: Qwen2.5-Omni has no TTS mode, so the model is asked to say the input verbatim.
TTS_USER_PROMPT = "Repeat the following text exactly as it is written, and say nothing else:\n\n{text}"
MAX_SPEECH_INPUT_CHARS = 4096


@dataclass
class Settings:
    """Our server settings (flags of `python -m api.serve`, see api.server)."""

    default_voice: str = "Chelsie"
    max_audio_tokens: int = 4096  # talker codes per request (50 per second of speech)
    audio_id_ttl: float = 3600.0  # seconds an `audio.id` can be sent back
    max_media_mb: float = 25.0
    max_audio_input_seconds: float = 600.0
    max_video_input_seconds: float = 600.0
    max_image_pixels: int = 36_000_000  # an 8K UHD frame is 33.2 M
    max_request_mb: float = 100.0
    speech_device: str | None = None
    max_speaking: int | None = None  # None: what the speech memory budget holds (api.server.plan_speech)
    speech_stream_config: dict | None = None  # omni_vllm.streaming.StreamConfig fields
    max_waiting: int = 1024  # audio requests waiting for a speaking slot; more: 503
    max_wait_seconds: float | None = None  # server-side wait limit for a speaking slot (None: none)
    audio_id_key: str | None = None  # signs audio ids; replicas share it (else OMNI_VLLM_AUDIO_ID_KEY, else random)
    max_audio_tokens_per_text_token: float = 40.0  # the runaway guard (0: off)
    speech_dtype: str = "auto"  # omni_vllm.memory.speech_dtypes
    speech_gpu_memory_gb: float | None = None
    allow_text_only: bool = False
    talker_max_len: int | None = None  # None: the talker config's, at most max_model_len + max_audio_tokens
    realtime_max_sessions: int = 32  # /v1/realtime sessions at once; more: closed with 1013
    realtime_max_session_seconds: float = 1800.0  # then closed with 1008
    realtime_max_input_audio_seconds: float = 120.0  # uncommitted input audio per session
    realtime_idle_seconds: float = 300.0  # no client event and no reply running: closed with 1008

    @classmethod
    def from_args(cls, args: Namespace) -> "Settings":
        """Our flags where the command line has them (`python -m api.serve`), else the environment
        variable OMNI_VLLM_<FLAG> (e.g. OMNI_VLLM_MAX_AUDIO_TOKENS: `vllm serve` has no such flags),
        else the default."""
        values = {}
        for name, typ in typing.get_type_hints(cls).items():
            if hasattr(args, name):
                values[name] = getattr(args, name)
            elif (raw := os.environ.get(f"OMNI_VLLM_{name.upper()}")) is not None:
                values[name] = _parse_setting(name, raw, typ)
        return cls(**values)


def check_scale_out(args: Namespace) -> None:
    """Refuse, at start-up and saying why, the scale-out flags of vLLM's that speech does not support
    (with --allow-text-only: serve text only, saying why, instead).

    Supported: --tensor-parallel-size (every rank runs the same hooks, rank 0 sends the rows) with the
    mp and uni executors (tested). Refused: pipeline and data parallelism, several API server
    processes, and the Ray executor (never run with speech: no Ray on our machines)."""
    problems = []
    if (getattr(args, "pipeline_parallel_size", None) or 1) > 1:
        problems.append("--pipeline-parallel-size > 1: the talker needs each step's input embeddings (first "
                        "stage) and last hidden states (last stage) in one process; use --tensor-parallel-size")
    if (getattr(args, "api_server_count", None) or 1) > 1:
        problems.append("--api-server-count > 1: each API server process would load its own talker and "
                        "Token2Wav and the requests would be spread over them blindly; run one API server per "
                        "engine and scale out with replicas behind a load balancer (README: Replicas)")
    if (getattr(args, "data_parallel_size", None) or 1) > 1:
        problems.append("--data-parallel-size > 1 is not supported with speech (not tested: the speech "
                        "engine is one per API server); run one replica per GPU (or --tensor-parallel-size "
                        "per replica) behind a load balancer instead (README: Replicas)")
    if getattr(args, "distributed_executor_backend", None) == "ray":
        problems.append("--distributed-executor-backend ray has never run with speech here; use mp (vLLM's "
                        "default on one node: a 7B fits one GPU) and replicas for more than one node")
    if not problems:
        return
    reason = "omni-vllm: " + "; ".join(problems)
    if Settings.from_args(args).allow_text_only:
        args.speech_disabled = getattr(args, "speech_disabled", None) or reason  # SpeechEngine serves text only
        return
    raise ValueError(reason + " (or serve text only with --allow-text-only)")


def _parse_setting(name: str, raw: str, typ) -> Any:
    base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # X | None -> X
    try:
        if base is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if base is dict:
            return json.loads(raw)
        return base(raw)
    except ValueError as e:
        raise ValueError(f"OMNI_VLLM_{name.upper()}={raw!r}: {e}") from None


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLargeError",
                422: "UnprocessableEntityError", 503: "ServiceUnavailableError"}  # as vLLM names them


class APIError(Exception):
    """An OpenAI-shaped error answer (vLLM's ErrorResponse) with its HTTP status and `param`; for a
    refusal for load also a `code` saying why (OpenAI's error codes are strings; vLLM puts the status
    there otherwise) and a `Retry-After` header (`retry_after` seconds, rounded up)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, err_type: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after = status, param, code, retry_after
        self.err_type = err_type or _ERROR_TYPES.get(status, "Error")

    @classmethod
    def busy(cls, e: SpeechBusy) -> "APIError":
        """503 for a request the speech engine refused for load."""
        hint = "" if e.retry_after is None else f"; retry after {math.ceil(e.retry_after)} s"
        return cls(f"{e}{hint}", status=503, code=e.code, retry_after=e.retry_after)

    def body(self) -> dict:
        err = create_error_response(str(self), err_type=self.err_type, status_code=HTTPStatus(self.status),
                                    param=self.param).model_dump()
        if self.code is not None:
            err["error"]["code"] = self.code
        return err

    def response(self) -> JSONResponse:
        headers = None if self.retry_after is None else {"Retry-After": str(math.ceil(self.retry_after))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        """The error as the event of a stream already started (vLLM's way), then the stream's end."""
        return f"data: {json.dumps(self.body())}\n\ndata: [DONE]\n\n"


def _error_json(err: ErrorResponse) -> JSONResponse:
    return JSONResponse(err.model_dump(), status_code=err.error.code)


class Metrics:
    """Ours, beside vLLM's on /metrics (same Prometheus registry): requests speaking now, seconds of
    audio produced, time to first audio; and the SpeechEngine's queue gauges (`omni_vllm:speech_*`)."""

    def __init__(self, model_name: str):
        from prometheus_client import Counter, Gauge, Histogram

        self.model_name = model_name
        labels = dict(model_name=model_name)
        self.speaking = Gauge("omni_vllm:speaking_requests", "Requests producing audio right now.",
                              ["model_name"], multiprocess_mode="livesum").labels(**labels)
        self.audio_seconds = Counter("omni_vllm:audio_seconds", "Seconds of audio produced.",
                                     ["model_name"]).labels(**labels)
        self.ttfa = Histogram("omni_vllm:time_to_first_audio_seconds",
                              "From request arrival to its first audio chunk.", ["model_name"],
                              buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 40, 80)).labels(**labels)
        self.queue_time = Histogram("omni_vllm:speech_queue_time_seconds",
                                    "Time audio requests waited for a speaking slot.", ["model_name"],
                                    buckets=(0.01, 0.1, 0.3, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 240, 480, 960,
                                             1920)).labels(**labels)

    def attach(self, speech) -> None:
        """Export `speech.stats()` gauges (waiting requests, talker slots, queued Token2Wav windows)."""
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        model_name = self.model_name

        class _Collector:
            def collect(self):
                stats = speech.stats()
                for key, doc in (("waiting", "Audio requests waiting for a speaking slot."),
                                 ("talker_slots_used", "Talker KV-cache slots in use."),
                                 ("queued_windows", "Token2Wav windows ready and waiting to be decoded.")):
                    g = GaugeMetricFamily(f"omni_vllm:speech_{key}", doc, labels=["model_name"])
                    g.add_metric([model_name], float(stats.get(key) or 0))
                    yield g
                c = CounterMetricFamily("omni_vllm:speech_runaway", "Replies whose speech the runaway guard cut "
                                        "(--max-audio-tokens-per-text-token).", labels=["model_name"])
                c.add_metric([model_name], float(stats.get("runaway_capped") or 0))
                yield c

        REGISTRY.register(_Collector())


def _voice_name(voice: Any) -> str | None:
    return voice.get("id") if isinstance(voice, dict) else voice


class SpeechRequest(OpenAIBaseModel):
    """`POST /v1/audio/speech` (openai.types.audio.SpeechCreateParams)."""

    input: str
    model: str | None = None
    voice: str | dict | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    # extensions (not in OpenAI's API), as in chat completions
    seed: int | None = Field(default=None, description="Seeds the talker's sampling and the vocoder noise.")
    max_audio_tokens: int | None = Field(default=None, description="Cap on speech codes (50 per second).")


class OmniEndpoints:
    """Endpoint-plugin-shaped: `attach_router(app)` then `await init_state(engine, app.state, args)`."""

    name = "omni_vllm"
    required_tasks = ("generate",)

    def __init__(self):
        self.router = APIRouter()
        self.router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"],
                                  dependencies=[Depends(validate_json_request)])
        self.router.add_api_route("/v1/audio/speech", self.audio_speech, methods=["POST"],
                                  dependencies=[Depends(validate_json_request)])
        self.router.include_router(realtime_router)
        self.speech = None
        self.speech_error: str | None = None

    # ---------------------------------------------------------------- wiring

    def attach_router(self, app: FastAPI) -> None:
        """Add our routes; they replace vLLM's for the same path and method (WebSocket routes, which
        have no methods: for the same path, e.g. vLLM's transcription-only /v1/realtime)."""
        ours = {(r.path, m) for r in self.router.routes for m in getattr(r, "methods", None) or ()}
        our_sockets = {r.path for r in self.router.routes if isinstance(r, APIWebSocketRoute)}
        for route in list(app.router.routes):
            if (isinstance(route, APIRoute) and any((route.path, m) in ours for m in route.methods)) or (
                    isinstance(route, APIWebSocketRoute) and route.path in our_sockets):
                app.router.routes.remove(route)
        app.include_router(self.router)
        app.openapi_schema = None
        built, app.middleware_stack = app.middleware_stack is not None, None  # built already by vLLM's
        # SageMaker bootstrap: rebuilt below, with ours in it (Starlette adds none to a built stack)
        settings = Settings.from_args(getattr(app.state, "args", Namespace()))
        app.add_middleware(L.BodySizeLimit, max_bytes=int(settings.max_request_mb * 2**20))
        # A body FastAPI cannot parse (e.g. invalid UTF-8) raises Starlette's HTTPException; vLLM's handler is
        # registered for FastAPI's subclass only, so that 400 came back as {"detail": ...}: make it OpenAI-shaped.
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler
        app.add_exception_handler(StarletteHTTPException, http_exception_handler)
        if built:
            app.middleware_stack = app.build_middleware_stack()

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        check_scale_out(args)  # again here: `vllm serve` with our endpoint plugin comes this way only
        self.state, self.settings = state, Settings.from_args(args)
        self.audio_ids = AudioIds(self.settings.audio_id_ttl, self.settings.audio_id_key or os.environ.get(ENV_KEY))
        self.metrics = Metrics(state.openai_serving_models.base_model_paths[0].name)
        voice = self.settings.default_voice.capitalize()  # the checkpoint's names: Chelsie, Ethan
        s, model_config = self.settings, engine_client.model_config
        max_len = min(s.talker_max_len or model_config.max_model_len + s.max_audio_tokens,
                      model_config.max_model_len + s.max_audio_tokens)  # longer is never reached
        max_speaking = s.max_speaking or DEFAULT_MAX_SPEAKING  # set by api.server.plan_speech when served
        try:
            self.speech = SpeechEngine(
                engine_client, engine_checkpoint(engine_client.vllm_config), device=s.speech_device,
                max_speaking=max_speaking, default_voice=voice, max_codes=s.max_audio_tokens,
                max_waiting=s.max_waiting, queue_timeout=s.max_wait_seconds,
                max_codes_per_text_token=s.max_audio_tokens_per_text_token or None,
                stream_config=StreamConfig(**s.speech_stream_config or {}), speech_dtype=s.speech_dtype,
                talker_max_len=max_len, kv_cache_tokens=kv_tokens_for(max_speaking, max_len),
                allow_text_only=s.allow_text_only, text_only_reason=getattr(args, "speech_disabled", None))
        except UnknownVoice as e:
            raise ValueError(f"--default-voice: {e}") from None
        except SpeechLoadError as e:  # a start-up error that says what to change, not a traceback
            logger.error("the speech path did not load: %s", e)
            raise SystemExit(f"omni-vllm: the speech path did not load: {e}") from None
        self.settings.default_voice = voice
        state.omni_realtime = self._realtime(state, model_config)
        if self.speech.has_speech:
            self.metrics.attach(self.speech)
        else:
            self.speech_error = self.speech.unavailable_reason or "no talker / token2wav weights"
            logger.warning("no speech output (%s); text requests are served as usual", self.speech_error)

    def _realtime(self, state, model_config):
        from api.realtime._core import EndpointsCore, error_body
        from api.realtime.serving import RealtimeLimits, RealtimeServing

        s, tokenizer = self.settings, self.chat.renderer.tokenizer
        limits = RealtimeLimits(s.realtime_max_sessions, s.realtime_max_session_seconds,
                                s.realtime_max_input_audio_seconds, s.realtime_idle_seconds)
        return RealtimeServing(
            getattr(state, "omni_serving", None) or EndpointsCore(self), error_body, limits,
            model_name=state.openai_serving_models.base_model_paths[0].name, instructions=SPEECH_SYSTEM_PROMPT,
            default_voice=s.default_voice, max_model_len=model_config.max_model_len,
            talker_max_len=self.speech.talker_max_len if self.speech.has_speech else None,
            count_text=lambda text: len(tokenizer.encode(text, add_special_tokens=False)) if text else 0)

    async def shutdown(self) -> None:
        if self.speech is not None:
            await self.speech.shutdown()

    # ---------------------------------------------------------------- helpers

    @property
    def chat(self):
        return self.state.openai_serving_chat

    def _voice(self, voice: Any, param: str) -> str:
        name = _voice_name(voice) or self.settings.default_voice
        for v in self.speech.voices:
            if v.lower() == str(name).lower():
                return v
        raise APIError(f"unknown voice {name!r}; this model has {', '.join(self.speech.voices)}", param=param)

    def _need_speech(self) -> None:
        if self.speech is None or self.speech_error:
            raise APIError(f"this model cannot produce audio ({self.speech_error}); ask for "
                           "modalities [\"text\"] only", param="modalities")

    def _resolve_audio_ids(self, request: ChatCompletionRequest) -> None:
        """Assistant turns sent back as `audio: {id}` become their transcript (kept audio_id_ttl s)."""
        for i, msg in enumerate(request.messages):
            if not (isinstance(msg, dict) and msg.get("role") == "assistant" and msg.get("audio")):
                continue
            try:
                transcript = self.audio_ids.transcript(_voice_name(msg["audio"]))  # {"id": ...}
            except AudioIdError as e:
                raise APIError(f"audio id is unknown or expired: {e}; send the assistant turn as text instead",
                               param=f"messages[{i}].audio.id") from None
            msg.pop("audio")
            if not msg.get("content"):
                msg["content"] = transcript

    def _check_media(self, request: ChatCompletionRequest) -> None:
        s = self.settings
        try:
            L.check_message_media(request.messages, L.MediaLimits(
                max_bytes=int(s.max_media_mb * 2**20), max_audio_seconds=s.max_audio_input_seconds,
                max_video_seconds=s.max_video_input_seconds, max_image_pixels=s.max_image_pixels))
        except L.MediaError as e:
            raise APIError(str(e), e.status, e.param) from None

    def _max_codes(self, value: Any, param: str) -> int:
        if value is None:
            return self.settings.max_audio_tokens
        if not isinstance(value, int) or value < 1:
            raise APIError("max_audio_tokens must be a positive integer", param=param)
        return min(value, self.settings.max_audio_tokens)

    async def _start(self, request: ChatCompletionRequest, raw_request: Request, voice: str, max_codes: int,
                     respond_while_queued: bool = False):
        """Render with vLLM, start the SpeechEngine; returns (request_id, mm token counts, stream,
        first: a task giving the first chunk). Returns once the first chunk is there, or, with
        `respond_while_queued`, as soon as the request waits for a speaking slot (so that a stream's
        first event leaves while it waits). Errors until then are raised here as HTTP errors (a full
        wait queue: 503 with Retry-After); a client gone meanwhile leaves the queue."""
        if not any(isinstance(m, dict) and m.get("role") == "system" for m in request.messages):
            request.messages.insert(0, {"role": "system", "content": SPEECH_SYSTEM_PROMPT})
        rendered = await self.chat.render_chat_request(request)  # model check (404), template, media
        if isinstance(rendered, ErrorResponse):
            raise _Rendered(rendered)
        _, (engine_input,) = rendered
        prompt_len = self.chat._extract_prompt_len(engine_input)
        if prompt_len + 2 > (limit := self.speech.talker_max_len):  # before the thinker runs
            raise APIError(f"the prompt has {prompt_len} tokens; speech can follow prompts of at most {limit - 2} "
                           f"tokens (the talker's --talker-max-len {limit}); ask for modalities [\"text\"] or "
                           "shorten the conversation", param="messages", err_type="BadRequestError")
        max_tokens = get_max_tokens(
            self.chat.model_config.max_model_len,
            request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
            prompt_len, self.chat.default_sampling_params,
            self.chat.override_max_tokens, truncate_prompt_tokens=request.truncate_prompt_tokens)
        params = request.to_sampling_params(max_tokens, self.chat.default_sampling_params)
        request_id = f"chatcmpl-{self.chat._base_request_id(raw_request, request.request_id)}"
        kwargs = {}
        if request.seed is not None:
            kwargs = dict(talker_sampling=TalkerSampling(seed=request.seed), noise=request.seed)
        queued = asyncio.get_running_loop().create_future()
        if respond_while_queued:
            kwargs["on_queued"] = lambda: queued.done() or queued.set_result(None)
        stream = self.speech.generate(engine_input, params, request_id, audio=True, voice=voice,
                                      max_codes=max_codes, **kwargs)
        first = asyncio.ensure_future(anext(stream))
        try:
            await asyncio.wait([first, queued], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: out of the queue (or the engine) now
            first.cancel()
            raise
        if first.done():
            try:
                first.result()
            except UnknownVoice as e:
                raise APIError(str(e), param="audio.voice") from None
            except SpeechUnavailable as e:
                raise APIError(f"this model cannot produce audio: {e}", param="modalities") from None
            except SpeechBusy as e:
                raise APIError.busy(e) from None
        return request_id, _mm_token_counts(engine_input), stream, first

    def _usage(self, final, mm_counts: dict[str, int]) -> UsageInfo:
        text_tokens = final.completion_tokens
        return UsageInfo(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=text_tokens + final.audio_tokens,
            total_tokens=final.prompt_tokens + text_tokens + final.audio_tokens,
            prompt_tokens_details=PromptTokenUsageInfo(
                audio_tokens=mm_counts.get("audio", 0), image_tokens=mm_counts.get("image", 0),
                multimodal_tokens=mm_counts or None),
            completion_tokens_details=CompletionTokenUsageInfo(
                reasoning_tokens=0, audio_tokens=final.audio_tokens, text_tokens=text_tokens),
        )

    async def _run(self, stream, first, request_id: str, t0: float):
        """Every chunk of a started request, with metrics; aborts it if the consumer goes away
        (while it waits for a slot, cancelling `first` takes it out of the queue)."""
        done, got_audio, speaking = False, False, False
        try:
            chunk = await first
            self.metrics.queue_time.observe(chunk.queue_seconds)
            self.metrics.speaking.inc()
            speaking = True
            while True:
                if chunk.audio is not None and len(chunk.audio):
                    if not got_audio:
                        got_audio = True
                        self.metrics.ttfa.observe(time.monotonic() - t0)
                    self.metrics.audio_seconds.inc(len(chunk.audio) / A.SAMPLE_RATE)
                done = chunk.finished
                yield chunk
                if done:
                    return
                chunk = await anext(stream)
        finally:
            if speaking:
                self.metrics.speaking.dec()
            if speaking and not done:  # client disconnected / cancelled: free the engine and speech slots
                logger.info("aborting %s (client went away)", request_id)
                await asyncio.shield(self.speech.abort(request_id))
            await stream.aclose()

    # ---------------------------------------------------------------- /v1/chat/completions

    @with_cancellation
    @load_aware_call
    async def chat_completions(self, request: ChatCompletionRequest, raw_request: Request):
        t0 = time.monotonic()
        try:
            extra = request.model_extra or {}
            modalities = extra.get("modalities") or ["text"]
            if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"}:
                raise APIError(f"modalities must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}",
                               param="modalities")
            if not request.messages:  # OpenAI (and vLLM's text path) answer 400 too
                raise APIError("messages must hold at least one message", param="messages")
            self._resolve_audio_ids(request)
            self._check_media(request)
            if "audio" not in modalities:
                return await inspect.unwrap(vllm_chat_router.create_chat_completion)(request, raw_request)
            self._need_speech()
            opts = extra.get("audio") or {}
            if not isinstance(opts, dict):
                raise APIError("audio must be an object {voice, format}", param="audio")
            voice = self._voice(opts.get("voice"), "audio.voice")
            fmt = A.check_format(opts.get("format") or ("pcm16" if request.stream else "wav"),
                                 A.CHAT_FORMATS, "audio.format")
            if request.stream and fmt != "pcm16":
                raise APIError("streamed audio is sent as pcm16 (24 kHz, 16-bit, mono): set audio.format "
                               "to \"pcm16\", or do not stream", param="audio.format")
            if (request.n or 1) != 1 or request.use_beam_search:
                raise APIError("audio output supports n=1 without beam search", param="n")
            max_codes = self._max_codes(extra.get("max_audio_tokens"), "max_audio_tokens")
            request_id, mm_counts, stream, first = await self._start(request, raw_request, voice, max_codes,
                                                                     respond_while_queued=bool(request.stream))
        except (APIError, L.MediaError, _Rendered) as e:
            return _refusal(e)
        chunks = self._run(stream, first, request_id, t0)
        model = self.chat.models.model_name(None) if request.model is None else request.model
        if request.stream:
            gen = self._chat_stream(request, chunks, request_id, model, mm_counts)
            interval = float(getattr(self.state.args, "sse_keep_alive_interval", 0) or 0)
            return StreamingResponse(with_sse_keep_alive(gen, interval), media_type="text/event-stream")
        return await self._chat_full(request, chunks, request_id, model, fmt, mm_counts)

    async def _chat_full(self, request, chunks, request_id, model, fmt, mm_counts) -> JSONResponse:
        text, token_ids, waves, final = [], [], [], None
        async for c in chunks:
            text.append(c.text)
            token_ids += c.token_ids
            if c.audio is not None:
                waves.append(c.audio)
            final = c
        transcript = "".join(text)
        wave = np.concatenate(waves) if waves else np.zeros(0, np.float32)
        audio_id, expires_at = self.audio_ids.issue(transcript)
        data = await asyncio.to_thread(A.encode, wave, fmt)
        message = ChatMessage(role="assistant", content=None, audio=ChatCompletionAudio(
            id=audio_id, data=base64.b64encode(data).decode(), expires_at=expires_at, transcript=transcript))
        choice = ChatCompletionResponseChoice(index=0, message=message, finish_reason=final.finish_reason,
                                              token_ids=token_ids if request.return_token_ids else None)
        resp = ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=self._usage(final, mm_counts))
        return JSONResponse(resp.model_dump())

    async def _chat_stream(self, request, chunks, request_id, model, mm_counts):
        created = int(time.time())
        include_usage, _ = should_include_usage(request.stream_options, self.chat.enable_force_include_usage)

        def event(delta: DeltaMessage | None, finish_reason=None, usage=None) -> str:
            choices = [] if delta is None else [ChatCompletionResponseStreamChoice(
                index=0, delta=delta, finish_reason=finish_reason)]
            chunk = ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices)
            if usage is not None:
                chunk.usage = usage
            return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

        transcript, final = [], None
        # At once, also while the request waits for a speaking slot: the client (and any proxy) sees
        # the response start; the wait is then ended by the client (or --max-wait-seconds).
        yield event(DeltaMessage(role="assistant", content=None, audio={"transcript": ""}))
        try:
            async for c in chunks:
                part: dict[str, Any] = {}
                if c.text:
                    transcript.append(c.text)
                    part["transcript"] = c.text
                if c.audio is not None and len(c.audio):
                    part["data"] = base64.b64encode(A.pcm16(c.audio)).decode()
                if part:
                    yield event(DeltaMessage(audio=part))
                final = c
        except SpeechBusy as e:  # refused after the response started (the wait limit): an error event
            yield APIError.busy(e).sse()
            return
        audio_id, expires_at = self.audio_ids.issue("".join(transcript))  # it carries the transcript
        yield event(DeltaMessage(audio={"id": audio_id, "expires_at": expires_at}), finish_reason=final.finish_reason)
        if include_usage:
            yield event(None, usage=self._usage(final, mm_counts))
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- /v1/audio/speech

    @with_cancellation
    async def audio_speech(self, request: SpeechRequest, raw_request: Request):
        t0 = time.monotonic()
        try:
            if (err := await self.chat._check_model(request)) is not None:
                return _error_json(err)
            self._need_speech()
            voice = self._voice(request.voice, "voice")
            fmt = A.check_format(request.response_format, A.SPEECH_FORMATS, "response_format")
            if not 0.25 <= request.speed <= 4.0:
                raise APIError("speed must be between 0.25 and 4.0", param="speed")
            if not request.input.strip():
                raise APIError("input is empty", param="input")
            if len(request.input) > MAX_SPEECH_INPUT_CHARS:
                raise APIError(f"input is longer than {MAX_SPEECH_INPUT_CHARS} characters", param="input")
            if request.instructions:
                logger.debug("speech instructions ignored (Qwen2.5-Omni has no style control): %r",
                             request.instructions)
            n_in = len(self.chat.renderer.tokenizer.encode(request.input))
            chat = ChatCompletionRequest(
                model=request.model, temperature=0.0, seed=request.seed, max_completion_tokens=2 * n_in + 16,
                messages=[{"role": "system", "content": SPEECH_SYSTEM_PROMPT},
                          {"role": "user", "content": TTS_USER_PROMPT.format(text=request.input)}])
            max_codes = self._max_codes(request.max_audio_tokens, "max_audio_tokens")
            request_id, _, stream, first = await self._start(chat, raw_request, voice, max_codes)
        except (APIError, L.MediaError, _Rendered) as e:
            return _refusal(e)
        chunks = self._run(stream, first, request_id, t0)
        final: dict[str, Any] = {}
        body = self._speech_bytes(chunks, fmt, request.speed, final)
        if request.stream_format == "sse":
            return StreamingResponse(self._speech_sse(body, final), media_type="text/event-stream")
        return StreamingResponse(body, media_type=A.content_type(fmt))

    async def _speech_bytes(self, chunks, fmt: str, speed: float, final: dict):
        enc, resample = A.StreamEncoder(fmt), A.Resampler(speed)
        async for c in chunks:
            if c.audio is not None and len(c.audio):
                if data := enc.push(resample(c.audio)):
                    yield data
            if c.finished:
                final["chunk"] = c
        if data := enc.push(resample(np.zeros(0, np.float32), final=True)) + await asyncio.to_thread(enc.finish):
            yield data

    async def _speech_sse(self, body, final: dict):
        async for data in body:
            for piece in A.chunks_of(data, 48_000):
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}
                yield f"data: {json.dumps(event)}\n\n"
        last = final["chunk"]
        usage = dict(input_tokens=last.prompt_tokens, output_tokens=last.audio_tokens,
                     total_tokens=last.prompt_tokens + last.audio_tokens)
        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"


def _refusal(e: Exception) -> JSONResponse:
    """The OpenAI-shaped answer to a request refused before it ran."""
    if isinstance(e, _Rendered):
        return _error_json(e.err)
    if isinstance(e, L.MediaError):
        return APIError(str(e), e.status, e.param).response()
    return e.response()


class _Rendered(Exception):
    """vLLM's renderer answered with an ErrorResponse (bad model name, bad media, template error)."""

    def __init__(self, err: ErrorResponse):
        super().__init__(err.error.message)
        self.err = err


def _mm_token_counts(engine_input) -> dict[str, int]:
    """Prompt tokens of each modality. Unlike vLLM's `_get_mm_token_counts` (placeholder spans), this
    counts the tokens that take the modality's embeddings (`PlaceholderRange.is_embed`): with
    `use_audio_in_video` the video and its audio share one interleaved span, and each counts only its
    own tokens in it."""
    return {modality: sum(p.get_num_embeds() for p in ranges)
            for modality, ranges in (engine_input.get("mm_placeholders") or {}).items() if ranges}

