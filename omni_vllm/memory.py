"""How much memory the speech path (talker + Token2Wav) needs, from the checkpoint's config alone.

vLLM claims its share of a GPU (`gpu_memory_utilization`, 0.9 by default) when the engine starts,
before our speech path loads beside it in the API server. So the server must know the speech
path's size before it builds the engine: these functions estimate it from a `Qwen2_5OmniConfig`,
and `plan_speech_memory` turns the estimate into the settings of one deployment (how many requests
may speak at once, how much KV the talker may hold, what is left of the device for vLLM).

What is counted (bytes on the speech device):

* weights, each module in its dtype: the parameter counts come from transformers' own modules
  built on the meta device (nothing allocated), so they are exact for any config;
* the talker's KV cache: `max_speaking` requests at the longest length a request can reach
  (prompt <= the thinker's max_model_len, plus its codes, capped by the talker's max_len);
* the talker's activations for one prefill of the longest prompt (MLP intermediate, hidden states,
  its boolean attention mask);
* Token2Wav's peak for the largest window batch (one window per speaking request): the DiT and
  BigVGAN run one after the other, so the larger of the two per window, plus a fixed working set;
  BigVGAN dominates at the real sizes. Measured on CPU with `testing.device_memory` (the tests
  check the estimate against it): at the 7B's sizes one default window costs 27 MiB in the DiT
  (24 of it fixed) and 30 MiB in BigVGAN (fp32);
* a margin: 10 % of the above plus 512 MiB (the API process's CUDA context, allocator slack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from omni_vllm.streaming import StreamConfig

__all__ = [
    "DEFAULT_MAX_SPEAKING",
    "SpeechMemory",
    "SpeechMemoryError",
    "SpeechPlan",
    "estimate_speech_memory",
    "module_parameters",
    "plan_speech_memory",
    "request_positions",
    "speech_dtypes",
    "talker_kv_bytes_per_token",
]

GiB = 2**30
MiB = 2**20
DEFAULT_MAX_SPEAKING = (
    32  # when no budget says otherwise (CPU), and the shared-device default's target
)
MAX_DEFAULT_SPEAKING = (
    128  # a budget-derived default never goes above (Token2Wav batch latency)
)
SHARED_DEVICE_FRACTION = (
    0.25  # default speech share of a device vLLM also uses, at most
)
OWN_DEVICE_FRACTION = (
    0.9  # of a device the speech path has to itself (as vLLM's default utilization)
)
MARGIN_FRACTION, MARGIN_FIXED = 0.10, 512 * MiB
TOKEN2WAV_FIXED = (
    64 * MiB
)  # Token2Wav's working set that does not grow with the batch (24 MiB measured at 7B)
BIGVGAN_LIVE = 12  # live tensors of BigVGAN's largest stage per window (11.3 measured, tiny and 7B)
SpeechDtype = Literal["auto", "float32", "bfloat16"]  # --speech-dtype
SPEECH_DTYPES = get_args(SpeechDtype)


class SpeechMemoryError(ValueError):
    """The speech path does not fit the memory it is given; the message names the flags to change."""


def _itemsize(dtype: torch.dtype | None) -> int:
    return (dtype or torch.float32).itemsize


def speech_dtypes(
    speech_dtype: str | torch.dtype, thinker_dtype: torch.dtype
) -> dict[str, torch.dtype | None]:
    """The dtypes of the speech modules for `--speech-dtype`: `auto` runs the talker in the
    thinker's dtype and Token2Wav in float32 (the reference's); `bfloat16` runs both in bf16
    (BigVGAN in Token2Wav's own measured default: `vocoder` None); `float32` everything in fp32."""
    name = str(speech_dtype).removeprefix("torch.")
    if name == "auto":
        talker = (
            thinker_dtype
            if thinker_dtype in (torch.float32, torch.bfloat16, torch.float16)
            else torch.float32
        )
        return dict(talker=talker, token2wav=torch.float32, vocoder=torch.float32)
    if name == "float32":
        return dict(
            talker=torch.float32, token2wav=torch.float32, vocoder=torch.float32
        )
    if name == "bfloat16":
        return dict(talker=torch.bfloat16, token2wav=torch.bfloat16, vocoder=None)
    raise SpeechMemoryError(
        f"--speech-dtype {speech_dtype!r}: choose one of {', '.join(SPEECH_DTYPES)}"
    )


def module_parameters(config) -> dict[str, tuple[int, int]]:
    """(parameters, buffer elements) of the talker, the DiT and BigVGAN: transformers' modules
    built on the meta device from `config` (a `Qwen2_5OmniConfig`)."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    def count(module) -> tuple[int, int]:
        return sum(p.numel() for p in module.parameters()), sum(
            b.numel() for b in module.buffers()
        )

    with torch.device("meta"):
        talker = ref.Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config)
        t2w = ref.Qwen2_5OmniToken2WavModel(config.token2wav_config)
    return dict(
        talker=count(talker),
        dit=count(t2w.code2wav_dit_model),
        bigvgan=count(t2w.code2wav_bigvgan_model),
    )


def talker_kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one position in every talker layer."""
    t = config.talker_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return t.num_hidden_layers * 2 * t.num_key_value_heads * head_dim * _itemsize(dtype)


def talker_max_len(config, max_len: int | None = None) -> int:
    """The talker's positions per request: `max_len` if given, at most its config's limit."""
    limit = config.talker_config.max_position_embeddings
    return limit if max_len is None else min(max_len, limit)


def request_positions(
    config, *, max_model_len: int, max_codes: int, max_len: int | None = None
) -> int:
    """The most talker positions one request can take: its prompt (at most the thinker's
    max_model_len) plus its codes, capped by the talker's max_len."""
    return min(talker_max_len(config, max_len), max_model_len + max_codes)


def _window_bytes(
    config,
    stream: StreamConfig,
    dit_dtype: torch.dtype,
    vocoder_dtype: torch.dtype | None,
) -> int:
    """Token2Wav's activations per window of a batched call (the larger of DiT and BigVGAN)."""
    dit, voc = (
        config.token2wav_config.dit_config,
        config.token2wav_config.bigvgan_config,
    )
    longest = max(stream.chunk, stream.first)
    frames = dit.repeats * (longest + stream.left_context + stream.look_ahead)
    rows = 2  # classifier-free guidance: conditional and unconditional rows
    per_frame = (
        4 + dit.ff_mult
    ) * dit.hidden_size + 2 * dit.num_attention_heads * frames
    dit_bytes = (
        rows * frames * per_frame * _itemsize(dit_dtype) + rows * frames * frames * 2
    )  # + int16 block_diff
    mel = dit.repeats * longest + stream.vocoder_left + stream.vocoder_right
    channels, length, widest = (
        voc.upsample_initial_channel,
        mel,
        voc.upsample_initial_channel * mel,
    )
    for rate in voc.upsample_rates:
        channels, length = channels // 2, length * rate
        widest = max(widest, channels * length)
    vocoder_bytes = BIGVGAN_LIVE * widest * _itemsize(vocoder_dtype)
    return max(dit_bytes, vocoder_bytes)


@dataclass(frozen=True)
class SpeechMemory:
    """The speech path's memory, bytes, for `max_speaking` requests of up to `positions` each."""

    max_speaking: int
    positions: int
    talker_weights: int
    token2wav_weights: int
    talker_kv: int
    talker_activations: int
    token2wav_peak: int
    kv_per_token: int
    window_bytes: int

    @property
    def subtotal(self) -> int:
        return (
            self.talker_weights
            + self.token2wav_weights
            + self.talker_kv
            + self.talker_activations
            + self.token2wav_peak
        )

    @property
    def margin(self) -> int:
        return int(MARGIN_FRACTION * self.subtotal) + MARGIN_FIXED

    @property
    def total(self) -> int:
        return self.subtotal + self.margin

    @property
    def per_speaker(self) -> int:
        """What one more speaking request adds (its KV, its Token2Wav window), margin included."""
        return int(
            (self.positions * self.kv_per_token + self.window_bytes)
            * (1 + MARGIN_FRACTION)
        )

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("talker weights", self.talker_weights),
            ("Token2Wav weights (DiT + BigVGAN)", self.token2wav_weights),
            (
                f"talker KV ({self.max_speaking} x {self.positions} positions)",
                self.talker_kv,
            ),
            ("talker prefill activations", self.talker_activations),
            (f"Token2Wav peak ({self.max_speaking} windows)", self.token2wav_peak),
            ("margin", self.margin),
            ("total", self.total),
        ]

    def table(self) -> str:
        return "\n".join(
            f"  {name:<44} {nbytes / GiB:8.2f} GiB" for name, nbytes in self.rows()
        )


