"""Streaming SpeechEngine vs the non-streaming speech path, at several concurrencies.

Both paths share one AsyncLLM (the thinker, real vLLM engine) and get the same requests: the same
prompts, greedy thinker with `--tokens` tokens (ignore_eos), greedy talker capped at `--codes`
codes, the same per-request Token2Wav noise seeds, the same sampler (StreamConfig defaults). The
paths themselves (benchmarks/speech_paths.py, shared with benchmarks/e2e.py), per concurrency c,
with c requests submitted at once:

    streaming      SpeechEngine.generate(audio=True): the talker follows the thinker token by
                   token, Token2Wav decodes sliding windows across requests.
    non-streaming  as omni_vllm.offline.OmniLLM does it: all text first, then the talker over all
                   replies (batched), then one one-shot Token2Wav call (batched); every request's
                   audio exists only at the end.

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
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # this checkout's packages (patches/ too)

import torch  # noqa: E402
from speech_paths import non_streaming, start, streaming  # noqa: E402

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
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"{TEXTS[i % len(TEXTS)]} ({i})"}
                    ],
                }
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        out.append({"prompt": text})
    return out


async def main(args) -> list[dict]:
    from transformers import AutoProcessor

    model = args.model
    if model is None:
        from omni_vllm.testing.tiny import build_tiny_checkpoint

        model = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-omni", seed=0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engines = start(
        model,
        device=device,
        dtype=args.dtype,
        max_speaking=max(args.concurrency),
        talker_max_len=args.tokens + args.codes + 512,
        max_codes=args.codes,
    )
    config = engines.config
    processor = AutoProcessor.from_pretrained(model)

    warm = prompts(processor, 2)
    await streaming(engines, warm, 16, 60, "warm-s")
    await non_streaming(engines, warm, 16, 60, "warm-n")

    rows = []
    for conc in args.concurrency:
        batch = prompts(processor, conc)
        for path in ("non-streaming", "streaming"):
            run = streaming if path == "streaming" else non_streaming
            r = await run(engines, batch, args.tokens, args.codes, f"{path[0]}{conc}")
            row = dict(
                concurrency=conc,
                path=path,
                ttfa_p50=statistics.median(r.ttfa),
                ttfa_max=max(r.ttfa),
                total_s=r.wall,
                audio_s=r.audio_seconds,
                x_real_time=r.audio_seconds / r.wall,
                **r.busy,
            )
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: round(v, 3) if isinstance(v, float) else v
                        for k, v in row.items()
                    }
                ),
                flush=True,
            )
    await engines.shutdown()

    print(
        f"\nmodel {model}, device {device}, torch threads {torch.get_num_threads()}, "
        f"{args.tokens} thinker tokens and {args.codes} talker codes ({args.codes / 50:.1f} s of speech) "
        f"per request; StreamConfig defaults (chunk {config.chunk}, {config.num_steps} ODE points)\n"
    )
    print(
        "| conc | path          | TTFA p50 s | TTFA max s | total s | audio s | x real time | talker s | token2wav s (calls) |"
    )
    print(
        "|-----:|---------------|-----------:|-----------:|--------:|--------:|------------:|---------:|--------------------:|"
    )
    for r in rows:
        calls = (
            f" ({r['token2wav_calls']:3d})" if "token2wav_calls" in r else " " * 6
        )  # streaming only
        extra = f"{r['talker_seconds']:8.2f} | {r['token2wav_seconds']:13.2f}{calls}"
        print(
            f"| {r['concurrency']:4d} | {r['path']:13} | {r['ttfa_p50']:10.2f} | {r['ttfa_max']:10.2f} | "
            f"{r['total_s']:7.2f} | {r['audio_s']:7.2f} | {r['x_real_time']:11.2f} | {extra} |"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="checkpoint directory (default: build the tiny random one)"
    )
    parser.add_argument(
        "--device", help="speech path device (default cuda if available)"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--tokens", type=int, default=128, help="thinker tokens per request"
    )
    parser.add_argument(
        "--codes",
        type=int,
        default=150,
        help="talker codes per request (50 per second)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in this process"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(main(args))
