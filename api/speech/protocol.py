"""The request of POST /v1/audio/speech (OpenAI's SpeechCreateParams, with our extensions)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from vllm.entrypoints.serve.engine.protocol import OpenAIBaseModel

MAX_SPEECH_INPUT_CHARS = 4096


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
    seed: int | None = Field(
        default=None, description="Seeds the talker's sampling and the vocoder noise."
    )
    max_audio_tokens: int | None = Field(
        default=None, description="Cap on speech codes (50 per second)."
    )
