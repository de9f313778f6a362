"""End to end: omni-vllm against transformers' Qwen2.5-Omni `generate` on the same requests.

Three systems, each in its own fresh process (so that its peak memory is its own), one after the
other on the same machine in one run, on the same `--requests` user turns (text, audio and image
in turn; media made in code), each with the same work: `--tokens` thinker tokens (greedy, EOS
ignored / suppressed) and at most `--codes` talker codes (greedy; random weights never stop on
their own, and throughput is counted in audio actually produced anyway):

    reference      transformers' Qwen2_5OmniForConditionalGeneration.generate, one request at a
                   time (the two 5.19 talker bugs corrected: omni_vllm.testing.reference). It
                   returns text and audio only at the end, so its time to first audio IS its
                   completion time.
    streaming      omni-vllm's server path: SpeechEngine over vLLM's AsyncLLM, at each
                   `--concurrency` c (c requests in flight, a new one when one ends).
    non-streaming  omni-vllm's offline path (OmniLLM's way) on the same AsyncLLM set-up, in waves
                   of c requests: all audio exists at the end of its wave.
    (the two omni-vllm paths: benchmarks/speech_paths.py, shared with benchmarks/speech_engine.py)

Reported per system and concurrency: audio seconds per wall second, time to first audio p50 (and
completion p50), thinker tokens per second, audio seconds per CPU second (the whole process tree:
vLLM's EngineCore too; steadier than wall time on a shared machine), peak RSS (process tree,
sampled) and, where measured, busy seconds of thinker / talker / Token2Wav. Ratios: streaming
throughput at the highest concurrency / reference (target >= 8x) and streaming TTFA p50 /
non-streaming completion p50 per concurrency (target <= 15%). Writes e2e.md, e2e.json, e2e.png
and one log per system to `--out`.

Equal cores: each system gets every core of the machine. The reference is one process, so it
runs `--reference-threads` torch threads (default: all cores). omni-vllm is two processes (vLLM's
EngineCore running the thinker, and the process whose SpeechEngine worker runs talker and
Token2Wav), each with `--threads` torch threads (default: half the cores, at least 1), so that
together they use the same cores and never more threads than cores (which spin and stall); the
speech worker takes every core while no request is in the thinker (omni_vllm.speech). The
reference runs in `--reference-dtype` (default `--dtype`; its Token2Wav is float32 whatever it is,
as transformers runs it). Audio seconds per CPU second is reported beside wall time.

    python benchmarks/e2e.py          # bench checkpoint (omni_vllm.testing.tiny --bench), built
                                      # once into .cache/bench-omni
    python benchmarks/e2e.py --model DIR --device cuda --requests 64 --concurrency 1 8 32 64

The speech path at the real model's sizes (which the bench checkpoint's widths / 8 do not show):
benchmarks/real_size.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages (patches/ too)

from meters import Meter, cores, gpu_peak_mib, sync  # noqa: E402

SYSTEMS = ("reference", "streaming", "non-streaming")
SAMPLE_RATE = 24000
# Warm-up (first calls, processors, allocator): three requests, one per kind, at this size.
WARM_TOKENS, WARM_CODES = 4, 48


# ---------------------------------------------------------------------------------------------
# The requests
# ---------------------------------------------------------------------------------------------

QUESTIONS = {
    "text": [
        "Hello, how are you today?",
        "Please describe the weather like a poet.",
        "Count from zero to nine.",
    ],
    "audio": ["What can you hear in this sound?", "Is this a voice or a tone?"],
    "image": ["What is in this picture?", "Describe the colours of this image."],
}


def requests(n: int) -> list:
    """`n` user turns, text / audio / image in turn, every one different (no prefix reuse)."""
    from omni_vllm.testing import media
    from omni_vllm.testing.cases import Case

    out = []
    for i in range(n):
        kind = ("text", "audio", "image")[i % 3]
        qs = QUESTIONS[kind]
        text = {"type": "text", "text": f"{qs[i // 3 % len(qs)]} ({i})"}
        if kind == "text":
            out.append(Case(f"text-{i}", [text]))
        elif kind == "audio":
            out.append(
                Case(
                    f"audio-{i}",
                    [{"type": "audio"}, text],
                    audio=[media.tone(2.0, freq=220.0 + 20 * i)],
                )
            )
        else:
            out.append(
                Case(
                    f"image-{i}",
                    [{"type": "image"}, text],
                    images=[media.image(seed=i)],
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# Measuring a worker process
# ---------------------------------------------------------------------------------------------


def _row(
    concurrency, run_wall, ttfa, completion, audio_s, tokens, cpu_s, peak_mib, **busy
) -> dict:
    return dict(
        concurrency=concurrency,
        requests=len(completion),
        wall_s=run_wall,
        audio_s=audio_s,
        text_tokens=tokens,
        audio_per_wall=audio_s / run_wall,
        ttfa_p50=statistics.median(ttfa),
        ttfa_max=max(ttfa),
        completion_p50=statistics.median(completion),
        tokens_per_s=tokens / run_wall,
        cpu_s=cpu_s,
        audio_per_cpu=audio_s / cpu_s if cpu_s else None,
        peak_rss_mib=peak_mib,
        **busy,
    )


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def reference_worker(args) -> dict:
    """transformers' generate, one request at a time; thinker and Token2Wav timed, talker = rest."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    from omni_vllm.testing.cases import hf_inputs
    from omni_vllm.testing.reference import corrected_reference

    meter = Meter()
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        args.model, dtype=getattr(torch, args.reference_dtype)
    )
    model.to(args.device).eval()
    processor = Qwen2_5OmniProcessor.from_pretrained(args.model)
    busy = dict(thinker=0.0, token2wav=0.0)

    def timed(name, fn):
        def call(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(args.device)
                busy[name] += time.perf_counter() - t

        return call

    model.thinker.generate = timed("thinker", model.thinker.generate)
    model.token2wav.forward = timed("token2wav", model.token2wav.forward)

    def one(case, tokens, codes):
        t = time.perf_counter()
        inputs = hf_inputs(processor, case).to(args.device)
        with corrected_reference(model), torch.no_grad():
            seq, wave = model.generate(
                **inputs,
                speaker="Chelsie",
                thinker_max_new_tokens=tokens,
                thinker_min_new_tokens=tokens,
                thinker_do_sample=False,
                talker_max_new_tokens=codes,
                talker_do_sample=False,
            )
        wave = wave.float().cpu()
        return (
            time.perf_counter() - t,
            wave.numel() / SAMPLE_RATE,
            seq.shape[1] - inputs["input_ids"].shape[1],
        )

    cases = requests(args.requests)
    for case in cases[:3]:
        one(case, WARM_TOKENS, WARM_CODES)
    meter.phase()
    busy.update(thinker=0.0, token2wav=0.0)
    cpu0 = meter.cpu_seconds()
    t0 = time.perf_counter()
    done = [one(case, args.tokens, args.codes) for case in cases]
    wall = time.perf_counter() - t0
    peak, cpu1 = meter.phase()
    total = sum(d[0] for d in done)
    row = _row(
        1,
        wall,
        [d[0] for d in done],
        [d[0] for d in done],
        sum(d[1] for d in done),
        sum(d[2] for d in done),
        cpu1 - cpu0,
        peak,
        thinker_s=busy["thinker"],
        token2wav_s=busy["token2wav"],
        talker_s=total - busy["thinker"] - busy["token2wav"],
    )
    return dict(rows=[row], gpu_peak_mib=gpu_peak_mib())


async def omni_worker(args, path: str) -> dict:
    """One omni-vllm path on its own AsyncLLM, at every concurrency in turn."""
    from speech_paths import non_streaming, start, streaming
    from transformers import AutoProcessor

    from omni_vllm.testing.cases import vllm_prompt

    meter = Meter()
    engines = start(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_speaking=max(args.concurrency),
        talker_max_len=args.tokens + args.codes + 512,
        max_codes=args.codes,
        kv_cache_bytes=args.kv_cache_bytes,
        streaming=path == "streaming",
        non_streaming=path == "non-streaming",
    )
    run = streaming if path == "streaming" else non_streaming
    try:
        processor = AutoProcessor.from_pretrained(args.model)
        prompts = [vllm_prompt(processor, case) for case in requests(args.requests)]
        await run(engines, prompts[:3], WARM_TOKENS, WARM_CODES, "warm")
        rows = []
        for c in args.concurrency:
            _, cpu0 = meter.phase()
            r = await run(
                engines, prompts, args.tokens, args.codes, f"c{c}", concurrency=c
            )
            peak, cpu1 = meter.phase()
            busy = {
                f"{k.removesuffix('_seconds')}_s": v
                for k, v in r.busy.items()
                if k.endswith("_seconds")
            }
            rows.append(
                _row(
                    c,
                    r.wall,
                    r.ttfa,
                    r.completion,
                    r.audio_seconds,
                    r.text_tokens,
                    cpu1 - cpu0,
                    peak,
                    **busy,
                )
            )
            print(f"{path} c={c}: " + json.dumps(_rounded(rows[-1])), flush=True)
    finally:
        await engines.shutdown()
    return dict(rows=rows, gpu_peak_mib=gpu_peak_mib())


def worker(args) -> None:
    import torch

    torch.set_num_threads(
        args.threads
    )  # before vLLM starts: its CPU worker forbids changing it later
    t = time.perf_counter()
    if args.worker == "reference":
        result = reference_worker(args)
    else:
        result = asyncio.run(omni_worker(args, args.worker))
    result.update(
        system=args.worker,
        seconds=time.perf_counter() - t,
        threads=torch.get_num_threads(),
    )
    Path(args.result).write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------
# The parent: checkpoint, workers, report
# ---------------------------------------------------------------------------------------------


def bench_checkpoint(path: Path) -> Path:
    """The bench checkpoint at `path`, built once (again when its builder or BENCH_SIZES change)."""
    from omni_vllm.testing.tiny import BENCH_SIZES, cached_checkpoint

    return cached_checkpoint(
        path,
        BENCH_SIZES,
        on_build=lambda p: print(
            f"building the bench checkpoint into {p} (once)", flush=True
        ),
    )


def run_worker(system: str, args, out: Path) -> dict:
    result, log = out / f"e2e-{system}.json", out / f"e2e-{system}.log"
    threads = args.reference_threads if system == "reference" else args.threads
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        system,
        "--result",
        str(result),
        "--model",
        str(args.model),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(threads),
        "--reference-dtype",
        args.reference_dtype,
        "--requests",
        str(args.requests),
        "--tokens",
        str(args.tokens),
        "--codes",
        str(args.codes),
        "--kv-cache-bytes",
        str(args.kv_cache_bytes),
        "--concurrency",
        *map(str, args.concurrency),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    print(f"{system}: running (log {log})", flush=True)
    t = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
        ).returncode
    if rc != 0:
        sys.stdout.write("".join(log.read_text().splitlines(keepends=True)[-40:]))
        raise SystemExit(f"{system} worker failed (exit {rc}); log: {log}")
    print(f"{system}: done in {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(result.read_text())


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def ratios(results: dict) -> dict:
    ref = results["reference"]["rows"][0]
    stream = {r["concurrency"]: r for r in results["streaming"]["rows"]}
    batch = {r["concurrency"]: r for r in results["non-streaming"]["rows"]}
    top = max(stream)
    out = dict(
        top_concurrency=top,
        throughput=stream[top]["audio_per_wall"] / ref["audio_per_wall"],
        throughput_per_cpu=stream[top]["audio_per_cpu"] / ref["audio_per_cpu"],
        ttfa_over_completion={
            c: stream[c]["ttfa_p50"] / batch[c]["completion_p50"]
            for c in stream
            if c in batch
        },
        ttfa_vs_reference={
            c: stream[c]["ttfa_p50"] / ref["completion_p50"] for c in stream
        },
    )
    return out


# The report's columns: header, row key, format.
COLUMNS = [
    ("conc", "concurrency", "{}"),
    ("audio s / wall s", "audio_per_wall", "{:.3f}"),
    ("TTFA p50 s", "ttfa_p50", "{:.2f}"),
    ("done p50 s", "completion_p50", "{:.2f}"),
    ("text tok/s", "tokens_per_s", "{:.1f}"),
    ("audio s / CPU s", "audio_per_cpu", "{:.3f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("thinker s", "thinker_s", "{:.1f}"),
    ("talker s", "talker_s", "{:.1f}"),
    ("token2wav s", "token2wav_s", "{:.1f}"),
]


def table(results: dict, r: dict, args) -> str:
    lines = [
        f"model {args.model}; device {args.device}; equal cores ({cores()}): reference one process of "
        f"{args.reference_threads} torch thread(s) in {args.reference_dtype}, omni-vllm two processes of "
        f"{args.threads} in {args.dtype}; "
        f"{args.requests} requests (text / audio / image in turn), {args.tokens} thinker tokens and at most "
        f"{args.codes} talker codes ({args.codes / 50:.1f} s of speech) each",
        "",
        "| system | " + " | ".join(header for header, _, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for system in SYSTEMS:
        name = system if system == "reference" else f"omni-vllm {system}"
        for row in results[system]["rows"]:
            cells = [
                "" if row.get(key) is None else fmt.format(row[key])
                for _, key, fmt in COLUMNS
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    top = r["top_concurrency"]
    lines += [
        "",
        f"- throughput, omni-vllm streaming c={top} / reference, equal cores: **{r['throughput']:.2f}x** (target >= 8x); "
        f"per CPU second: {r['throughput_per_cpu']:.2f}x",
        "- streaming TTFA p50 / non-streaming completion p50: "
        + ", ".join(f"c={c}: **{v:.1%}**" for c, v in r["ttfa_over_completion"].items())
        + " (target <= 15%)",
        "- streaming TTFA p50 / reference completion p50: "
        + ", ".join(f"c={c}: {v:.1%}" for c, v in r["ttfa_vs_reference"].items()),
        "",
        "thinker / talker / token2wav s: busy seconds (reference: inside generate, talker = the rest; omni-vllm: "
        "the speech path's talker steps and Token2Wav calls, on the speech worker's thread; its thinker runs in vLLM's processes "
        "beside them).",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["reference"]["rows"][0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, style in (("streaming", "o-"), ("non-streaming", "s--")):
        rows = results[system]["rows"]
        conc = [r["concurrency"] for r in rows]
        a.plot(
            conc,
            [r["audio_per_wall"] for r in rows],
            style,
            label=f"omni-vllm {system}",
        )
        key = "ttfa_p50" if system == "streaming" else "completion_p50"
        b.plot(
            conc,
            [r[key] for r in rows],
            style,
            label="omni-vllm streaming: first audio"
            if system == "streaming"
            else "omni-vllm non-streaming: done",
        )
    a.axhline(
        ref["audio_per_wall"],
        color="grey",
        ls=":",
        label="transformers reference (one at a time)",
    )
    b.axhline(
        ref["completion_p50"],
        color="grey",
        ls=":",
        label="transformers reference: done",
    )
    a.set(
        xlabel="concurrency",
        ylabel="audio seconds per wall second",
        xscale="log",
        title="Throughput",
    )
    a.set_ylim(bottom=0)
    b.set(
        xlabel="concurrency",
        ylabel="seconds (p50)",
        xscale="log",
        title="Time to first audio",
    )
    b.set_ylim(bottom=0)
    for ax in (a, b):
        ax.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{Path(args.model).name}, {args.device}: {args.requests} requests, {args.tokens} tokens, "
        f"<= {args.codes} codes each",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        help="checkpoint directory (default: the bench checkpoint in .cache/bench-omni)",
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--tokens", type=int, default=32, help="thinker tokens per request"
    )
    parser.add_argument(
        "--codes",
        type=int,
        default=120,
        help="talker codes per request at most (50 per second)",
    )
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", default="float32", help="thinker (vLLM) and reference model dtype"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, cores() // 2),
        help="torch threads of each omni-vllm process (see the docstring)",
    )
    parser.add_argument(
        "--reference-threads",
        type=int,
        default=cores(),
        help="torch threads of the reference",
    )
    parser.add_argument(
        "--reference-dtype", help="the reference model's dtype (default: --dtype)"
    )
    parser.add_argument(
        "--kv-cache-bytes", type=int, default=2**28, help="vLLM KV cache size"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / ".cache" / "bench"),
        help="directory for e2e.{md,json,png}",
    )
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.concurrency = sorted(set(args.concurrency))
    args.reference_dtype = args.reference_dtype or args.dtype
    if args.worker:
        return worker(args)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.model = str(
        Path(args.model).resolve()
        if args.model
        else bench_checkpoint(ROOT / ".cache" / "bench-omni")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    results = {system: run_worker(system, args, out) for system in SYSTEMS}
    r = ratios(results)
    text = table(results, r, args)
    print("\n" + text)
    (out / "e2e.md").write_text(text + "\n")
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "result")}
    (out / "e2e.json").write_text(
        json.dumps(dict(settings=settings, results=results, ratios=r), indent=2)
    )
    plot(results, out / "e2e.png", args)
    print(
        f"\nwrote {out / 'e2e.md'}, {out / 'e2e.json'}, {out / 'e2e.png'} ({time.perf_counter() - t:.0f} s)"
    )


if __name__ == "__main__":
    main()