def estimate_speech_memory(
    config,
    *,
    max_speaking: int,
    positions: int,
    talker_dtype: torch.dtype,
    token2wav_dtype: torch.dtype = torch.float32,
    vocoder_dtype: torch.dtype | None = torch.float32,
    stream: StreamConfig | None = None,
    parameters: dict | None = None,
) -> SpeechMemory:
    """The speech path's memory for `max_speaking` requests of up to `positions` talker positions
    (see `request_positions`). `vocoder_dtype` None (Token2Wav's own default) counts as float32.
    `parameters`: `module_parameters(config)`, when already computed."""
    stream = stream or StreamConfig()
    params = parameters or module_parameters(config)
    fp32 = _itemsize(torch.float32)
    talker_weights = (
        params["talker"][0] * _itemsize(talker_dtype) + params["talker"][1] * fp32
    )
    t2w_weights = (
        params["dit"][0] * _itemsize(token2wav_dtype)
        + params["bigvgan"][0] * _itemsize(vocoder_dtype)
        + (params["dit"][1] + params["bigvgan"][1]) * fp32
    )
    t = config.talker_config
    prompt = max(positions - 1, 1)
    width = 3 * t.intermediate_size + 6 * t.hidden_size + 2 * t.embedding_size
    activations = (
        prompt * width * _itemsize(talker_dtype) + prompt * prompt
    )  # + its boolean mask
    kv_per_token = talker_kv_bytes_per_token(config, talker_dtype)
    window = _window_bytes(config, stream, token2wav_dtype, vocoder_dtype)
    return SpeechMemory(
        max_speaking=max_speaking,
        positions=positions,
        talker_weights=talker_weights,
        token2wav_weights=t2w_weights,
        talker_kv=max_speaking * positions * kv_per_token,
        talker_activations=activations,
        token2wav_peak=TOKEN2WAV_FIXED + max_speaking * window,
        kv_per_token=kv_per_token,
        window_bytes=window,
    )


