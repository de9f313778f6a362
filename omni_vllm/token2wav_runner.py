"""The Token2Wav runner: a streaming window call's tensor work, eager or captured per bucket.

A window call (omni_vllm.streaming.WindowCall, planned by the bookkeeping) is one DiT solve over
its windows (9 RK4 steps x 4 evaluations with guidance: 36 DiT forwards) and one BigVGAN call over
its vocoder segments. Eagerly that is ~230k aten ops whatever the batch, i.e. on a GPU about a
second of kernel launches per call; as vLLM's GPU model runner does for the thinker's decode, the
runner therefore gives the call static shapes and replays it as one CUDA graph per bucket:

* **Static shapes.** Every window is right-padded to the longest window the stream settings make
  (`left_context + max(first_chunk, chunk) + look_ahead` codes), every segment to the longest
  vocoder input (`vocoder_left + repeats * max(first_chunk, chunk) + vocoder_right` frames), and
  the window and segment counts to batch buckets (1, 2, 4, ... `max_batch`;
  omni_vllm.capture.batch_buckets). Padding is exact: the DiT's block_diff keeps real queries off
  padded keys and BigVGAN's boundary hooks re-impose each row's end (omni_vllm.token2wav); padded
  rows compute on zeros and are dropped.
* **Static buffers, one function per key.** Per key (window bucket, segment bucket, the two padded
  lengths, the sampling settings) the runner keeps device buffers for everything a call varies:
  codes, initial noise, real frames per row, voice indices (into per-voice tables built once),
  the vocoder's context frames from earlier calls, and one gather index that assembles each
  segment from context frames and this call's DiT mel. The captured function reads only those
  buffers; the block_diff mask and BigVGAN's padding masks are computed inside it from the frame
  buffers, and the ODE schedule is python floats fixed on the host (token2wav.ode_schedule).
  The host writes each call's inputs with one staged copy per buffer, then
  `GraphCache.run(key, fn)` replays (on CUDA) or runs `fn` (anywhere with a `capture` hook).
  All of a call's segments go through one BigVGAN call there (`Token2Wav.vocoder_batch`, the
  CPU's cap on requests per vocoder call, applies to the eager path only).
* **Eager elsewhere.** On the CPU, or with `enforce_eager` (`--speech-enforce-eager`), a call runs
  as before capture existed: `Token2Wav.code2mel` then `mel2wav` on the unpadded windows (padding
  only costs compute where there are no launches to save). On this project's CPU `torch.compile`
  of a DiT evaluation did not pay (benchmarks/speech_host_cost.py); it is not used.

Not run on a GPU yet: the CUDA capture itself (GraphCache's `_capture_cuda`) is exercised on the
CPU only through GraphCache's `capture` hook (tests/test_token2wav_runner.py), which checks the
keys, the buckets and that replays on refilled buffers give the eager audio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from omni_vllm.capture import GraphCache, batch_buckets, bucket_for
from omni_vllm.token2wav import Token2Wav, ode_schedule

if TYPE_CHECKING:
    from omni_vllm.stream_windows import StreamConfig
    from omni_vllm.streaming import WindowCall, WindowResult

__all__ = ["DEFAULT_MAX_BATCH", "WindowRunner", "window_shape"]

logger = logging.getLogger(__name__)

# Largest window batch captured (more windows in one call run eagerly); the engine may pass its
# --max-speaking instead.
DEFAULT_MAX_BATCH = 64


def window_shape(t2w: Token2Wav, config: StreamConfig) -> tuple[int, int]:
    """(DiT window mel frames, vocoder segment mel frames) that every call of `config` fits."""
    chunk = max(config.first, config.chunk)
    window = t2w.repeats * (config.left_context + chunk + config.look_ahead)
    segment = config.vocoder_left + t2w.repeats * chunk + config.vocoder_right
    return window, segment


@dataclass
class _Buffers:
    """One key's static inputs (device) and their host staging copies (pinned on CUDA)."""

    codes: torch.Tensor  # (windows, window codes) long
    x0: torch.Tensor  # (windows, window frames, mel_dim) float32
    frames: torch.Tensor  # (windows,) long: real mel frames per window
    voice: torch.Tensor  # (windows,) long: index into the voice tables
    context: (
        torch.Tensor
    )  # (segments * segment frames, mel_dim) float32: earlier final mel
    index: (
        torch.Tensor
    )  # (segments * segment frames,) long: gather index of the segments
    seg_frames: torch.Tensor  # (segments,) long: real mel frames per segment
    host: dict  # name -> host staging tensor of the same shape (context excepted)


