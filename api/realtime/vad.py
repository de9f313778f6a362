"""Server VAD of a realtime session: Silero VAD (the `silero-vad` package's JIT model, no download).

The client sends pcm16 at 24 kHz; Silero takes 512-sample frames (32 ms) at 16 kHz. A stateful PyAV
(FFmpeg libswresample) resampler turns the stream into 16 kHz, continuous across appends. Each
session has its own model instance (the JIT model keeps its recurrent state inside; loading one
takes ~30 ms and ~2 MB), so frames of different sessions never mix. A frame costs ~1 ms of CPU:
the caller runs `feed` off the event loop.

Speech starts at the first frame whose probability reaches `threshold`; it stops once
`silence_duration_ms` of frames have stayed below it. Times are milliseconds of audio since the
session's first appended sample (what `audio_start_ms` / `audio_end_ms` count in OpenAI's API).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

VAD_RATE = 16000
FRAME = 512  # samples at 16 kHz: 32 ms
FRAME_MS = FRAME * 1000 // VAD_RATE

_lock = threading.Lock()


def _load_model():
    from silero_vad import load_silero_vad

    with _lock:  # torch.jit.load from several threads at once is not safe
        return load_silero_vad(onnx=False)


@dataclass
class VadSettings:
    """The GA session's `audio.input.turn_detection` of type server_vad (OpenAI's defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass
class VadEvent:
    kind: str  # "speech_started" | "speech_stopped"
    ms: int  # audio_start_ms (with the prefix padding) or audio_end_ms


class ServerVad:
    """Feed pcm16 24 kHz bytes; get speech start / stop events in the order they happened."""

    def __init__(self, settings: VadSettings, in_rate: int = 24000):
        import av

        self.settings, self.in_rate = settings, in_rate
        self.model = _load_model()
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=VAD_RATE)
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet in a frame
        self._frames = 0  # frames scored so far
        self.speaking = False
        self._silent_ms = 0
        self._speech_start_ms = 0

    def reset(self) -> None:
        """Forget speech in progress (the buffer was cleared or committed by the client)."""
        self.speaking, self._silent_ms = False, 0
        self.model.reset_states()

    def feed(self, pcm16: bytes) -> list[VadEvent]:
        import av
        import torch

        samples = np.frombuffer(pcm16, "<i2").reshape(1, -1)
        if not samples.size:
            return []
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.in_rate
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        self._pending = np.concatenate([self._pending, *out]).astype(
            np.float32, copy=False
        )
        events: list[VadEvent] = []
        s = self.settings
        with torch.inference_mode():
            while len(self._pending) >= FRAME:
                chunk, self._pending = self._pending[:FRAME], self._pending[FRAME:]
                prob = float(self.model(torch.from_numpy(chunk.copy()), VAD_RATE))
                end_ms = (self._frames + 1) * FRAME_MS
                if not self.speaking and prob >= s.threshold:
                    self.speaking, self._silent_ms = True, 0
                    self._speech_start_ms = self._frames * FRAME_MS
                    events.append(
                        VadEvent(
                            "speech_started",
                            max(0, self._speech_start_ms - s.prefix_padding_ms),
                        )
                    )
                elif self.speaking:
                    self._silent_ms = (
                        0 if prob >= s.threshold else self._silent_ms + FRAME_MS
                    )
                    if self._silent_ms >= s.silence_duration_ms:
                        self.speaking = False
                        events.append(VadEvent("speech_stopped", end_ms))
                self._frames += 1
        return events
