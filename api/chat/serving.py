"""Chat completions that speak: the handler behind omni_vllm.api.chat.router.

Requests without `"audio"` in `modalities` are handed to vLLM's own handler untouched (tools,
logprobs, n, beam search, structured output, ... all work as in `vllm serve`). With audio, the
request is checked here, started through the shared core (omni_vllm.api.serving.OmniServing) and answered
whole (`audio.data`, base64) or as SSE (pcm16 deltas with the transcript), as OpenAI does.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types.chat.chat_completion_audio import ChatCompletionAudio
from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.serve.utils.api_utils import should_include_usage
from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive
from vllm.logger import init_logger

from omni_vllm.api import audio as A
from omni_vllm.api import compat
from omni_vllm.api.errors import (
    REFUSALS,
    SSE_DONE,
    VLLMValidationError,
    api_error,
    error_response,
    sse_error,
)
from omni_vllm.api.serving import OmniServing
from omni_vllm.speech import SpeechChunk

logger = init_logger("omni_vllm.api")


class OmniServingChat:
    """POST /v1/chat/completions: vLLM's for text, ours (through `OmniServing`) with audio."""

    def __init__(self, core: OmniServing, keep_alive_interval: float = 0.0):
        self.core, self.keep_alive_interval = core, keep_alive_interval

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request | None = None
    ):
        """`raw_request` is None in vLLM's batch runner (omni_vllm.patches.run_batch), which
        calls its chat handler with the request alone and accepts no stream."""
        core, t0 = self.core, time.monotonic()
        try:
            extra = request.model_extra or {}
            modalities = extra.get("modalities") or ["text"]
            if not isinstance(modalities, list) or not set(modalities) <= {
                "text",
                "audio",
            }:
                raise VLLMValidationError(
                    f'modalities must be ["text"] or ["text", "audio"], got '
                    f"{modalities!r}",
                    parameter="modalities",
                )
            if not request.messages:  # OpenAI (and vLLM's text path) answer 400 too
                raise VLLMValidationError(
                    "messages must hold at least one message", parameter="messages"
                )
            core.resolve_audio_ids(request.messages)
            core.check_media(request.messages)
            speak = "audio" in modalities
            if speak and raw_request is None and request.stream:
                # Nobody would read the stream: refused before it holds a speaking slot.
                raise VLLMValidationError(
                    "a batch line cannot stream: set stream to false",
                    parameter="stream",
                )
            if speak:
                voice, fmt = self._check_audio_request(request, extra)
                max_codes = core.max_codes(
                    extra.get("max_audio_tokens"), "max_audio_tokens"
                )
                request_id = f"chatcmpl-{compat.base_request_id(core.chat, raw_request, request.request_id)}"
                started = await core.start(
                    request,
                    request_id=request_id,
                    voice=voice,
                    max_codes=max_codes,
                    respond_while_queued=bool(request.stream),
                )
        except REFUSALS as e:
            return error_response(e)
        if not speak:
            if (
                raw_request is None
            ):  # the batch runner: vLLM's handler, as it would call it
                return await core.chat.create_chat_completion(request)
            return await compat.vllm_chat_completion(request, raw_request)
        chunks = core.chunks(started, t0)
        model = core.model_name(request.model)
        if request.stream:
            gen = self.chat_stream(
                request, chunks, request_id, model, started.mm_counts
            )
            return StreamingResponse(
                with_sse_keep_alive(gen, self.keep_alive_interval),
                media_type="text/event-stream",
            )
        return await self.chat_full(
            request, chunks, request_id, model, fmt, started.mm_counts
        )

    def _check_audio_request(
        self, request: ChatCompletionRequest, extra: dict
    ) -> tuple[str, str]:
        """Checks of a request for audio out; returns its voice and audio format."""
        self.core.need_speech()
        opts = extra.get("audio") or {}
        if not isinstance(opts, dict):
            raise VLLMValidationError(
                "audio must be an object {voice, format}", parameter="audio"
            )
        voice = self.core.voice(opts.get("voice"), "audio.voice")
        fmt = A.check_format(
            opts.get("format") or ("pcm16" if request.stream else "wav"),
            A.CHAT_FORMATS,
            "audio.format",
        )
        if request.stream and fmt != "pcm16":
            raise VLLMValidationError(
                "streamed audio is sent as pcm16 (24 kHz, 16-bit, mono): set audio.format "
                'to "pcm16", or do not stream',
                parameter="audio.format",
            )
        if (request.n or 1) != 1 or request.use_beam_search:
            raise VLLMValidationError(
                "audio output supports n=1 without beam search", parameter="n"
            )
        return voice, fmt

    async def chat_full(
        self,
        request: ChatCompletionRequest,
        chunks: AsyncIterator[SpeechChunk],
        request_id: str,
        model: str,
        fmt: str,
        mm_counts: dict[str, int],
    ) -> JSONResponse:
        text, token_ids, waves, final = [], [], [], None
        async for c in chunks:
            text.append(c.text)
            token_ids += c.token_ids
            if c.audio is not None:
                waves.append(c.audio)
            final = c
        transcript = "".join(text)
        wave = np.concatenate(waves) if waves else np.zeros(0, np.float32)
        audio_id, expires_at = self.core.audio_ids.issue(transcript)
        data = await asyncio.to_thread(A.encode, wave, fmt)
        message = ChatMessage(
            role="assistant",
            content=None,
            audio=ChatCompletionAudio(
                id=audio_id,
                data=base64.b64encode(data).decode(),
                expires_at=expires_at,
                transcript=transcript,
            ),
        )
        choice = ChatCompletionResponseChoice(
            index=0,
            message=message,
            finish_reason=final.finish_reason,
            token_ids=token_ids if request.return_token_ids else None,
        )
        resp = ChatCompletionResponse(
            id=request_id,
            model=model,
            choices=[choice],
            usage=self.core.usage(final, mm_counts),
        )
        return JSONResponse(resp.model_dump())

    async def chat_stream(
        self,
        request: ChatCompletionRequest,
        chunks: AsyncIterator[SpeechChunk],
        request_id: str,
        model: str,
        mm_counts: dict[str, int],
    ) -> AsyncIterator[str]:
        """SSE chunks; a failure after the response started ends it with vLLM's error event."""
        created = int(time.time())
        include_usage, _ = should_include_usage(
            request.stream_options, self.core.chat.enable_force_include_usage
        )

        def event(delta: DeltaMessage | None, finish_reason=None, usage=None) -> str:
            choices = (
                []
                if delta is None
                else [
                    ChatCompletionResponseStreamChoice(
                        index=0, delta=delta, finish_reason=finish_reason
                    )
                ]
            )
            chunk = ChatCompletionStreamResponse(
                id=request_id, created=created, model=model, choices=choices
            )
            if usage is not None:
                chunk.usage = usage
            return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

        transcript, final = [], None
        # At once, also while the request waits for a speaking slot: the client (and any proxy) sees
        # the response start; the wait is then ended by the client (or --max-wait-seconds).
        yield event(
            DeltaMessage(role="assistant", content=None, audio={"transcript": ""})
        )
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
            audio_id, expires_at = self.core.audio_ids.issue(
                "".join(transcript)
            )  # it carries the transcript
            yield event(
                DeltaMessage(audio={"id": audio_id, "expires_at": expires_at}),
                finish_reason=final.finish_reason,
            )
            if include_usage:
                yield event(None, usage=self.core.usage(final, mm_counts))
        except (
            Exception
        ) as e:  # refused after the response started (the wait limit), or failed
            if not isinstance(api_error(e), REFUSALS):
                logger.exception("chat completion %s failed mid-stream", request_id)
            yield sse_error(e)
        yield SSE_DONE
