"""Batched Token2Wav: Qwen2.5-Omni codec codes -> 24 kHz waveform, many requests per call.

The networks are transformers' own (`Qwen2_5OmniToken2WavModel`: the DiT flow-matching mel
generator and the BigVGAN vocoder), built from the checkpoint's `token2wav_config` and loaded with
the checkpoint's `token2wav.*` tensors unchanged. transformers decodes one request at a time (one
voice, one length per call, noise drawn inside). What this module adds is batching:

* DiT: requests of different lengths are right-padded into one batch. The only op that mixes time
  steps is the block attention, whose mask the reference derives from `block_diff` (block index
  of key minus block index of query, blocks of `block_size` mel frames counted from position 0).
  Right padding keeps every real frame's block index; we hand the reference decoder layers a
  `block_diff` in which (real query, padded key) pairs are pushed out of every layer's
  look-back/look-ahead window, so real rows never see padding (padded rows still see themselves,
  so no attention row is empty). Everything else is per frame. The speaker encoder (ECAPA) reads
  only the voice's `ref_mel`, so it is run once per voice and cached instead of once per ODE
  evaluation; this also lets voices with different `ref_mel` lengths share a batch.
* BigVGAN: padding alone cannot be exact there: every conv zero-pads and every anti-aliased
  activation replicate-pads its *own intermediate activations* at the sequence end, and no choice
  of input padding reproduces those intermediates. Forward pre-hooks on those modules therefore
  re-impose each row's boundary (zeros beyond the row's length before a conv, the row's last value
  beyond it before a resampler), which makes the padded batch compute exactly what a lone
  request computes. The vocoder's own code runs unchanged. At the real size on a CPU batching makes
  BigVGAN slower per request: `vocoder_batch` caps the requests per call.

Sampling is the reference's: `num_steps=10` time points (9 RK4 steps) on the cosine-warped
("sway") schedule, classifier-free guidance 0.5. The RK4 loop is transformers'
`RungeKutta4ODESolver` arithmetic, written out here (`rk4_solve`) with its schedule computed once
on the host (`ode_schedule`: python floats holding the float32 values the reference computes):
the reference's solver compares time-point tensors every step (a host sync each on a GPU), which
a captured window call cannot contain. The ODE state sees the same float32 operations in the same
order, so the mel equals the solver's bit for bit on the CPU.

Dtypes: the DiT runs in `dtype` and BigVGAN in `vocoder_dtype`, separately, because they do not
gain alike from bf16 (the DiT is matmuls; BigVGAN is convolutions and elementwise Snake
activations that bf16 slows down on CPU). What stays float32 whatever they are: the speaker
encodings (computed once per voice in float32), RoPE frequencies, the time step's sinusoids, the
ODE state and its RK4 updates (each velocity is cast back to float32), and the mel and waveform
returned. transformers runs all of Token2Wav in float32; bf16's mel error against it is measured
in benchmarks/real_size.py and bounded in tests/test_token2wav.py.

Initial noise is injectable per request (a tensor, a `torch.Generator`, an int seed, or None for
the global RNG). The reference draws `torch.randn([1, 2 * num_codes, mel_dim])` on the codes'
device as its first random call, so `noise=seed` here equals `torch.manual_seed(seed)` right
before the reference call (CPU; on CUDA the default CUDA generator likewise).

Sliding-window streaming can reuse `code2mel` on windows of codes (left context + look-ahead,
aligned to `block_size / repeats` codes) with the matching slice of a per-request noise tensor,
then `mel2wav` on the kept mel frames plus vocoder context.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from omni_vllm.checkpoint import load_prefixed
from omni_vllm.voices import load_speakers

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
# BigVGAN's dtype when none is given: float32, the reference's. At the real size on this project's
# CPU (AVX-512 BF16, one thread) bf16 was no faster: 3.8-11.9 vs 4.6-10.3 s per audio second in an
# interleaved A/B on a shared machine, within noise (transformers' own vocoder: 10.6 vs 5.2 s per
# 2 s in bf16 vs fp32), while the DiT gains 3.8x from bf16. On CUDA benchmarks/real_size.py
# measures both.
DEFAULT_VOCODER_DTYPE = torch.float32

NoiseSource = torch.Tensor | torch.Generator | int | None


def fast_cuda_defaults(device: torch.device | str) -> bool:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores in this process (the
    speech path's: vLLM sets TF32 only in its own workers, and the API server's process would
    otherwise run Token2Wav's float32 DiT, ~4 TFLOP per streaming window, at full FP32). The choice
    over bf16: TF32 keeps float32 weights and the reference's float32 arithmetic around the
    matmuls (10 mantissa bits in the products instead of bf16's 7 everywhere), so its error is
    below bf16's (mel SNR 48.8 dB at the real size on the CPU, README) at no memory cost; bf16
    stays `--speech-dtype bfloat16`. Returns whether it switched anything (not off CUDA)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


class RK4Step(NamedTuple):
    """One RK4 step's times, python floats equal to the reference's float32 tensors."""

    start: float
    step: float  # end - start
    end: float
    third: float  # start + step / 3, where k2 is evaluated
    two_thirds: float  # start + 2 step / 3, where k3 is evaluated


@functools.lru_cache(maxsize=32)
def ode_schedule(num_steps: int, sway_coefficient: float | None) -> tuple[RK4Step, ...]:
    """The flow-matching solve's RK4 steps, computed once on the host: `num_steps` time points on
    [0, 1] (cosine-warped by `sway_coefficient`), each value computed as the reference computes it
    (float32 tensors on the CPU), then read out once as python floats."""
    points = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    if sway_coefficient is not None:
        points += sway_coefficient * (torch.cos(torch.pi / 2 * points) - 1 + points)
    start, end = points[:-1], points[1:]
    step = end - start
    third = start + step * (1 / 3)
    two_thirds = start + step * (2 / 3)
    columns = (start, step, end, third, two_thirds)
    return tuple(RK4Step(*row) for row in zip(*(c.tolist() for c in columns)))


def rk4_solve(
    velocity: Callable[[float, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    schedule: Sequence[RK4Step],
) -> torch.Tensor:
    """The state at the last time point: transformers' `RungeKutta4ODESolver.integrate(...)[-1]`
    with the same float32 operations in the same order (its `_rk4_step`; the interpolation it does
    at each time point returns the step's end value, since the time points are the step ends), but
    no tensor comparison: `velocity(t, x)` gets the time as a python float."""
    x = x0
    for t in schedule:
        k1 = velocity(t.start, x)
        k2 = velocity(t.third, x + t.step * k1 * (1 / 3))
        k3 = velocity(t.two_thirds, x + t.step * (k2 - k1 * (1 / 3)))
        k4 = velocity(t.end, x + t.step * (k1 - k2 + k3))
        x = x + (k1 + 3 * (k2 + k3) + k4) * t.step / 8
    return x


@dataclass
class _Voice:
    """Per-voice DiT inputs that never change: `cond`, and the speaker encoder's outputs for
    `ref_mel` (conditional branch) and for zeros (the guidance's unconditional branch)."""

    cond: torch.Tensor  # (enc_emb_dim,)
    ref_enc: torch.Tensor  # (enc_dim,)
    null_enc: torch.Tensor  # (enc_dim,)


class Token2Wav:
    """Qwen2.5-Omni Token2Wav (DiT + BigVGAN) decoding many requests of different lengths at once."""

    def __init__(
        self,
        config,
        state_dict: dict[str, torch.Tensor],
        speakers: dict,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        vocoder_dtype: torch.dtype | None = None,
    ):
        """`config`: a `Qwen2_5OmniToken2WavConfig`; `state_dict`: its weights without the
        `token2wav.` prefix; `speakers`: the `spk_dict.pt` table. `dtype` is the DiT's compute dtype,
        `vocoder_dtype` BigVGAN's (None: `DEFAULT_VOCODER_DTYPE`); see the module docstring. Inputs
        and outputs (noise, ODE state, mel, waveform) stay float32 whatever the dtypes."""
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

        self._ref = ref
        self.model = ref.Qwen2_5OmniToken2WavModel(config)
        self.model.load_state_dict(state_dict, strict=True)
        self.model.float().eval().to(device)
        self.dit = self.model.code2wav_dit_model
        self.bigvgan = self.model.code2wav_bigvgan_model
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocoder_dtype = (
            DEFAULT_VOCODER_DTYPE if vocoder_dtype is None else vocoder_dtype
        )
        # Most requests per BigVGAN call (None: all). At the real size on a CPU batching makes the
        # vocoder slower per request (one thread: 16 requests cost 2.78 s per audio s one per call,
        # 3.40 in calls of 4, 7.20 in one call: its activations outgrow the caches), so set 1 there;
        # small checkpoints gain from one call (per-call overhead dominates), hence no CPU default.
        self.vocoder_batch: int | None = None
        self.mel_dim = self.dit.mel_dim
        self.repeats = self.dit.repeats  # mel frames per code
        self.block_size = self.dit.block_size  # attention block, in mel frames
        self.hop = 1
        for rate in self.bigvgan.config.upsample_rates:
            self.hop *= rate  # waveform samples per mel frame (240)

        self._voices = {}
        with torch.no_grad():
            for name, spk in speakers.items():
                ref_mel = (
                    spk["ref_mel"]
                    .to(self.device, torch.float32)
                    .reshape(1, -1, self.mel_dim)
                )
                encoder = self.dit.input_embed.spk_encoder
                self._voices[name] = _Voice(
                    cond=spk["cond"].to(self.device, torch.float32).reshape(-1),
                    ref_enc=encoder(ref_mel)[0],
                    null_enc=encoder(torch.zeros_like(ref_mel))[0],
                )
        # Voices are encoded in float32 above (once per voice); then the networks take their
        # compute dtypes. RoPE frequencies stay float32 (a bf16 inv_freq would shift every angle).
        inv_freq = self.dit.rotary_embed.inv_freq.clone()
        self.dit.to(dtype)
        self.dit.rotary_embed.inv_freq = inv_freq
        self.bigvgan.to(self.vocoder_dtype)
        # the reference's amplitude_to_db floor (-115 dB), uploaded per call there: once here
        self._db_floor = torch.exp(
            torch.tensor(-115 / 20.0 * np.log(10), dtype=self.vocoder_dtype)
        ).to(self.device)

        # BigVGAN boundary hooks (see module docstring); active only during a padded call.
        self._frames: torch.Tensor | None = (
            None  # mel frames per row of the padded batch
        )
        self._max_frames = 0
        # (keep mask, per-row length) per layer time resolution, built once per padded call
        self._tails: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._exact_padding = True
        zero = (nn.Conv1d, nn.ConvTranspose1d)
        replicate = (ref.Qwen2_5OmniUpSample1d, ref.Qwen2_5OmniDownSample1d)
        pointwise = (ref.Qwen2_5OmniSnakeBeta,)
        for module in self.bigvgan.modules():
            if isinstance(module, zero):
                module.register_forward_pre_hook(self._zero_tail)
            elif isinstance(module, replicate):
                module.register_forward_pre_hook(self._replicate_tail)
            elif not list(module.children()) and not isinstance(module, pointwise):
                self._exact_padding = (
                    False  # unknown leaf: fall back to one call per length
                )
        if not self._exact_padding:
            logger.warning(
                "Unknown BigVGAN layer type: vocoding one batch per distinct length."
            )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        vocoder_dtype: torch.dtype | None = None,
    ) -> Token2Wav:
        """Load from a Qwen2.5-Omni checkpoint directory (config.json, safetensors, spk_dict.pt)."""
        from transformers import Qwen2_5OmniConfig

        model_dir = Path(model_dir)
        config = Qwen2_5OmniConfig.from_pretrained(model_dir).token2wav_config
        return cls(
            config,
            load_prefixed(model_dir, "token2wav."),
            load_speakers(model_dir),
            device=device,
            dtype=dtype,
            vocoder_dtype=vocoder_dtype,
        )

    @property
    def voices(self) -> list[str]:
        return list(self._voices)

    def _voice(self, name: str) -> _Voice:
        if name not in self._voices:
            raise ValueError(
                f"Unknown voice {name!r}; available voices: {', '.join(self.voices)}"
            )
        return self._voices[name]

    def noise(self, num_codes: int, noise: NoiseSource = None) -> torch.Tensor:
        """Initial ODE state (1, repeats * num_codes, mel_dim) for one request, drawn exactly as the
        reference draws it, or the given tensor checked and moved to the device."""
        shape = (1, num_codes * self.repeats, self.mel_dim)
        if isinstance(noise, torch.Tensor):
            if noise.numel() != shape[1] * shape[2]:
                raise ValueError(
                    f"noise for {num_codes} codes must have shape {shape}, got {tuple(noise.shape)}"
                )
            return noise.to(self.device, torch.float32).reshape(shape)
        if isinstance(noise, int):
            noise = torch.Generator(device=self.device).manual_seed(noise)
        if isinstance(noise, torch.Generator):
            return torch.randn(shape, generator=noise, device=noise.device).to(
                self.device
            )
        return torch.randn(shape, device=self.device)

    # ----------------------------------------------------------------------------------- DiT

    def _block_diff(self, frames: torch.Tensor, length: int) -> torch.Tensor:
        """The reference's block_diff, with (real query, padded key) pairs out of every window."""
        pos = torch.arange(length, device=self.device)
        block = (pos // self.block_size).to(
            torch.int16
        )  # |diff| <= max_position_embeddings / block_size
        diff = (block[None, :] - block[:, None]).expand(len(frames), length, length)
        valid = pos[None, :] < frames[:, None]  # (B, T)
        hide = valid[:, :, None] & ~valid[:, None, :]
        beyond = 1 + max(
            layer.look_ahead_block for layer in self.dit.transformer_blocks
        )
        # (B, 1, T, T): the layers' masks broadcast over heads instead of materialising them.
        return diff.masked_fill(hide, beyond)[:, None]

    def _code_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """The DiT's `text_embed` (codec embedding, each code repeated for its mel frames), with
        the repeat as a broadcast copy instead of `repeat_interleave`, which may read its
        repeat count back from the device (not allowed in a captured call). The same values."""
        embed = self.dit.text_embed.codec_embed(codes)
        batch, length, dim = embed.shape
        return (
            embed[:, :, None]
            .expand(batch, length, self.repeats, dim)
            .reshape(batch, length * self.repeats, dim)
        )

    def _time_embedding(self, time_step: torch.Tensor) -> torch.Tensor:
        """The DiT's `time_embed` for a float32 time step (in bf16, 1000 * t would be off by up to
        2): the reference feeds its sinusoids to `time_mlp` in the time step's dtype, we in the DiT's."""
        embed = self.dit.time_embed
        hidden = embed.time_embed(time_step.float()).to(self.dtype)
        for layer in embed.time_mlp:
            hidden = layer(hidden)
        return hidden

    @torch.no_grad()
    def code2mel(
        self,
        codes: Sequence[torch.Tensor | Sequence[int]],
        voices: Sequence[str],
        noise: Sequence[NoiseSource] | None = None,
        *,
        num_steps: int = 10,
        guidance_scale: float = 0.5,
        sway_coefficient: float | None = -1.0,
    ) -> list[torch.Tensor]:
        """Mel spectrograms (mel_dim, repeats * len(codes[i])), one batched flow-matching solve.

        Defaults are the reference's: 10 time points (9 RK4 steps), guidance 0.5, sway -1."""
        if len(voices) != len(codes) or (
            noise is not None and len(noise) != len(codes)
        ):
            raise ValueError("codes, voices and noise must have one entry per request")
        batch = len(codes)
        spk = [self._voice(v) for v in voices]
        codes = [
            torch.as_tensor(c, device=self.device).reshape(-1).long() for c in codes
        ]
        if any(len(c) == 0 for c in codes):
            raise ValueError("every request needs at least one code")
        frames = [len(c) * self.repeats for c in codes]
        length = max(frames)
        if length > self.dit.config.max_position_embeddings:
            raise ValueError(
                f"Requested mel length ({length}) exceeds dit max_position_embeddings "
                f"({self.dit.config.max_position_embeddings})"
            )
        all_codes = torch.cat(codes)
        if (
            all_codes.min() < 0
            or all_codes.max() >= self.dit.text_embed.codec_embed.num_embeddings
        ):
            raise ValueError("codec code out of range of the DiT codec embedding")

        code_pad = torch.zeros(
            batch, length // self.repeats, dtype=torch.long, device=self.device
        )
        x0 = torch.zeros(batch, length, self.mel_dim, device=self.device)
        for i, c in enumerate(codes):
            code_pad[i, : len(c)] = c
            x0[i, : frames[i]] = self.noise(
                len(c), None if noise is None else noise[i]
            )[0]
        frames_t = torch.tensor(frames, device=self.device)

        cond = torch.stack([s.cond for s in spk])
        ref_enc = torch.stack([s.ref_enc for s in spk])
        null_enc = torch.stack([s.null_enc for s in spk])
        mel = self.solve(
            x0,
            code_pad,
            frames_t,
            cond,
            ref_enc,
            null_enc,
            ode_schedule(num_steps, sway_coefficient),
            guidance_scale,
        )  # (B, T, mel_dim)
        return [mel[i, : frames[i]].T.contiguous() for i in range(batch)]

    def solve(
        self,
        x0: torch.Tensor,
        code_pad: torch.Tensor,
        frames: torch.Tensor,
        cond: torch.Tensor,
        ref_enc: torch.Tensor,
        null_enc: torch.Tensor,
        schedule: Sequence[RK4Step],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The flow-matching solve of a right-padded batch, device ops only (no host read, no
        upload: a captured window call runs it on static buffers). `x0`: (B, T, mel_dim) float32
        noise, `code_pad`: (B, T / repeats) codes, `frames`: (B,) real mel frames per row,
        `cond` / `ref_enc` / `null_enc`: per-row voice inputs (float32). Returns the (B, T,
        mel_dim) float32 mel."""
        length = x0.shape[1]
        # Everything but the ODE state is fixed over the solve: build it once. Rows are
        # [conditional; unconditional] as in the reference's `DiTInputEmbedding` (apply_cfg=True).
        cfg = guidance_scale >= 1e-5
        cond, ref_enc = cond.to(self.dtype), ref_enc.to(self.dtype)
        code_embed = self._code_embed(code_pad)
        if cfg:
            cond = torch.cat([cond, torch.zeros_like(cond)])
            ref_enc = torch.cat([ref_enc, null_enc.to(self.dtype)])
            code_embed = torch.cat(
                [code_embed, self._code_embed(torch.zeros_like(code_pad))]
            )
            frames = torch.cat([frames, frames])
        rows = len(frames)
        static = torch.cat(
            (
                ref_enc[:, None].expand(-1, length, -1),
                code_embed,
                cond[:, None].expand(-1, length, -1),
            ),
            dim=-1,
        )
        position_ids = torch.arange(length, device=x0.device)[None].expand(rows, -1)
        position_embeddings = self.dit.rotary_embed(static, position_ids)
        block_diff = self._block_diff(frames, length)

        def velocity(time: float, x: torch.Tensor) -> torch.Tensor:
            """The reference's DiT forward (minus the cached speaker encoder) plus guidance, in the
            DiT's dtype; the ODE state and the returned velocity are float32."""
            x = x.to(self.dtype)
            hidden = torch.cat([x, x]) if cfg else x
            hidden = self.dit.input_embed.proj(torch.cat((hidden, static), dim=-1))
            time_step = torch.full((rows,), time, dtype=torch.float32, device=x.device)
            time_embedding = self._time_embedding(time_step)
            for layer in self.dit.transformer_blocks:
                hidden = layer(
                    hidden,
                    time_embedding,
                    position_embeddings=position_embeddings,
                    block_diff=block_diff,
                )
            out = self.dit.proj_out(self.dit.norm_out(hidden, time_embedding)).float()
            if not cfg:
                return out
            guided, null = torch.chunk(out, 2, dim=0)
            return guided + (guided - null) * guidance_scale

        return rk4_solve(velocity, x0, schedule)

    # ------------------------------------------------------------------------------- BigVGAN

    def _tail(self, x: torch.Tensor):
        """(keep mask, per-row length) at this layer's time resolution, or None if not padded."""
        if self._frames is None:
            return None
        size = x.shape[-1]
        tail = self._tails.get(size)  # the layers at one resolution share it
        if tail is None:
            scale, rest = divmod(size, self._max_frames)
            assert rest == 0, "BigVGAN layer length is not a multiple of the mel length"
            lengths = self._frames * scale
            keep = (
                torch.arange(size, device=x.device)[None, None, :]
                < lengths[:, None, None]
            )
            tail = self._tails[size] = (keep, lengths)
        return tail

    def _zero_tail(self, module, args):
        tail = self._tail(args[0])
        if tail is not None:
            return (torch.where(tail[0], args[0], 0.0), *args[1:])

    def _replicate_tail(self, module, args):
        tail = self._tail(args[0])
        if tail is not None:
            x = args[0]
            index = (tail[1] - 1)[:, None, None].expand(-1, x.shape[1], 1)
            return (torch.where(tail[0], x, x.gather(-1, index)), *args[1:])

    @torch.no_grad()
    def mel2wav(self, mels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Float32 waveforms (hop * frames_i,) at 24 kHz, one batched BigVGAN call; returned on the
        CPU (transformers' vocoder moves its output there). At most `vocoder_batch` per call."""
        step = self.vocoder_batch
        if step and len(mels) > step:
            return [
                wav
                for i in range(0, len(mels), step)
                for wav in self.mel2wav(mels[i : i + step])
            ]
        frames = [m.shape[-1] for m in mels]
        if not self._exact_padding and len(set(frames)) > 1:
            out = [None] * len(mels)
            for n in sorted(set(frames)):
                idx = [i for i, f in enumerate(frames) if f == n]
                for i, wav in zip(idx, self.mel2wav([mels[i] for i in idx])):
                    out[i] = wav
            return out
        length = max(frames)
        batch = torch.zeros(
            len(mels),
            self.mel_dim,
            length,
            device=self.device,
            dtype=self.vocoder_dtype,
        )
        for i, m in enumerate(mels):
            batch[i, :, : frames[i]] = m.reshape(self.mel_dim, -1)
        if len(set(frames)) > 1:
            with self.padded(torch.tensor(frames, device=self.device), length):
                wav = self.vocode(batch)
        else:
            wav = self.vocode(batch)
        # one device->host copy for the batch (the reference's vocoder copies each call)
        wav = wav.cpu()
        return [wav[i, : frames[i] * self.hop].float() for i in range(len(mels))]

    @contextlib.contextmanager
    def padded(self, frames: torch.Tensor, length: int):
        """BigVGAN calls inside (on `length` mel frames) re-impose each row's boundary at
        `frames[i]` mel frames; the hooks read only this device tensor, so that a captured call
        keeps it in a static buffer."""
        self._frames, self._max_frames = frames, length
        try:
            yield
        finally:
            self._frames = None
            self._tails.clear()

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """BigVGAN's forward on a (B, mel_dim, T) batch in the vocoder's dtype: (B, hop * T)
        waveforms on the device. transformers' forward with its two host transfers left out (the
        `torch.tensor` upload of the dB floor, held here as a device buffer, and the final
        `.cpu()`), so that a captured window call can contain it; the same ops otherwise."""
        voc = self.bigvgan
        amplitude = torch.exp(mel)
        decibel = 20 * torch.log10(torch.clamp(amplitude, min=self._db_floor)) - 20
        hidden = voc.conv_pre(voc.normalize_spectrogram(decibel, 1, -115))
        for stage in range(voc.num_upsample_layers):
            hidden = voc.ups[stage][0](hidden)
            residual = sum(
                voc.resblocks[stage * voc.num_residual_blocks + block](hidden)
                for block in range(voc.num_residual_blocks)
            )
            hidden = residual / voc.num_residual_blocks
        wav = voc.conv_post(voc.activation_post(hidden))
        return torch.clamp(wav, min=-1.0, max=1.0).reshape(len(mel), -1)

    @torch.no_grad()
    def decode(
        self,
        codes: Sequence[torch.Tensor | Sequence[int]],
        voices: Sequence[str],
        noise: Sequence[NoiseSource] | None = None,
        **sampling,
    ) -> list[torch.Tensor]:
        """Codes -> waveforms for a batch of requests (`code2mel` then `mel2wav`)."""
        return self.mel2wav(self.code2mel(codes, voices, noise, **sampling))

    __call__ = decode
