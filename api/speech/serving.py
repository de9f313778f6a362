"""POST /v1/audio/speech: text to speech through the shared core (omni_vllm.api.serving.OmniServing).

Qwen2.5-Omni has no TTS mode, so the model is asked to say the input verbatim; the audio is
encoded as it comes (raw bytes of `response_format`) or sent as SSE `speech.audio.delta` events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.logger import init_logger

from omni_vllm.api import audio as A
from omni_vllm.api import compat
from omni_vllm.api.errors import (
    REFUSALS,
    SSE_DONE,
    ServingError,
    VLLMValidationError,
    api_error,
    error_response,
    sse_error,
)
from omni_vllm.api.serving import SPEECH_SYSTEM_PROMPT, OmniServing
from omni_vllm.api.speech.protocol import MAX_SPEECH_INPUT_CHARS, SpeechRequest
from omni_vllm.speech import SpeechChunk

logger = init_logger("omni_vllm.api")

TTS_USER_PROMPT = "Repeat the following text exactly as it is written, and say nothing else:\n\n{text}"


class OmniServingSpeech:
    """POST /v1/audio/speech."""

    def __init__(self, core: OmniServing):
        self.core = core

    async def create_speech(self, request: SpeechRequest, raw_request: Request):
        core, t0 = self.core, time.monotonic()
        try:
            if (err := await compat.check_model(core.chat, request)) is not None:
                raise ServingError(err)
            core.need_speech()
            voice = core.voice(request.voice, "voice")
            fmt = A.check_format(
                request.response_format, A.SPEECH_FORMATS, "response_format"
            )
            if not 0.25 <= request.speed <= 4.0:
                raise VLLMValidationError(
                    "speed must be between 0.25 and 4.0", parameter="speed"
                )
            if not request.input.strip():
                raise VLLMValidationError("input is empty", parameter="input")
            if len(request.input) > MAX_SPEECH_INPUT_CHARS:
                raise VLLMValidationError(
                    f"input is longer than {MAX_SPEECH_INPUT_CHARS} characters",
                    parameter="input",
                )
            if request.instructions:
                logger.debug(
                    "speech instructions ignored (Qwen2.5-Omni has no style control): %r",
                    request.instructions,
                )
            n_in = len(core.chat.renderer.tokenizer.encode(request.input))
            chat = ChatCompletionRequest(
                model=request.model,
                temperature=0.0,
                seed=request.seed,
                max_completion_tokens=2 * n_in + 16,
                messages=[
                    {"role": "system", "content": SPEECH_SYSTEM_PROMPT},
                    {
                        "role": "user",
                        "content": TTS_USER_PROMPT.format(text=request.input),
                    },
                ],
            )
            max_codes = core.max_codes(request.max_audio_tokens, "max_audio_tokens")
            request_id = f"chatcmpl-{compat.base_request_id(core.chat, raw_request, chat.request_id)}"
            started = await core.start(
                chat, request_id=request_id, voice=voice, max_codes=max_codes
            )
        except REFUSALS as e:
            return error_response(e)
        final: dict[str, Any] = {}
        body = self.speech_bytes(core.chunks(started, t0), fmt, request.speed, final)
        if request.stream_format == "sse":
            return StreamingResponse(
                self.speech_sse(body, final, request_id), media_type="text/event-stream"
            )
        return StreamingResponse(body, media_type=A.content_type(fmt))

    async def speech_bytes(
        self, chunks: AsyncIterator[SpeechChunk], fmt: str, speed: float, final: dict
    ) -> AsyncIterator[bytes]:
        """The encoded audio as it comes; `final["chunk"]` is the last chunk (with the counts)."""
        enc, resample = A.StreamEncoder(fmt), A.Resampler(speed)
        async for c in chunks:
            if (
                c.audio is not None
                and len(c.audio)
                and (data := enc.push(resample(c.audio)))
            ):
                yield data
            if c.finished:
                final["chunk"] = c
        if data := enc.push(
            resample(np.zeros(0, np.float32), final=True)
        ) + await asyncio.to_thread(enc.finish):
            yield data

    async def speech_sse(
        self, body: AsyncIterator[bytes], final: dict, request_id: str
    ) -> AsyncIterator[str]:
        """`speech.audio.delta` events, then `speech.audio.done` with the usage; a failure after the
        response started ends it with vLLM's error event and `[DONE]`."""
        try:
            async for data in body:
                for piece in A.chunks_of(data, 48_000):
                    event = {
                        "type": "speech.audio.delta",
                        "audio": base64.b64encode(piece).decode(),
                    }
                    yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:
            if not isinstance(api_error(e), REFUSALS):
                logger.exception("speech %s failed mid-stream", request_id)
            yield sse_error(e)
            yield SSE_DONE
            return
        last = final["chunk"]
        usage = dict(
            input_tokens=last.prompt_tokens,
            output_tokens=last.audio_tokens,
            total_tokens=last.prompt_tokens + last.audio_tokens,
        )
        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"
