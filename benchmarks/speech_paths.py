"""The two ways omni-vllm speaks a batch of requests, timed; shared by the speech benchmarks.

    streaming      SpeechEngine.generate(audio=True), at most `concurrency` requests in flight (a
                   new one starts when one ends): the talker follows the thinker token by token,
                   Token2Wav decodes sliding windows across requests. A request's first audio
                   leaves after its first window.
    non-streaming  as omni_vllm.offline.OmniLLM does it, in waves of `concurrency` requests: all
                   text first (rows collected), then the talker over all replies (batched), then
                   one one-shot Token2Wav call (batched); every request's audio exists only at the
                   end of its wave.

Both take the same work: greedy thinker with `tokens` tokens (ignore_eos), greedy talker capped
at `codes` codes, Token2Wav noise seed 1000 + the request's index, StreamConfig's sampler.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

SAMPLE_RATE = 24000


@dataclass
class Run:
    """One batch of requests through one path."""

    wall: float  # seconds until every request has all its text and audio
    ttfa: list[float]  # per request: submitted -> first audio samples
    completion: list[float]  # per request: submitted -> all text and audio
    audio_seconds: float
    text_tokens: int
    busy: dict = field(
        default_factory=dict
    )  # talker_seconds, token2wav_seconds (and calls, streaming)


def sampling(tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


@dataclass
class Engines:
    """What the two paths run on: one AsyncLLM (the thinker) and, per path, its speech modules."""

    engine: object  # vllm AsyncLLM
    config: object  # StreamConfig
    speech: object | None = None  # SpeechEngine (streaming)
    collector: object | None = None  # HiddenStatesCollector (non-streaming)
    talker: object | None = None
    t2w: object | None = None

    async def shutdown(self) -> None:
        if self.speech is not None:
            await self.speech.shutdown()
        self.engine.shutdown()


def start(
    model,
    *,
    device: str,
    dtype: str = "float32",
    max_speaking: int,
    talker_max_len: int,
    max_codes: int,
    kv_cache_bytes: int = 2**30,
    streaming: bool = True,
    non_streaming: bool = True,
) -> Engines:
    """An AsyncLLM on `model` plus the modules of the paths asked for (the rows of non-streaming
    requests reach the collector: the SpeechEngine forwards requests it does not own to it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from omni_vllm.hidden_states import HiddenStatesCollector, set_hidden_states_sink
    from omni_vllm.speech import SpeechEngine
    from omni_vllm.streaming import StreamConfig
    from omni_vllm.talker import Talker
    from omni_vllm.token2wav import Token2Wav

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(model),
            dtype=dtype,
            max_model_len=4096,
            enforce_eager=True,
            enable_prefix_caching=False,
            kv_cache_memory_bytes=kv_cache_bytes,
            limit_mm_per_prompt={"audio": 1, "image": 1, "video": 1},
            disable_log_stats=True,
        )
    )
    out = Engines(engine, StreamConfig())
    if non_streaming:
        out.collector = HiddenStatesCollector()
        set_hidden_states_sink(out.collector)
        out.talker = Talker.from_pretrained(
            model, device=device, max_slots=max_speaking, max_len=talker_max_len
        )
        out.t2w = Token2Wav.from_pretrained(model, device=device)
    if streaming:
        out.speech = SpeechEngine(
            engine,
            model,
            device=device,
            max_speaking=max_speaking,
            stream_config=out.config,
            talker_max_len=talker_max_len,
            max_codes=max_codes,
        )
    return out


async def streaming(
    engines: Engines, prompts, tokens, codes, tag, concurrency: int | None = None
) -> Run:
    """`prompts` through the SpeechEngine, `concurrency` (default: all) in flight at a time."""
    from omni_vllm.talker import TalkerSampling

    speech = engines.speech
    before = speech.stats()
    gate = asyncio.Semaphore(concurrency or len(prompts))
    t0 = time.perf_counter()

    async def one(i, prompt):
        async with gate:
            start, first, samples, n_tokens = time.perf_counter(), None, 0, 0
            async for ch in speech.generate(
                prompt,
                sampling(tokens),
                f"{tag}-{i}",
                audio=True,
                talker_sampling=TalkerSampling(do_sample=False),
                noise=1000 + i,
                max_codes=codes,
            ):
                n_tokens += len(ch.token_ids)
                if ch.audio is not None:
                    first = first or time.perf_counter()
                    samples += len(ch.audio)
            return first - start, time.perf_counter() - start, samples, n_tokens

    res = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    after = speech.stats()
    busy = {
        k: after[k] - before[k]
        for k in ("talker_seconds", "token2wav_seconds", "token2wav_calls")
    }
    return Run(
        wall,
        [r[0] for r in res],
        [r[1] for r in res],
        sum(r[2] for r in res) / SAMPLE_RATE,
        sum(r[3] for r in res),
        busy,
    )


async def non_streaming(
    engines: Engines, prompts, tokens, codes, tag, concurrency: int | None = None
) -> Run:
    """`prompts` in waves of `concurrency` (default: one wave), each the offline path's way."""
    size = concurrency or len(prompts)
    t0 = time.perf_counter()
    ttfa, audio, text, busy = (
        [],
        0.0,
        0,
        dict(talker_seconds=0.0, token2wav_seconds=0.0),
    )
    for w in range(0, len(prompts), size):
        wall, seconds, n_tokens = await _wave(
            engines, prompts[w : w + size], w, tokens, codes, f"{tag}-{w}", busy
        )
        ttfa += [wall] * len(prompts[w : w + size])
        audio, text = audio + seconds, text + n_tokens
    return Run(time.perf_counter() - t0, ttfa, list(ttfa), audio, text, busy)


async def _wave(
    engines: Engines, batch, first_index, tokens, codes, tag, busy
) -> tuple[float, float, int]:
    """Text for all, then the talker for all, then one one-shot Token2Wav call (OmniLLM's way)."""
    from omni_vllm.hidden_states import request_hidden_states
    from omni_vllm.offline import talk
    from omni_vllm.talker import TalkerSampling

    engine, collector, talker, t2w = (
        engines.engine,
        engines.collector,
        engines.talker,
        engines.t2w,
    )
    t0 = time.perf_counter()

    async def thinker(i, prompt):
        async for out in engine.generate(
            prompt, request_hidden_states(sampling(tokens)), f"{tag}-{i}"
        ):
            pass
        return out

    outs = await asyncio.gather(*(thinker(i, p) for i, p in enumerate(batch)))

    def speak():
        t = time.perf_counter()
        result = talk(
            talker,
            outs,
            collector,
            ["Chelsie"] * len(outs),
            [TalkerSampling(do_sample=False)] * len(outs),
            codes,
        )
        ids = [o.request_id for o in outs]
        now = time.perf_counter()
        busy["talker_seconds"] += now - t
        waves = t2w.decode(
            [result[r] for r in ids],
            ["Chelsie"] * len(ids),
            [1000 + first_index + i for i in range(len(ids))],
            **engines.config.sampling(),
        )
        busy["token2wav_seconds"] += time.perf_counter() - now
        return waves

    waves = await asyncio.to_thread(
        speak
    )  # off the event loop, like the engine's worker
    wall = time.perf_counter() - t0
    collector.clear()
    return (
        wall,
        sum(len(w) for w in waves) / SAMPLE_RATE,
        sum(len(o.outputs[0].token_ids) for o in outs),
    )
