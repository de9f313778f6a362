"""What chat completions, /v1/audio/speech and the Realtime API share: `OmniServing`.

One object per server, kept on `app.state.omni_serving` as vLLM keeps its serving objects on
`app.state`. It validates what every front validates alike (voice, media limits, speech caps),
starts a request (rendered by vLLM, sampled with vLLM's SamplingParams, run through the
SpeechEngine, which streams text and, when asked, audio), streams its chunks with our metrics,
and counts its usage. Errors are raised in omni_vllm.api.errors' vocabulary; each front maps them at its
edge (a response, an SSE error event, a Realtime `error` event).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.engine.protocol import (
    CompletionTokenUsageInfo,
    ErrorResponse,
    PromptTokenUsageInfo,
    UsageInfo,
)
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMClientError
from vllm.logger import init_logger

from omni_vllm.api import compat
from omni_vllm.api import limits as L
from omni_vllm.api.audio import SAMPLE_RATE
from omni_vllm.api.audio_ids import AudioIdError, AudioIds
from omni_vllm.api.errors import ServingError, VLLMValidationError, api_error
from omni_vllm.api.metrics import Metrics
from omni_vllm.api.settings import Settings
from omni_vllm.errors import SpeechBusy, SpeechUnavailable, UnknownVoice
from omni_vllm.speech import SpeechChunk, SpeechEngine, TalkerSampling
from omni_vllm.voices import aliases_of, resolve_voice

logger = init_logger("omni_vllm.api")

# Qwen2.5-Omni's model card: the talker was trained behind this system prompt; without it the
# speech of the real checkpoints degrades. Used when audio is asked for and no system message given.
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


@dataclass
class Started:
    """A request the SpeechEngine has taken (or queued): its id, prompt tokens per modality, its
    chunk stream, and `first`, the task that gives its first chunk."""

    request_id: str
    mm_counts: dict[str, int]
    stream: AsyncIterator[SpeechChunk]
    first: asyncio.Future
    audio: bool = True


def voice_name(voice: Any) -> Any:
    """A voice given as a name or as OpenAI's `{"id": name}` object."""
    return voice.get("id") if isinstance(voice, dict) else voice