def slots_that_fit(memory: SpeechMemory, budget: int) -> int:
    """The most speaking requests whose estimate (like `memory`, any max_speaking) fits `budget`."""
    base = replace(memory, max_speaking=0, talker_kv=0, token2wav_peak=TOKEN2WAV_FIXED)
    if base.total > budget:
        return 0
    n = (budget - base.total) // max(memory.per_speaker, 1)
    while n > 0 and _with_speakers(memory, n).total > budget:
        n -= 1
    return int(n)


def _with_speakers(memory: SpeechMemory, n: int) -> SpeechMemory:
    return replace(
        memory,
        max_speaking=n,
        talker_kv=n * memory.positions * memory.kv_per_token,
        token2wav_peak=TOKEN2WAV_FIXED + n * memory.window_bytes,
    )


def _vllm_default_utilization() -> float:
    from vllm.config import CacheConfig

    return CacheConfig.__pydantic_fields__["gpu_memory_utilization"].default


@dataclass(frozen=True)
class SpeechPlan:
    """The speech path's settings for one deployment (see `plan_speech_memory`)."""

    memory: SpeechMemory  # the estimate for `max_speaking`
    max_speaking: int
    budget: (
        int | None
    )  # bytes the speech path may use (None: unbounded, CPU without a budget)
    device: str
    shared: bool  # on a device that vLLM also uses
    gpu_memory_utilization: (
        float | None
    )  # vLLM's, after taking the speech share out (None: unchanged)
    talker_max_len: int
    kv_cache_tokens: int  # the talker's KV positions over all requests
    notes: tuple[str, ...] = ()

    def report(self) -> str:
        where = self.device
        if self.device.startswith("cuda"):
            where += " (shared with vLLM)" if self.shared else " (a GPU of its own)"
        lines = [
            f"speech path memory on {where}, estimated from the checkpoint config:",
            self.memory.table(),
        ]
        if self.budget is not None:
            lines.append(f"  {'speech budget':<44} {self.budget / GiB:8.2f} GiB")
        lines.append(
            f"max_speaking={self.max_speaking}, talker_max_len={self.talker_max_len}, "
            f"talker KV {self.kv_cache_tokens} positions"
        )
        if self.gpu_memory_utilization is not None:
            lines.append(
                f"vLLM gpu_memory_utilization={self.gpu_memory_utilization:.3f} "
                "(the speech share taken out of vLLM's)"
            )
        lines.extend(self.notes)
        return "\n".join(lines)


