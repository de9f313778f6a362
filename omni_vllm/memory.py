"""How much memory the speech path (talker + Token2Wav) needs, from the checkpoint's config alone.

vLLM claims its share of a GPU (`gpu_memory_utilization`, 0.9 by default) when the engine starts,
before our speech path loads beside it in the API server. So the server must know the speech
path's size before it builds the engine: these functions estimate it from a `Qwen2_5OmniConfig`,
and `plan_speech_memory` turns the estimate into the settings of one deployment (how many requests
may speak at once, how much KV the talker may hold, what is left of the device for vLLM).

What is counted (bytes on the speech device):

* weights, each module in its dtype: the parameter counts come from transformers' own modules
  built on the meta device (nothing allocated), so they are exact for any config;
* the talker's KV pool (omni_vllm.talker_kv_cache), allocated once: whatever the budget leaves
  after everything else, as vLLM gives its KV cache what is left after weights and activations.
  It is sized by use, not by a worst case: requests take blocks as they grow, wait for blocks when
  the pool is full and are preempted (recomputed later) rather than cut off. It must hold the
  longest request the server accepts (prompt <= the thinker's max_model_len, plus its codes,
  capped by the talker's max_len); the plan reports how many typical voices it holds (a prompt of
  500 tokens and 10 s of speech);
* the talker's activations for one prefill of the longest prompt (MLP intermediate, hidden states,
  its attention mask), and its decode workspace: a step of `max_speaking` requests at the longest
  length gathers one layer's keys and values (omni_vllm.talker_attention), the captured graphs'
  shared pool holds that once;
* Token2Wav's peak for the largest window batch (one window per speaking request): the DiT and
  BigVGAN run one after the other, so the larger of the two per window, plus a fixed working set;
  BigVGAN dominates at the real sizes. Measured on CPU with `testing.device_memory` (the tests
  check the estimate against it): at the 7B's sizes one default window costs 27 MiB in the DiT
  (24 of it fixed) and 30 MiB in BigVGAN (fp32). Captured on CUDA, a window call's activations
  live in the graphs' one shared pool, which the largest bucket sizes: this same peak;
* a margin: 10 % of the above plus 512 MiB (the API process's CUDA context, allocator slack).

`--max-speaking` is the most requests one talker step batches (the largest captured bucket and
Token2Wav window batch), not a memory reservation: its default follows the pool (the typical
voices it holds) and the device (64 on a GPU shared with vLLM, 256 on a GPU of its own, 32 on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from omni_vllm.streaming import StreamConfig
from omni_vllm.talker_kv_cache import BLOCK_SIZE, round_up

__all__ = [
    "DEFAULT_MAX_SPEAKING",
    "SpeechMemory",
    "SpeechMemoryError",
    "SpeechPlan",
    "TYPICAL_POSITIONS",
    "estimate_speech_memory",
    "pool_that_fits",
    "module_parameters",
    "plan_speech_memory",
    "request_positions",
    "speech_dtypes",
    "talker_kv_bytes_per_token",
]

GiB = 2**30
MiB = 2**20
# --max-speaking by default: on CPU; on a GPU shared with vLLM; on a GPU of its own (the most
# requests a talker step batches and a Token2Wav call decodes; fewer if the pool holds fewer)
DEFAULT_MAX_SPEAKING = 32
SHARED_MAX_SPEAKING = 64
OWN_MAX_SPEAKING = 256
# default speech share of a device vLLM also uses
SHARED_DEVICE_FRACTION = 0.25
# of a device the speech path has to itself (as vLLM's default utilization)
OWN_DEVICE_FRACTION = 0.9
# a typical voice turn: a 500-token prompt and 10 s of speech (50 codes/s), + speaker bos, reply[0]
TYPICAL_PROMPT, TYPICAL_CODES = 500, 500
TYPICAL_POSITIONS = TYPICAL_PROMPT + TYPICAL_CODES + 2
# talker KV positions per block of the pool
KV_BLOCK = BLOCK_SIZE
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
    """The speech path's memory, bytes: a KV pool of `pool_tokens` positions, steps of up to
    `max_speaking` requests of up to `positions` each."""

    max_speaking: int
    positions: int
    pool_tokens: int
    talker_weights: int
    token2wav_weights: int
    talker_activations: int
    decode_workspace_per_position: int
    token2wav_peak_fixed: int
    kv_per_token: int
    window_bytes: int

    @property
    def talker_kv(self) -> int:
        """The pool as allocated: its blocks and the null block."""
        return (self.pool_tokens + KV_BLOCK) * self.kv_per_token

    @property
    def decode_workspace(self) -> int:
        return self.max_speaking * self.positions * self.decode_workspace_per_position

    @property
    def token2wav_peak(self) -> int:
        return self.token2wav_peak_fixed + self.max_speaking * self.window_bytes

    @property
    def typical_voices(self) -> int:
        """Typical voice turns (prompt 500 tokens + 10 s of speech) the pool holds at once."""
        return self.pool_tokens // TYPICAL_POSITIONS

    @property
    def subtotal(self) -> int:
        return (
            self.talker_weights
            + self.token2wav_weights
            + self.talker_kv
            + self.talker_activations
            + self.decode_workspace
            + self.token2wav_peak
        )

    @property
    def margin(self) -> int:
        return int(MARGIN_FRACTION * self.subtotal) + MARGIN_FIXED

    @property
    def total(self) -> int:
        return self.subtotal + self.margin

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("talker weights", self.talker_weights),
            ("Token2Wav weights (DiT + BigVGAN)", self.token2wav_weights),
            (
                f"talker KV pool ({self.pool_tokens} positions, "
                f"{self.typical_voices} typical voices)",
                self.talker_kv,
            ),
            ("talker prefill activations", self.talker_activations),
            (
                f"talker decode workspace ({self.max_speaking} x {self.positions})",
                self.decode_workspace,
            ),
            (f"Token2Wav peak ({self.max_speaking} windows)", self.token2wav_peak),
            ("margin", self.margin),
            ("total", self.total),
        ]

    def table(self) -> str:
        return "\n".join(
            f"  {name:<52} {nbytes / GiB:8.2f} GiB" for name, nbytes in self.rows()
        )


def estimate_speech_memory(
    config,
    *,
    max_speaking: int,
    positions: int,
    pool_tokens: int | None = None,
    talker_dtype: torch.dtype,
    token2wav_dtype: torch.dtype = torch.float32,
    vocoder_dtype: torch.dtype | None = torch.float32,
    stream: StreamConfig | None = None,
    parameters: dict | None = None,
) -> SpeechMemory:
    """The speech path's memory for steps of `max_speaking` requests of up to `positions` talker
    positions (see `request_positions`) and a KV pool of `pool_tokens` positions (None:
    `max_speaking` x `positions`). `vocoder_dtype` None (Token2Wav's own default) counts as
    float32. `parameters`: `module_parameters(config)`, when already computed."""
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
    # + its boolean mask
    activations = prompt * width * _itemsize(talker_dtype) + prompt * prompt
    kv_per_token = talker_kv_bytes_per_token(config, talker_dtype)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    # per decode row and key position: one layer's gathered keys and values, and the fp32
    # scores (with their mask and softmax) of every query head
    workspace = (
        2 * t.num_key_value_heads * head_dim * _itemsize(talker_dtype)
        + 3 * t.num_attention_heads * fp32
    )
    window = _window_bytes(config, stream, token2wav_dtype, vocoder_dtype)
    if pool_tokens is None:
        pool_tokens = max_speaking * positions
    return SpeechMemory(
        max_speaking=max_speaking,
        positions=positions,
        pool_tokens=pool_tokens,
        talker_weights=talker_weights,
        token2wav_weights=t2w_weights,
        talker_activations=activations,
        decode_workspace_per_position=workspace,
        token2wav_peak_fixed=TOKEN2WAV_FIXED,
        kv_per_token=kv_per_token,
        window_bytes=window,
    )


def pool_that_fits(memory: SpeechMemory, budget: int) -> int:
    """The most KV pool positions (whole blocks) with which `memory` (any pool) fits `budget`."""
    without = replace(memory, pool_tokens=-KV_BLOCK)
    room = (budget - MARGIN_FIXED) / (1 + MARGIN_FRACTION) - without.subtotal
    tokens = int(room // memory.kv_per_token) - KV_BLOCK
    tokens -= tokens % KV_BLOCK
    while tokens > 0 and replace(memory, pool_tokens=tokens).total > budget:
        tokens -= KV_BLOCK
    return max(tokens, 0)


def _vllm_default_utilization() -> float:
    from vllm.config import CacheConfig

    return CacheConfig.__pydantic_fields__["gpu_memory_utilization"].default


@dataclass(frozen=True)
class SpeechPlan:
    """The speech path's settings for one deployment (see `plan_speech_memory`)."""

    memory: SpeechMemory
    max_speaking: int
    # bytes the speech path may use (None: unbounded, CPU without a budget)
    budget: int | None
    device: str
    # on a device that vLLM also uses
    shared: bool
    # vLLM's, after taking the speech share out (None: unchanged)
    gpu_memory_utilization: float | None
    talker_max_len: int
    # the talker's KV pool, positions
    kv_cache_tokens: int
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
            lines.append(f"  {'speech budget':<52} {self.budget / GiB:8.2f} GiB")
        lines.append(
            f"max_speaking={self.max_speaking}, talker_max_len={self.talker_max_len}, "
            f"talker KV pool {self.kv_cache_tokens} positions ({self.memory.typical_voices} "
            f"typical voices of {TYPICAL_PROMPT} prompt tokens + {TYPICAL_CODES // 50} s of "
            "speech); max_speaking: the most requests one talker step batches"
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
    share. `budget_gb` (`--speech-gpu-memory-gb`) bounds the speech path; by default it is 25 % of
    a shared device, 90 % of a device of its own. The talker's KV pool gets what the budget leaves
    (on CPU: `max_speaking` typical voices, at least one longest request); `max_speaking` by
    default is 64 (shared) / 256 (own) / 32 (CPU), fewer if the pool holds fewer typical voices.

    Raises SpeechMemoryError, naming the flags to change, when nothing fits."""
    positions = request_positions(
        config, max_model_len=max_model_len, max_codes=max_codes, max_len=max_len
    )
    on_device = device_total is not None
    if max_speaking is not None and max_speaking < 1:
        raise SpeechMemoryError("--max-speaking must be >= 1")
    default_speaking = (
        DEFAULT_MAX_SPEAKING
        if not on_device
        else SHARED_MAX_SPEAKING
        if shared
        else OWN_MAX_SPEAKING
    )
    estimate = estimate_speech_memory(
        config,
        max_speaking=max_speaking or default_speaking,
        positions=positions,
        pool_tokens=0,
        talker_dtype=talker_dtype,
        token2wav_dtype=token2wav_dtype,
        vocoder_dtype=vocoder_dtype,
        stream=stream,
    )
    budget = None if budget_gb is None else int(budget_gb * GiB)
    if budget is None and on_device:
        fraction = SHARED_DEVICE_FRACTION if shared else OWN_DEVICE_FRACTION
        budget = int(fraction * device_total)
    notes: list[str] = []
    fix = (
        "give it more with --speech-gpu-memory-gb, lower --max-speaking, --max-model-len or --talker-max-len, "
        "use --speech-dtype bfloat16, put it on its own GPU with --speech-device, or serve text only with "
        "--allow-text-only"
    )
    if budget is None:
        pool = max(estimate.max_speaking * TYPICAL_POSITIONS, positions)
        memory = replace(estimate, pool_tokens=round_up(pool, KV_BLOCK))
    else:

        def sized(n: int) -> SpeechMemory:
            m = replace(estimate, max_speaking=n)
            return replace(m, pool_tokens=pool_that_fits(m, budget))

        def holds(m: SpeechMemory) -> bool:
            return m.typical_voices >= m.max_speaking and m.pool_tokens >= positions

        memory = sized(estimate.max_speaking)
        if max_speaking is None and not holds(memory):
            # fewer speakers per step free workspace for the pool: the most n whose pool holds
            # n typical voices and the longest request (the pool shrinks as n grows)
            lo, hi = 1, memory.max_speaking
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if holds(sized(mid)) else (lo, mid - 1)
            memory = sized(lo)
        if memory.pool_tokens < positions:
            longest = replace(memory, pool_tokens=round_up(positions, KV_BLOCK))
            raise SpeechMemoryError(
                f"the speech path needs {longest.total / GiB:.2f} GiB to hold one request of "
                f"{positions} talker positions with --max-speaking {memory.max_speaking} (weights "
                f"{(memory.talker_weights + memory.token2wav_weights) / GiB:.2f} GiB) but has "
                f"{budget / GiB:.2f} GiB on {device}: {fix}"
            )
    max_speaking = memory.max_speaking

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
        kv_cache_tokens=memory.pool_tokens,
        notes=tuple(notes),
    )


_current_plan: SpeechPlan | None = None
_planned = False
_disabled: str | None = None


def set_current_plan(plan: SpeechPlan | None, *, disabled: str | None = None) -> None:
    """Record this process's plan (the API server's, made before vLLM builds its engine), for the
    speech engine built later in the same process: its KV pool is the plan's. `disabled`: why
    there is none (the plan did not fit and text only was allowed)."""
    global _current_plan, _planned, _disabled
    _current_plan, _planned, _disabled = plan, True, disabled


def current_plan() -> SpeechPlan | None:
    return _current_plan


def planned() -> bool:
    """Whether this process made its plan (or decided it has none)."""
    return _planned


def disabled_reason() -> str | None:
    return _disabled


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
        "| model | --max-model-len | speech device | weights GiB | talker KV GiB / longest request | "
        "talker KV pool GiB | longest requests it holds | concurrent typical voices (pool holds) | "
        "--max-speaking | speech GiB | vLLM gpu_memory_utilization |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
                voices = min(m.typical_voices, plan.max_speaking)
                print(
                    f"| {name} | {max_model_len} | {where} | "
                    f"{(m.talker_weights + m.token2wav_weights) / GiB:.2f} | "
                    f"{m.positions * m.kv_per_token / GiB:.2f} | {m.talker_kv / GiB:.1f} | "
                    f"{m.pool_tokens // m.positions} | {voices} ({m.typical_voices}) | "
                    f"{plan.max_speaking} | {plan.budget / GiB:.1f} | {util} |"
                )


if __name__ == "__main__":
    main()
