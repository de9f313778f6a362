"""Audio out of the HTTP API: output encoding and speed change.

Output is 24 kHz mono (Token2Wav's rate). Encoders are libsndfile's (through `soundfile`), which
writes WAV, FLAC, MP3 and Ogg/Opus, and FFmpeg's native AAC encoder (through PyAV, `av`) for AAC,
written as a raw ADTS stream (`.aac`, what OpenAI returns); `pcm`/`pcm16` is raw signed 16-bit
little-endian.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import numpy as np

from omni_vllm.api.errors import VLLMValidationError
from omni_vllm.token2wav import SAMPLE_RATE  # Token2Wav's output rate

# format name -> (libsndfile format, subtype, content type); None: raw pcm16; "aac": PyAV's
# (container, codec, content type)
_FORMATS: dict[str, tuple[str, str, str] | None] = {
    "aac": ("adts", "aac", "audio/aac"),
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "pcm": None,
    "pcm16": None,
}
CHAT_FORMATS = (
    "wav",
    "mp3",
    "flac",
    "opus",
    "aac",
    "pcm16",
)  # `audio.format` of chat completions
SPEECH_FORMATS = (
    "mp3",
    "opus",
    "aac",
    "flac",
    "wav",
    "pcm",
)  # `response_format` of /v1/audio/speech
AAC_BIT_RATE = 64000  # mono speech at 24 kHz


def check_format(fmt: str | None, allowed: tuple[str, ...], param: str) -> str:
    fmt = (fmt or "").lower()
    if fmt not in allowed:
        raise VLLMValidationError(
            f"unknown audio format {fmt!r}; use one of {', '.join(allowed)}",
            parameter=param,
        )
    return fmt


def content_type(fmt: str) -> str:
    spec = _FORMATS[fmt]
    return "audio/pcm" if spec is None else spec[2]


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> int16 little-endian bytes (clipped)."""
    return (
        (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0)
        .astype("<i2")
        .tobytes()
    )


def encode(audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The whole clip as a file of format `fmt`."""
    spec = _FORMATS[fmt]
    if spec is None:
        return pcm16(audio)
    if fmt == "aac":
        return encode_aac(audio, sample_rate)
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf, np.asarray(audio, np.float32), sample_rate, format=spec[0], subtype=spec[1]
    )
    return buf.getvalue()


def encode_aac(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, bit_rate: int = AAC_BIT_RATE
) -> bytes:
    """Mono AAC-LC as an ADTS stream (FFmpeg's native encoder, through PyAV). The decoded clip is
    longer than the input by the encoder's priming and the padding of its last 1024-sample frame."""
    import av

    audio = np.clip(np.asarray(audio, np.float32), -1.0, 1.0).reshape(1, -1)
    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as out:
        stream = out.add_stream("aac", rate=sample_rate, layout="mono")
        stream.bit_rate = bit_rate
        frames = []
        if audio.shape[1]:
            frame = av.AudioFrame.from_ndarray(audio, format="flt", layout="mono")
            frame.sample_rate = sample_rate
            frames.append(frame)
        for frame in [*frames, None]:  # None flushes the encoder
            for packet in stream.encode(frame):
                out.mux(packet)
    return buf.getvalue()


def wav_stream_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streamers do)."""
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


class StreamEncoder:
    """Bytes of format `fmt` as audio arrives: pcm and wav go out chunk by chunk; the compressed
    formats (mp3, flac, opus, aac) are encoded once the clip is complete, since their headers
    (FLAC STREAMINFO, the MP3 Xing frame) are rewritten at the end."""

    def __init__(self, fmt: str):
        self.fmt, self._held, self._started = fmt, [], False

    @property
    def incremental(self) -> bool:
        return self.fmt in ("pcm", "pcm16", "wav")

    def _head(self) -> bytes:
        head = wav_stream_header() if self.fmt == "wav" and not self._started else b""
        self._started = True
        return head

    def push(self, audio: np.ndarray) -> bytes:
        if self.incremental:
            return self._head() + pcm16(audio)
        self._held.append(np.asarray(audio, np.float32))
        return b""

    def finish(self) -> bytes:
        if self.incremental:
            return self._head()
        return encode(
            np.concatenate(self._held) if self._held else np.zeros(0, np.float32),
            self.fmt,
        )


class Resampler:
    """Speed change by resampling (linear interpolation), continuous across chunks.

    `speed` 2.0 plays twice as fast: half the samples, and the pitch goes up an octave too (this
    is a resampler, not a pitch-preserving time stretch)."""

    def __init__(self, speed: float):
        self.speed, self._pos, self._tail = float(speed), 0.0, np.zeros(0, np.float32)

    def __call__(self, audio: np.ndarray, final: bool = False) -> np.ndarray:
        if self.speed == 1.0:
            return np.asarray(audio, np.float32)
        x = np.concatenate([self._tail, np.asarray(audio, np.float32)])
        last = len(x) - 1 if final else len(x) - 2  # keep one sample of right context
        if last < 0:
            self._tail = x
            return np.zeros(0, np.float32)
        pos = (
            np.arange(self._pos, last + 1e-9, self.speed)
            if self._pos <= last
            else np.zeros(0)
        )
        out = np.interp(pos, np.arange(len(x)), x).astype(np.float32)
        nxt = self._pos + len(pos) * self.speed
        keep = min(int(np.floor(nxt)), len(x))
        self._tail, self._pos = x[keep:], nxt - keep
        return out


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
