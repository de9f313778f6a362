"""What the speech engine hands its callers: `SpeechChunk`s, gathered per request by a
`RequestCollector` (as vLLM's v1/engine/output_processor.py RequestOutputCollector)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SpeechChunk:
    """What one request produced since its previous chunk."""

    text: str  # new text since the previous chunk (delta)
    token_ids: list[int]  # new thinker token ids
    audio: (
        np.ndarray | None
    )  # new float32 mono samples at SAMPLE_RATE (24 kHz), or None
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


class RequestCollector:
    """One audio request's outputs as they arrive (text from its producer task, audio from the
    worker), merged until its consumer takes them: a slow consumer gets fewer, larger chunks (as
    vLLM's RequestOutputCollector). Lives on the event loop."""

    def __init__(self):
        self._ready = asyncio.Event()
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._audio: list[np.ndarray] = []
        self._codes: list[int] = []
        self._error: BaseException | None = None
        self.text_end: tuple[str | None, int, int] | None = (
            None  # (finish reason, prompt, completion tokens)
        )
        self.audio_done = False
        self.talker_reason: str | None = None  # the worker's, once audio_done
        self.aborted = False

    def add_text(self, text: str, token_ids: list[int]) -> None:
        self._text.append(text)
        self._token_ids += token_ids
        self._ready.set()

    def end_text(
        self, reason: str | None, prompt_tokens: int, completion_tokens: int
    ) -> None:
        self.text_end = (reason, prompt_tokens, completion_tokens)
        self._ready.set()

    def add_audio(
        self,
        audio: np.ndarray | None,
        codes: list[int],
        done: bool,
        talker_reason: str | None,
    ) -> None:
        if audio is not None:
            self._audio.append(audio)
        self._codes += codes
        self.audio_done = self.audio_done or done
        self.talker_reason = talker_reason or self.talker_reason
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = self._error or error
        self._ready.set()

    def abort(self) -> None:
        self.aborted = True
        self._ready.set()

    async def get(self) -> SpeechChunk:
        """Everything new since the last call (waits for something); raises the request's error."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        chunk = SpeechChunk(
            "".join(self._text),
            self._token_ids,
            np.concatenate(self._audio) if self._audio else None,
            audio_codes=self._codes,
        )
        self._text, self._token_ids, self._audio, self._codes = [], [], [], []
        return chunk