def plan_speech_memory(
    config,
    *,
    device: str,
    device_total: int | None,
    shared: bool,
    talker_dtype: torch.dtype,
    token2wav_dtype: torch.dtype = torch.float32,
    vocoder_dtype: torch.dtype | None = torch.float32,
    max_model_len: int,
    max_codes: int,
    max_len: int | None = None,
    max_speaking: int | None = None,
    budget_gb: float | None = None,
    gpu_memory_utilization: float | None = None,
    vllm_utilization: float | None = None,
    stream: StreamConfig | None = None,
) -> SpeechPlan:
    """Settle the speech path's memory for one deployment, before vLLM's engine is built.

    `device_total`: bytes of the speech device (None on CPU: no device share to plan).
    `shared`: vLLM's workers use that device too. `gpu_memory_utilization`: the user's value, or None
    for vLLM's default (`vllm_utilization`: vLLM 0.32's CacheConfig says 0.92) less the speech
    share. `budget_gb` (`--speech-gpu-memory-gb`) bounds the
    speech path; by default it is what `max_speaking` needs, where the default `max_speaking` is what
    fits: on a device of its own 90 % of it, on a shared device at most 25 % of it (enough for
    `DEFAULT_MAX_SPEAKING` requests if that is less), on CPU `DEFAULT_MAX_SPEAKING`.

    Raises SpeechMemoryError, naming the flags to change, when nothing fits."""
    positions = request_positions(
        config, max_model_len=max_model_len, max_codes=max_codes, max_len=max_len
    )
    estimate = estimate_speech_memory(
        config,
        max_speaking=max_speaking or DEFAULT_MAX_SPEAKING,
        positions=positions,
        talker_dtype=talker_dtype,
        token2wav_dtype=token2wav_dtype,
        vocoder_dtype=vocoder_dtype,
        stream=stream,
    )
    budget = None if budget_gb is None else int(budget_gb * GiB)
    notes: list[str] = []
    fix = (
        "give it more with --speech-gpu-memory-gb, lower --max-speaking, --max-model-len or --talker-max-len, "
        "use --speech-dtype bfloat16, put it on its own GPU with --speech-device, or serve text only with "
        "--allow-text-only"
    )
    if budget is None and device_total is not None and max_speaking is None:
        if shared:
            budget = min(
                int(SHARED_DEVICE_FRACTION * device_total),
                _with_speakers(estimate, DEFAULT_MAX_SPEAKING).total,
            )
        else:
            budget = int(OWN_DEVICE_FRACTION * device_total)
    if max_speaking is None:
        if budget is None:
            max_speaking = DEFAULT_MAX_SPEAKING
        else:
            max_speaking = min(slots_that_fit(estimate, budget), MAX_DEFAULT_SPEAKING)
            if max_speaking < 1:
                base = _with_speakers(estimate, 0).total
                raise SpeechMemoryError(
                    f"the speech path needs {base / GiB:.2f} GiB before its first speaking request "
                    f"({estimate.per_speaker / GiB:.2f} GiB more per request) but has {budget / GiB:.2f} GiB on "
                    f"{device}: {fix}"
                )
    if max_speaking < 1:
        raise SpeechMemoryError("--max-speaking must be >= 1")
    memory = _with_speakers(estimate, max_speaking)
    if budget is None:
        budget = memory.total if device_total is not None else None
    elif memory.total > budget:
        raise SpeechMemoryError(
            f"the speech path needs {memory.total / GiB:.2f} GiB for --max-speaking {max_speaking} (weights "
            f"{(memory.talker_weights + memory.token2wav_weights) / GiB:.2f} GiB, talker KV "
            f"{memory.talker_kv / GiB:.2f} "
            f"GiB) but has {budget / GiB:.2f} GiB on {device}: {fix}"
        )

    utilization = None
    if shared and device_total is not None and budget is not None:
        share = budget / device_total
        if gpu_memory_utilization is None:
            default = (
                vllm_utilization
                if vllm_utilization is not None
                else _vllm_default_utilization()
            )
            utilization = math.floor((default - share) * 1000) / 1000
            if utilization < 0.05:
                raise SpeechMemoryError(
                    f"the speech path's {budget / GiB:.2f} GiB leaves vLLM {utilization:.3f} of {device}: {fix}"
                )
        elif gpu_memory_utilization + share > 0.98:
            raise SpeechMemoryError(
                f"--gpu-memory-utilization {gpu_memory_utilization} leaves "
                f"{(1 - gpu_memory_utilization) * device_total / GiB:.2f} "
                f"GiB of {device} but the speech path needs {budget / GiB:.2f} GiB: lower --gpu-memory-utilization to "
                f"{max(0.0, 0.98 - share):.3f} or less, or {fix}"
            )
        else:
            notes.append(
                f"--gpu-memory-utilization {gpu_memory_utilization} given: left as is"
            )
    return SpeechPlan(
        memory=memory,
        max_speaking=max_speaking,
        budget=budget,
        device=device,
        shared=shared,
        gpu_memory_utilization=utilization,
        talker_max_len=positions,
        kv_cache_tokens=max_speaking * positions,
        notes=tuple(notes),
    )


