"""Streaming SpeechEngine vs the non-streaming speech path, at several concurrencies.

Both paths share one AsyncLLM (the thinker, real vLLM engine) and get the same requests: the same
prompts, greedy thinker with `--tokens` tokens (ignore_eos), greedy talker capped at `--codes`
codes, the same per-request Token2Wav noise seeds, the same sampler (StreamConfig defaults).

    streaming      SpeechEngine.generate(audio=True) for all requests at once: the talker follows
                   the thinker token by token, Token2Wav decodes sliding windows across requests.
    non-streaming  as omni_vllm.offline.OmniLLM does it: all text first (rows collected), then
                   the talker over all replies (batched), then one one-shot Token2Wav call
                   (batched); every request's audio exists only at the end.

Columns: TTFA p50 / max: time from submitting a request to its first audio samples; total: wall
time until every request has all its text and audio; audio s: seconds of speech produced;
x real time: audio seconds per wall second (all requests together). For the streaming path also
the worker's talker / Token2Wav busy seconds.

    python benchmarks/speech_engine.py                       # tiny random checkpoint, CPU
    python benchmarks/speech_engine.py --model DIR --device cuda --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages (patches/ too)

import torch  # noqa: E402

TEXTS = [
    "Hello, how are you today?",
    "Please describe the weather like a poet.",
    "Tell me about the quick brown fox.",
    "What can you hear in this sound?",
    "Count from zero to nine, slowly.",
    "Qwen Omni thinks in text and speaks with a talker.",
]


def prompts(processor, n: int) -> list[dict]:
    out = []
    for i in range(n):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": f"{TEXTS[i % len(TEXTS)]} ({i})"}]}],
            add_generation_prompt=True, tokenize=False,
        )
        out.append({"prompt": text})
    return out


def sampling(tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


async def streaming(speech, batch, tokens, codes, tag):
    """All requests at once through the SpeechEngine."""
    from omni_vllm.talker import TalkerSampling

    before = speech.stats()
    t0 = time.perf_counter()

    async def one(i, prompt):
        start, first, samples = time.perf_counter(), None, 0
        async for ch in speech.generate(prompt, sampling(tokens), f"{tag}-{i}", audio=True,
                                        talker_sampling=TalkerSampling(do_sample=False), noise=1000 + i,
                                        max_codes=codes):
            if ch.audio is not None:
                first = first or time.perf_counter()
                samples += len(ch.audio)
        return first - start, samples

    res = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
    wall = time.perf_counter() - t0
    after = speech.stats()
    busy = {k: after[k] - before[k] for k in ("talker_seconds", "token2wav_seconds", "token2wav_calls")}
    return [r[0] for r in res], wall, sum(r[1] for r in res) / 24000, busy


async def non_streaming(engine, collector, talker, t2w, batch, tokens, codes, tag, config):
    """Text for all, then the talker for all, then one one-shot Token2Wav call (OmniLLM's way)."""
    from omni_vllm.hidden_states import request_hidden_states
    from omni_vllm.talker import TalkerSampling

    t0 = time.perf_counter()

    async def thinker(i, prompt):
        async for out in engine.generate(prompt, request_hidden_states(sampling(tokens)), f"{tag}-{i}"):
            pass
        return out

    outs = await asyncio.gather(*(thinker(i, p) for i, p in enumerate(batch)))

    def speak():
        result = {o.request_id: [] for o in outs}
        pending = list(outs)
        while pending or talker.ready():
            while pending and talker.num_free_slots:
                out = pending.pop(0)
                rows = collector.rows(out.request_id)
                n = len(out.prompt_token_ids)
                talker.add_request(out.request_id, prompt_ids=torch.tensor(out.prompt_token_ids),
                                   prompt_embeds=rows[:n, 0], prompt_hidden=rows[:n, 1],
                                   prompt_positions=collector.prompt_positions(out.request_id),
                                   sampling=TalkerSampling(do_sample=False), max_codes=codes)
                for row in rows[n:]:
                    talker.add_thinker_token(out.request_id, row[0], row[1])
                talker.finish_thinker(out.request_id)
            for rid, step in talker.step().items():
                if step.code is not None:
                    result[rid].append(step.code)
        ids = [o.request_id for o in outs]
        return t2w.decode([result[r] for r in ids], ["Chelsie"] * len(ids), [1000 + i for i in range(len(ids))],
                          **config.sampling())

    waves = await asyncio.to_thread(speak)  # off the event loop, like the engine's worker
    wall = time.perf_counter() - t0
    collector.clear()
    return [wall] * len(batch), wall, sum(len(w) for w in waves) / 24000


async def main(args) -> list[dict]:
    from transformers import AutoProcessor
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from omni_vllm.hidden_states import HiddenStatesCollector, set_hidden_states_sink
    from omni_vllm.speech import SpeechEngine
    from omni_vllm.streaming import StreamConfig
    from omni_vllm.talker import Talker
    from omni_vllm.token2wav import Token2Wav

    model = args.model
    if model is None:
        from omni_vllm.testing.tiny import build_tiny_checkpoint

        model = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-omni", seed=0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    top = max(args.concurrency)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), dtype=args.dtype, max_model_len=4096, enforce_eager=True, enable_prefix_caching=False,
        kv_cache_memory_bytes=2**30, limit_mm_per_prompt={"audio": 1, "image": 1, "video": 1}, disable_log_stats=True,
    ))
    # The baseline's rows: SpeechEngine forwards requests it does not own to the previous sink.
    collector = HiddenStatesCollector()
    set_hidden_states_sink(collector)
    config = StreamConfig()
    speech = SpeechEngine(engine, model, device=device, max_speaking=top, stream_config=config,
                          talker_max_len=args.tokens + args.codes + 512, max_codes=args.codes)
    talker = Talker.from_pretrained(model, device=device, max_slots=top, max_len=args.tokens + args.codes + 512)
    t2w = Token2Wav.from_pretrained(model, device=device)
    processor = AutoProcessor.from_pretrained(model)

    warm = prompts(processor, 2)
    await streaming(speech, warm, 16, 60, "warm-s")
    await non_streaming(engine, collector, talker, t2w, warm, 16, 60, "warm-n", config)

    rows = []
    for conc in args.concurrency:
        batch = prompts(processor, conc)
        for path in ("non-streaming", "streaming"):
            if path == "streaming":
                ttfa, wall, audio, busy = await streaming(speech, batch, args.tokens, args.codes, f"s{conc}")
            else:
                ttfa, wall, audio = await non_streaming(engine, collector, talker, t2w, batch, args.tokens,
                                                        args.codes, f"n{conc}", config)
                busy = {}
            row = dict(concurrency=conc, path=path, ttfa_p50=statistics.median(ttfa), ttfa_max=max(ttfa),
                       total_s=wall, audio_s=audio, x_real_time=audio / wall, **busy)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    await speech.shutdown()
    engine.shutdown()

    print(f"\nmodel {model}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{args.tokens} thinker tokens and {args.codes} talker codes ({args.codes / 50:.1f} s of speech) "
          f"per request; StreamConfig defaults (chunk {config.chunk}, {config.num_steps} ODE points)\n")
    print("| conc | path          | TTFA p50 s | TTFA max s | total s | audio s | x real time | talker s | token2wav s (calls) |")
    print("|-----:|---------------|-----------:|-----------:|--------:|--------:|------------:|---------:|--------------------:|")
    for r in rows:
        extra = (f"{r['talker_seconds']:8.2f} | {r['token2wav_seconds']:13.2f} ({r['token2wav_calls']:3d})"
                 if "talker_seconds" in r else f"{'':8} | {'':19}")
        print(f"| {r['concurrency']:4d} | {r['path']:13} | {r['ttfa_p50']:10.2f} | {r['ttfa_max']:10.2f} | "
              f"{r['total_s']:7.2f} | {r['audio_s']:7.2f} | {r['x_real_time']:11.2f} | {extra} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: build the tiny random one)")
    parser.add_argument("--device", help="speech path device (default cuda if available)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=128, help="thinker tokens per request")
    parser.add_argument("--codes", type=int, default=150, help="talker codes per request (50 per second)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(main(args))
