"""Window bookkeeping of streaming Token2Wav: which codes form a request's next window.

Kept apart from the torch decoding (omni_vllm.streaming) so the schedule can be read, and tested,
on its own: chunk ``k`` of a stream covers codes ``[b_k, b_k+1)`` at fixed boundaries ``0,
first_chunk, first_chunk + chunk, ...`` and is ready once ``look_ahead`` more codes exist (or the
stream is finished); its DiT window adds ``left_context`` codes before it. A `StreamState` also
holds the buffers (codes, noise, final mel) that decoding reads and releases. See
omni_vllm.streaming for the receptive fields behind the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omni_vllm.token2wav import NoiseSource, Token2Wav


@dataclass(frozen=True)
class StreamConfig:
    """Window settings. Code counts must be multiples of the DiT block in codes (12 for
    Qwen2.5-Omni: 24 mel frames / 2 frames per code), so that every window starts on a block
    boundary and its attention blocks are the one-shot decode's blocks; vocoder contexts are in
    mel frames.

    Defaults, from the receptive fields and ``benchmarks/streaming_quality.py`` (random weights):

    * left 24 / ahead 12 codes = exactly one DiT evaluation's field. Covering it is the knee:
      mel RMS error vs one-shot falls ~300-1000x (4e-3 -> 1e-5 tiny, 3e-3 -> 3e-6 22-layer DiT);
      each further block gains another ~30x but costs compute (left) or latency (ahead), and the
      waveform is already at the float32 SNR floor. These are also Qwen's own streaming windows.
    * chunk 36 codes (0.72 s): window overhead (chunk + left + ahead) / chunk = 1.9x DiT compute
      (12: 3.8x, 24: 2.35x); the edge error is spread over longer chunks (1.5e-5 -> 2e-6 mel L1
      from 12 to 72). The first chunk is as long: a shorter one starts sooner but leaves only
      (2 * first_chunk - vocoder_right) frames of audio to cover the next 36 codes, i.e. the
      talker must run > 2x real time to avoid a gap.
    * vocoder left 34 frames = BigVGAN's whole field (left edges exact; costs only vocoder compute,
      ~6% of the DiT's at the real widths); right 16 frames: SNR at the float floor on both random
      vocoders (8: 80 dB, 12: 108 dB, 16: 129 dB), held back until the next chunk, which adds no
      latency to the first samples but shortens the first emission by 160 ms.
      ``vocoder_right_from_dit`` (no hold-back) measured 102 dB.
    """

    chunk: int = 36  # codes per chunk after the first
    first_chunk: int | None = (
        None  # codes in the first chunk (None: `chunk`); smaller starts sooner
    )
    left_context: int = 24  # DiT left context, codes
    look_ahead: int = 12  # DiT look-ahead, codes
    vocoder_left: int = (
        34  # BigVGAN left context, mel frames of final mel (its whole field)
    )
    vocoder_right: int = (
        16  # BigVGAN right context, mel frames (held back until the next chunk)
    )
    vocoder_right_from_dit: bool = (
        False  # right context from the DiT look-ahead (no hold-back)
    )
    # Sampling, as Token2Wav.code2mel (the reference's defaults).
    num_steps: int = 10
    guidance_scale: float = 0.5
    sway_coefficient: float | None = -1.0

    @property
    def first(self) -> int:
        return self.chunk if self.first_chunk is None else self.first_chunk

    def sampling(self) -> dict:
        return dict(
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            sway_coefficient=self.sway_coefficient,
        )

    def validate(self, t2w: Token2Wav) -> None:
        block = t2w.block_size // t2w.repeats
        for name in ("chunk", "first", "left_context", "look_ahead"):
            value = getattr(self, name)
            positive = name in ("chunk", "first")
            if value < 0 or value % block or (positive and value == 0):
                kind = "positive multiple" if positive else "multiple"
                raise ValueError(
                    f"StreamConfig.{name}={value} must be a {kind} of the DiT block ({block} codes)"
                )
        if self.vocoder_left < 0 or self.vocoder_right < 0:
            raise ValueError("vocoder contexts must be >= 0")
        if not self.vocoder_right_from_dit and self.vocoder_right >= t2w.repeats * min(
            self.chunk, self.first
        ):
            raise ValueError("vocoder_right must be shorter than a chunk's mel frames")

    def first_audio_codes(self) -> int:
        """Codes that must exist before the first audio leaves (a finished stream goes sooner)."""
        return self.first + self.look_ahead


class StreamState:
    """One request's stream: codes so far, its noise, the mel still needed as vocoder context, and
    how far its audio has been emitted. Fed with :meth:`append`; decoded by omni_vllm.streaming.decode_windows (usually through
    `StreamingToken2Wav.step`)."""

    def __init__(
        self,
        voice: str,
        noise: NoiseSource = None,
        config: StreamConfig | None = None,
        repeats: int = 2,
        record_mel: bool = False,
    ):
        self.voice = voice
        self.mel_chunks: list[torch.Tensor] | None = (
            [] if record_mel else None
        )  # diagnostics
        self.config = config or StreamConfig()
        self.repeats = repeats  # mel frames per code (Token2Wav.repeats)
        self.finished = False
        self.num_codes = 0
        self._codes: list[int] = []
        self._code_base = 0  # absolute index of _codes[0]
        self.next_chunk = 0  # index of the next chunk to decode
        self._mel: torch.Tensor | None = (
            None  # final mel frames [_mel_base, frames decoded)
        )
        self._mel_base = 0
        self.frames_emitted = 0  # mel frames whose waveform has left
        if isinstance(noise, torch.Tensor):
            self._noise_full = noise.detach().reshape(-1, noise.shape[-1]).float()
            self._generator = None
        else:
            self._noise_full = None
            if noise is None:
                noise = int(torch.randint(2**62, (1,)).item())
            if isinstance(noise, int):
                noise = torch.Generator().manual_seed(noise)
            if noise.device.type != "cpu":
                raise ValueError(
                    "noise generators must be CPU generators (the stream draws on the CPU)"
                )
            self._generator = noise
        self._noise: torch.Tensor | None = (
            None  # lazily drawn frames [_noise_base, ...)
        )
        self._noise_base = 0

    # ------------------------------------------------------------------------------- input

    def append(
        self, codes: Iterable[int] | torch.Tensor = (), finished: bool = False
    ) -> None:
        """Add newly generated codes; `finished=True` once the code stream has ended."""
        new = [
            int(c)
            for c in (
                codes.reshape(-1).tolist() if isinstance(codes, torch.Tensor) else codes
            )
        ]
        if self.finished and new:
            raise ValueError("codes appended to a finished stream")
        self._codes.extend(new)
        self.num_codes += len(new)
        self.finished = self.finished or finished

    # ---------------------------------------------------------------------------- schedule

    def bounds(self, k: int) -> tuple[int, int]:
        """Codes [start, end) of chunk k, before clipping to the stream's end."""
        first, chunk = self.config.first, self.config.chunk
        return (0, first) if k == 0 else (first + (k - 1) * chunk, first + k * chunk)

    def _chunk_ready(self, k: int) -> bool:
        start, end = self.bounds(k)
        if self.finished:
            return start < self.num_codes
        return self.num_codes >= end + self.config.look_ahead

    def queued_windows(self) -> int:
        """Chunks whose codes exist (with their look-ahead) but which are not decoded yet."""
        k = self.next_chunk
        while self._chunk_ready(k):
            k += 1
        return k - self.next_chunk

    def _tail_ready(self) -> bool:
        """A finished stream whose chunks are all decoded but whose last frames are still held."""
        return (
            self.finished
            and not self._chunk_ready(self.next_chunk)
            and self.frames_emitted < self.repeats * self.num_codes
        )

    @property
    def ready(self) -> bool:
        """Something can be decoded now."""
        return self._chunk_ready(self.next_chunk) or self._tail_ready()

    @property
    def done(self) -> bool:
        """Finished and every sample emitted."""
        return self.finished and not self.ready

    # ------------------------------------------------------------------------------ buffers

    def _code_slice(self, start: int, end: int) -> torch.Tensor:
        return torch.tensor(
            self._codes[start - self._code_base : end - self._code_base],
            dtype=torch.long,
        )

    def noise(
        self, start: int, end: int, mel_dim: int = 80, block: int = 24
    ) -> torch.Tensor:
        """The request's noise for mel frames [start, end), shape (end - start, mel_dim)."""
        if self._noise_full is not None:
            if end > len(self._noise_full):
                raise ValueError(
                    f"stream needs noise for {end} mel frames, given {len(self._noise_full)}"
                )
            return self._noise_full[start:end]
        if start < self._noise_base:
            raise ValueError("noise before the stream's window was already released")
        have = self._noise_base + (0 if self._noise is None else len(self._noise))
        if end > have:
            draws = [
                torch.randn(block, mel_dim, generator=self._generator)
                for _ in range(math.ceil((end - have) / block))
            ]
            self._noise = torch.cat(
                ([] if self._noise is None else [self._noise]) + draws
            )
        return self._noise[start - self._noise_base : end - self._noise_base]

    def _release(self, code_start: int, frame_start: int, mel_start: int) -> None:
        """Forget codes / noise frames / final mel frames before these positions (never needed again)."""
        if code_start > self._code_base:
            del self._codes[: code_start - self._code_base]
            self._code_base = code_start
        if self._noise is not None and frame_start > self._noise_base:
            drop = min(frame_start - self._noise_base, len(self._noise))
            self._noise = self._noise[drop:]
            self._noise_base += drop
        if self._mel is not None and mel_start > self._mel_base:
            self._mel = self._mel[:, mel_start - self._mel_base :]
            self._mel_base = mel_start

    def free(self) -> None:
        """Drop every buffer (cancel); the state is `done` from now on."""
        self._codes, self._mel, self._noise, self._noise_full, self._generator = (
            [],
            None,
            None,
            None,
            None,
        )
        self.mel_chunks = None
        self.finished, self.num_codes, self.frames_emitted = True, 0, 0


@dataclass
class Window:
    """One chunk to decode: its DiT window of codes and the chunk's own codes within it."""

    stream: StreamState
    chunk: int
    code_start: int  # window [code_start, code_end)
    code_end: int
    keep_start: int  # chunk codes [keep_start, keep_end)
    keep_end: int


def next_windows(s: StreamState, max_windows: int) -> list[Window]:
    """The stream's next ready windows (at most `max_windows`), oldest first."""
    cfg, out, k = s.config, [], s.next_chunk
    while len(out) < max_windows and s._chunk_ready(k):
        start, end = s.bounds(k)
        keep_end = min(end, s.num_codes)
        out.append(
            Window(
                s,
                k,
                max(0, start - cfg.left_context),
                min(end + cfg.look_ahead, s.num_codes),
                start,
                keep_end,
            )
        )
        k += 1
    return out