class WindowRunner:
    """Runs window calls for one Token2Wav and one StreamConfig (see the module docstring)."""

    def __init__(
        self,
        t2w: Token2Wav,
        config: StreamConfig | None = None,
        *,
        enforce_eager: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        capture: Callable | None = None,
    ):
        """`config`: the stream settings (the padded shapes; None: eager only). `capture`: a
        stand-in for the CUDA capture (GraphCache's hook, for tests)."""
        self.t2w = t2w
        self.graphs = GraphCache(
            "token2wav",
            device=t2w.device,
            enabled=not enforce_eager and config is not None,
            capture=capture,
        )
        self.buckets = batch_buckets(max_batch)
        self.shape = None if config is None else window_shape(t2w, config)
        self._buffers: dict[tuple, _Buffers] = {}
        self._pin = t2w.device.type == "cuda"
        names = list(t2w.voices)
        self._voice_index = {name: i for i, name in enumerate(names)}
        voices = [t2w._voice(name) for name in names]
        # per-voice DiT inputs, gathered by voice index inside the captured function
        self._cond = torch.stack([v.cond for v in voices])
        self._ref_enc = torch.stack([v.ref_enc for v in voices])
        self._null_enc = torch.stack([v.null_enc for v in voices])
        self.eager_calls = 0  # calls with DiT windows that ran eagerly

    @property
    def captured(self) -> bool:
        """Whether calls run on static buffers through the graph cache."""
        return self.graphs.enabled

    def key(self, call: WindowCall) -> tuple | None:
        """The graph key of a call: (window bucket, segment bucket, window frames, segment
        frames, sampling); None: the call runs eagerly (capture off, or it fits no bucket)."""
        if not self.captured or not call.windows:
            return None
        window, segment = self.shape
        repeats, top = self.t2w.repeats, self.buckets[-1]
        if (
            len(call.windows) > top
            or len(call.segments) > top
            or any(len(c) * repeats > window for c in call.codes)
            or any(seg.frames > segment for seg in call.segments)
        ):
            return None
        sampling = tuple(sorted(call.sampling.items()))
        return (
            bucket_for(len(call.windows), self.buckets),
            bucket_for(max(1, len(call.segments)), self.buckets),
            window,
            segment,
            sampling,
        )

    @torch.no_grad()
    def run(self, call: WindowCall) -> WindowResult:
        """The DiT mel of every window and the waveform of every segment of `call`."""
        key = self.key(call)
        if key is None:
            return self._eager(call)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = self._allocate(key)
        self._fill(bufs, call)
        fn = self._function(key, bufs)
        mel, wav = self.graphs.run(key, fn)
        # a replay overwrites the outputs: copy out what this call returns
        n = len(call.windows)
        mel = mel[:n].clone()
        wav = wav[: len(call.segments)].cpu()
        repeats, hop = self.t2w.repeats, self.t2w.hop
        from omni_vllm.streaming import WindowResult

        return WindowResult(
            [mel[i, : len(c) * repeats].T for i, c in enumerate(call.codes)],
            [wav[i, : seg.frames * hop] for i, seg in enumerate(call.segments)],
        )

    # ------------------------------------------------------------------------------ eager

    def _eager(self, call: WindowCall) -> WindowResult:
        """The call unpadded: one `code2mel`, one `mel2wav` (the path before capture). A call
        of vocoder tails only (a stream whose end came after its last window) runs here too."""
        from omni_vllm.streaming import WindowResult

        self.eager_calls += bool(call.windows)
        t2w = self.t2w
        mels = (
            t2w.code2mel(call.codes, call.voices, call.noise, **call.sampling)
            if call.windows
            else []
        )
        inputs = [
            torch.cat(
                [
                    p if torch.is_tensor(p) else mels[p[0]][:, p[1] : p[2]]
                    for p in seg.pieces
                ],
                dim=1,
            )
            for seg in call.segments
        ]
        return WindowResult(mels, t2w.mel2wav(inputs) if inputs else [])

    # ---------------------------------------------------------------------------- captured

    def _allocate(self, key: tuple) -> _Buffers:
        windows, segments, window, segment, _ = key
        t2w, dev = self.t2w, self.t2w.device
        mel_dim = t2w.mel_dim
        shapes = dict(
            codes=((windows, window // t2w.repeats), torch.long),
            x0=((windows, window, mel_dim), torch.float32),
            frames=((windows,), torch.long),
            voice=((windows,), torch.long),
            index=((segments * segment,), torch.long),
            seg_frames=((segments,), torch.long),
        )
        device = {
            name: torch.zeros(shape, dtype=dtype, device=dev)
            for name, (shape, dtype) in shapes.items()
        }
        host = {
            name: torch.zeros(shape, dtype=dtype, pin_memory=self._pin)
            for name, (shape, dtype) in shapes.items()
        }
        context = torch.zeros(segments * segment, mel_dim, device=dev)
        return _Buffers(**device, context=context, host=host)

    def _fill(self, bufs: _Buffers, call: WindowCall) -> None:
        """Write the call's inputs into the key's buffers: one staged host->device copy per
        buffer, plus one device copy of the context frames; padded rows get valid dummies."""
        t2w, host = self.t2w, bufs.host
        windows, window = bufs.x0.shape[:2]
        segments = len(bufs.seg_frames)
        segment = len(bufs.index) // segments
        repeats = t2w.repeats
        host["codes"].zero_()
        host["x0"].zero_()
        # dummy windows: full length (no empty attention row), voice 0
        host["frames"].fill_(window)
        host["voice"].zero_()
        for i, (codes, noise, voice) in enumerate(
            zip(call.codes, call.noise, call.voices)
        ):
            if len(codes) and (
                int(codes.min()) < 0
                or int(codes.max()) >= t2w.dit.text_embed.codec_embed.num_embeddings
            ):
                raise ValueError("codec code out of range of the DiT codec embedding")
            host["codes"][i, : len(codes)] = codes
            host["x0"][i, : len(noise)] = noise
            host["frames"][i] = len(codes) * repeats
            t2w._voice(voice)  # an unknown voice: the eager path's error
            host["voice"][i] = self._voice_index[voice]

        # Segments gather from [context frames; this call's DiT mel; one zero frame].
        context = [
            p.T for seg in call.segments for p in seg.pieces if torch.is_tensor(p)
        ]
        n_context = sum(len(c) for c in context)
        dit_base, zero = len(bufs.context), len(bufs.context) + windows * window
        index = np.full((segments, segment), zero, dtype=np.int64)
        host["seg_frames"].fill_(segment)  # dummy segments: full length, all zeros
        offset = 0
        for row, seg in enumerate(call.segments):
            parts = []
            for p in seg.pieces:
                if torch.is_tensor(p):
                    parts.append(np.arange(offset, offset + p.shape[1]))
                    offset += p.shape[1]
                else:
                    w, a, b = p
                    parts.append(np.arange(a, b) + dit_base + w * window)
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            index[row, : len(flat)] = flat
            host["seg_frames"][row] = len(flat)
        host["index"].copy_(torch.from_numpy(index.reshape(-1)))
        for name in ("codes", "x0", "frames", "voice", "index", "seg_frames"):
            getattr(bufs, name).copy_(host[name], non_blocking=self._pin)
        if n_context:
            bufs.context[:n_context].copy_(torch.cat(context))

    def _function(self, key: tuple, bufs: _Buffers) -> Callable:
        """The captured function of a key: reads only `bufs` (and the fixed voice tables)."""
        t2w = self.t2w
        sampling = dict(key[4])
        schedule = ode_schedule(sampling["num_steps"], sampling["sway_coefficient"])
        guidance = sampling["guidance_scale"]
        segments, segment = (
            len(bufs.seg_frames),
            len(bufs.index) // len(bufs.seg_frames),
        )
        zero = torch.zeros(1, t2w.mel_dim, device=t2w.device)

        def window_call() -> tuple[torch.Tensor, torch.Tensor]:
            mel = t2w.solve(
                bufs.x0,
                bufs.codes,
                bufs.frames,
                self._cond[bufs.voice],
                self._ref_enc[bufs.voice],
                self._null_enc[bufs.voice],
                schedule,
                guidance,
            )
            source = torch.cat([bufs.context, mel.reshape(-1, t2w.mel_dim), zero])
            seg = source[bufs.index].reshape(segments, segment, t2w.mel_dim)
            seg = seg.transpose(1, 2).to(t2w.vocoder_dtype)
            with t2w.padded(bufs.seg_frames, segment):
                wav = t2w.vocode(seg)
            return mel, wav.float()

        return window_call