def main(argv: list[str] | None = None) -> None:
    """Print the speech path's memory plan as a Markdown table: `python -m omni_vllm.memory
    [CHECKPOINT_DIR | 7B | 3B ...] [--gpu-gb 80] [--max-model-len 8192 ...]` (7B/3B: the released
    checkpoints' sizes, nothing downloaded). Each row: the speech path on the GPU vLLM uses, and on
    a GPU of its own (`--speech-device cuda:1`)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models", nargs="*", default=["7B", "3B"])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GiB of each GPU")
    parser.add_argument("--max-model-len", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--max-audio-tokens", type=int, default=4096)
    parser.add_argument("--speech-dtype", choices=SPEECH_DTYPES, default="auto")
    args = parser.parse_args(argv)
    print(
        "| model | --max-model-len | speech device | weights GiB | talker KV GiB / request | "
        "Token2Wav GiB / window | --max-speaking | speech GiB | vLLM gpu_memory_utilization |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        if model in ("7B", "3B"):
            from omni_vllm.testing.released import released_config

            config, name = released_config(model), f"Qwen2.5-Omni-{model}"
        else:
            from transformers import Qwen2_5OmniConfig

            config, name = Qwen2_5OmniConfig.from_pretrained(model), model
        dtypes = speech_dtypes(args.speech_dtype, torch.bfloat16)
        for max_model_len in args.max_model_len:
            for device, shared in (("cuda:0", True), ("cuda:1", False)):
                plan = plan_speech_memory(
                    config,
                    device=device,
                    device_total=int(args.gpu_gb * GiB),
                    shared=shared,
                    talker_dtype=dtypes["talker"],
                    token2wav_dtype=dtypes["token2wav"],
                    vocoder_dtype=dtypes["vocoder"],
                    max_model_len=max_model_len,
                    max_codes=args.max_audio_tokens,
                )
                m = plan.memory
                util = (
                    "unchanged"
                    if plan.gpu_memory_utilization is None
                    else f"{plan.gpu_memory_utilization:.3f}"
                )
                where = "the thinker's GPU" if shared else "its own GPU"
                print(
                    f"| {name} | {max_model_len} | {where} | {(m.talker_weights + m.token2wav_weights) / GiB:.2f} | "
                    f"{m.positions * m.kv_per_token / GiB:.2f} | {m.window_bytes / GiB:.3f} | {plan.max_speaking} | "
                    f"{plan.budget / GiB:.1f} | {util} |"
                )


if __name__ == "__main__":
    main()