class OmniServing:
    """What chat, speech and realtime share; kept on app.state.omni_serving."""

    def __init__(
        self,
        *,
        settings: Settings,
        speech: SpeechEngine | None,
        speech_error: str | None,
        audio_ids: AudioIds,
        metrics: Metrics,
        chat,
    ):
        self.settings, self.speech, self.speech_error = settings, speech, speech_error
        self.audio_ids, self.metrics = audio_ids, metrics
        self.chat = (
            chat  # vLLM's OpenAIServingChat: model check, rendering, sampling defaults
        )

    # ---------------------------------------------------------------- validation

    def voice(self, name: Any, param: str) -> str:
        """The checkpoint's spelling of a voice (case-insensitive, or an alias such as OpenAI's
        "alloy"; None: the default voice)."""
        name = voice_name(name) or self.settings.speech.default_voice
        aliases = self.settings.speech.voice_aliases
        try:
            return resolve_voice(name, self.speech.voices, aliases)
        except UnknownVoice:
            also = (
                f" or an alias of them ({', '.join(sorted(aliases))})"
                if aliases
                else ""
            )
            raise VLLMValidationError(
                f"unknown voice {name!r}; this model has {', '.join(self.speech.voices)}"
                f"{also}; GET /v1/audio/voices lists them",
                parameter=param,
            ) from None

    def voices(self) -> dict:
        """GET /v1/audio/voices: the checkpoint's voices, each with its aliases, and the table.

        OpenAI has no such list for its built-in voices; the shape is a list object of
        `audio.voice` items, as its custom voices are, plus what a client needs to map names."""
        has = self.speech is not None and not self.speech_error
        voices = list(self.speech.voices) if has else []
        s = self.settings.speech
        aliases = s.voice_aliases if has else {}
        return {
            "object": "list",
            "data": [
                {
                    "id": v,
                    "object": "audio.voice",
                    "name": v,
                    "aliases": aliases_of(v, aliases),
                    "default": v == s.default_voice,
                }
                for v in voices
            ],
            "default_voice": s.default_voice if has else None,
            "aliases": dict(sorted(aliases.items())),
        }

    def need_speech(self, param: str = "modalities") -> None:
        """Refuse audio where this server has no speech path (text-only checkpoint, load failure)."""
        if self.speech is None or self.speech_error:
            raise VLLMValidationError(
                f"this model cannot produce audio ({self.speech_error}); ask for "
                'modalities ["text"] only',
                parameter=param,
            )

    def check_media(self, messages: list) -> None:
        """Inline media over the server's limits (omni_vllm.api.limits), before vLLM decodes any."""
        s = self.settings
        L.check_message_media(
            messages,
            L.MediaLimits(
                max_bytes=int(s.max_media_mb * 2**20),
                max_audio_seconds=s.max_audio_input_seconds,
                max_video_seconds=s.max_video_input_seconds,
                max_image_pixels=s.max_image_pixels,
            ),
        )

    def max_codes(self, value: Any, param: str) -> int:
        """A request's speech cap, at most the server's --max-audio-tokens."""
        if value is None:
            return self.settings.speech.max_codes
        if not isinstance(value, int) or value < 1:
            raise VLLMValidationError(
                "max_audio_tokens must be a positive integer", parameter=param
            )
        return min(value, self.settings.speech.max_codes)

    def resolve_audio_ids(self, messages: list) -> None:
        """Assistant turns sent back as `audio: {id}` become their transcript (kept audio_id_ttl s)."""
        for i, msg in enumerate(messages):
            if not (
                isinstance(msg, dict)
                and msg.get("role") == "assistant"
                and msg.get("audio")
            ):
                continue
            try:
                transcript = self.audio_ids.transcript(
                    voice_name(msg["audio"])
                )  # {"id": ...}
            except AudioIdError as e:
                raise VLLMValidationError(
                    f"audio id is unknown or expired: {e}; send the assistant turn as "
                    "text instead",
                    parameter=f"messages[{i}].audio.id",
                ) from None
            msg.pop("audio")
            if not msg.get("content"):
                msg["content"] = transcript

    def model_name(self, model: str | None) -> str:
        """The model name a response carries: the request's, else the served one."""
        return self.chat.models.model_name(None) if model is None else model

    # ---------------------------------------------------------------- running

    async def start(
        self,
        request: ChatCompletionRequest,
        *,
        request_id: str,
        voice: str | None,
        max_codes: int | None,
        audio: bool = True,
        respond_while_queued: bool = False,
    ) -> Started:
        """Render with vLLM and start the SpeechEngine (text only with `audio=False`).

        Returns once the first chunk is there, or, with `respond_while_queued`, as soon as the
        request waits for a speaking slot (so that a stream's first event leaves while it waits).
        Errors until then are raised here (a full wait queue: ServiceBusyError, a 503 with
        Retry-After); a caller cancelled meanwhile takes the request out of the queue."""
        if audio and not any(
            isinstance(m, dict) and m.get("role") == "system" for m in request.messages
        ):
            request.messages.insert(
                0, {"role": "system", "content": SPEECH_SYSTEM_PROMPT}
            )
        rendered = await self.chat.render_chat_request(
            request
        )  # model check (404), template, media
        if isinstance(rendered, ErrorResponse):
            raise ServingError(rendered)
        _, (engine_input,) = rendered
        prompt_len = compat.prompt_len(self.chat, engine_input)
        if audio and prompt_len + 2 > (
            limit := self.speech.talker_max_len
        ):  # before the thinker runs
            raise VLLMValidationError(
                f"the prompt has {prompt_len} tokens; speech can follow prompts of at most {limit - 2} "
                f'tokens (the talker\'s --talker-max-len {limit}); ask for modalities ["text"] or '
                "shorten the conversation",
                parameter="messages",
            )
        try:
            max_tokens = get_max_tokens(
                self.chat.model_config.max_model_len,
                request.max_completion_tokens
                if request.max_completion_tokens is not None
                else request.max_tokens,
                prompt_len,
                self.chat.default_sampling_params,
                self.chat.override_max_tokens,
                truncate_prompt_tokens=request.truncate_prompt_tokens,
            )
            params = request.to_sampling_params(
                max_tokens, self.chat.default_sampling_params
            )
        except VLLMClientError as e:  # vLLM's own refusal, answered in vLLM's words
            raise ServingError.of(e) from e
        kwargs: dict[str, Any] = {}
        if audio and request.seed is not None:
            kwargs = dict(
                talker_sampling=TalkerSampling(seed=request.seed), noise=request.seed
            )
        queued = asyncio.get_running_loop().create_future()
        if respond_while_queued:
            kwargs["on_queued"] = lambda: queued.done() or queued.set_result(None)
        stream = self.speech.generate(
            engine_input,
            params,
            request_id,
            audio=audio,
            voice=voice,
            max_codes=max_codes,
            **kwargs,
        )
        first = asyncio.ensure_future(anext(stream))
        try:
            await asyncio.wait([first, queued], return_when=asyncio.FIRST_COMPLETED)
        except (
            asyncio.CancelledError
        ):  # the client went away: out of the queue (or the engine) now
            first.cancel()
            raise
        if first.done():
            try:
                first.result()
            except (UnknownVoice, SpeechUnavailable, SpeechBusy) as e:
                raise api_error(e) from None
        return Started(request_id, _mm_token_counts(engine_input), stream, first, audio)

    async def chunks(self, started: Started, t0: float) -> AsyncIterator[SpeechChunk]:
        """Every chunk of a started request, with metrics (`t0`: its arrival); aborts it if the
        consumer goes away (while it waits for a slot, cancelling `first` takes it out of the queue)."""
        stream, first, request_id = started.stream, started.first, started.request_id
        done, got_audio, speaking = False, False, False
        try:
            chunk = await first
            if started.audio:
                self.metrics.queue_time.observe(chunk.queue_seconds)
                self.metrics.speaking.inc()
            speaking = True
            while True:
                if chunk.audio is not None and len(chunk.audio):
                    if not got_audio:
                        got_audio = True
                        self.metrics.ttfa.observe(time.monotonic() - t0)
                    self.metrics.audio_seconds.inc(len(chunk.audio) / SAMPLE_RATE)
                done = chunk.finished
                yield chunk
                if done:
                    return
                chunk = await anext(stream)
        finally:
            if speaking and started.audio:
                self.metrics.speaking.dec()
            if (
                speaking and not done
            ):  # consumer gone or failed: free the engine and speech slots
                logger.info("aborting %s (client went away)", request_id)
                await asyncio.shield(self.abort(request_id))
            await stream.aclose()

    def usage(self, final: SpeechChunk, mm_counts: dict[str, int]) -> UsageInfo:
        """OpenAI's usage of a finished request: speech codes count as completion audio tokens."""
        text_tokens = final.completion_tokens
        return UsageInfo(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=text_tokens + final.audio_tokens,
            total_tokens=final.prompt_tokens + text_tokens + final.audio_tokens,
            prompt_tokens_details=PromptTokenUsageInfo(
                audio_tokens=mm_counts.get("audio", 0),
                image_tokens=mm_counts.get("image", 0),
                multimodal_tokens=mm_counts or None,
            ),
            completion_tokens_details=CompletionTokenUsageInfo(
                reasoning_tokens=0,
                audio_tokens=final.audio_tokens,
                text_tokens=text_tokens,
            ),
        )

    async def abort(self, request_id: str) -> None:
        """Stop a request now (its stream ends with finish_reason "abort")."""
        await self.speech.abort(request_id)

    async def shutdown(self) -> None:
        if self.speech is not None:
            await self.speech.shutdown()


def _mm_token_counts(engine_input) -> dict[str, int]:
    """Prompt tokens of each modality. Unlike vLLM's `_get_mm_token_counts` (placeholder spans), this
    counts the tokens that take the modality's embeddings (`PlaceholderRange.is_embed`): with
    `use_audio_in_video` the video and its audio share one interleaved span, and each counts only its
    own tokens in it."""
    return {
        modality: sum(p.get_num_embeds() for p in ranges)
        for modality, ranges in (engine_input.get("mm_placeholders") or {}).items()
        if ranges
    }
