"""The speech path (talker + Token2Wav) at Qwen2.5-Omni-7B's real sizes, random weights built here.

The bench checkpoint (widths / 8) makes matmuls 64x cheaper relative to everything else, so its
figures do not describe the real model; this one builds the 7B's talker (1.35 B parameters: hidden
896, 24 layers, 12 query / 4 KV heads of 128, MLP 18944, reading the thinker's 3584-wide rows) and
Token2Wav (DiT 0.33 B: 22 layers of 1024; BigVGAN 0.12 B) from `REAL_SIZES` with random weights
(no download, no vLLM: it runs on the GPU machine as it is) and measures, on one device:

    talker         one batched decode step of c requests at once: ms per step, codes per second
                   (all requests' codes; 50 codes = 1 s of speech), per dtype; on CUDA the first
                   dtype again with capture off (--speech-enforce-eager: what CUDA graphs save)
    token2wav      one streaming window (chunk + left context + look-ahead codes) per request, a
                   batch of b requests in ONE DiT solve (10 time points, guidance: 36 evaluations)
                   and ONE BigVGAN call: seconds of compute per second of audio kept, DiT and
                   BigVGAN apart, per dtype; bf16's mel / waveform SNR against float32 (dB)
    pipeline       c requests at once through talker -> streaming Token2Wav (one thread, the speech
                   worker's policy: first windows first and alone, else every ready window), thinker
                   rows arriving at `--thinker-tps` tokens per second per request: time to first
                   audio (TTFA), audio seconds per wall second, worst real-time factor, stalls; on
                   CUDA with capture on (talker steps and window calls as CUDA graphs) and off
    window calls   Token2Wav window calls at c = 1 / 8 / 32 / 64 / 96, capture on and off
    reference      the same requests through transformers one at a time (`talker.generate` then
                   Token2Wav's forward, as `Qwen2_5OmniForConditionalGeneration.generate` does; its
                   Token2Wav in float32 as transformers forces it) on the same device and threads:
                   its TTFA is its completion time
Peak memory per section: `torch.cuda.max_memory_allocated` on CUDA, peak RSS (VmHWM, reset per
section) on the CPU. Output: a markdown table on stdout and in OUT/real_size.md, OUT/real_size.json,
OUT/real_size.png.

Dtypes: `fp32`, `bf16`, and on CUDA `tf32` (float32 weights, TF32 tensor-core matmuls and
convolutions allowed: torch.backends.{cuda.matmul,cudnn}.allow_tf32). `fp32` means TF32 off.

    python benchmarks/real_size.py --device cpu             # 30+ min on 2 cores (README: a smaller run)
    python benchmarks/real_size.py --device cuda            # the H200 run, < 8 min in one call
    python benchmarks/real_size.py --smoke                  # CI: real widths, depths cut to 2-3
                                                            # layers, tiny work; NOT a measurement

On the device machine (Python 3.12, torch, transformers, numpy; no vLLM, no network):
    PYTHONUNBUFFERED=1 python benchmarks/real_size.py --device cuda --out $OUT

This file: the sizes, the command line and the report; each measurement is in
benchmarks/real_size_stages.py, the timing and memory tools in benchmarks/meters.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# This checkout's packages, and benchmarks/ itself (for a run through runpy, as the tests do).
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import real_size_stages as stages  # noqa: E402
from meters import Device  # noqa: E402
from real_size_stages import (  # noqa: E402, F401  (its names, importable from here as before)
    CODES_PER_SECOND,
    DTYPES,
    PROMPT_TOKENS,
    SAMPLE_RATE,
    add_request,
    bench_pipeline,
    bench_reference,
    bench_talker,
    bench_token2wav,
    bench_window_calls,
    build_talker,
    build_token2wav,
    pipeline,
    quality,
    random_state,
    snr_db,
    speakers,
    synthetic_prompt,
    thinker_row,
)

from omni_vllm.testing.released import TALKER_SIZES  # noqa: E402
from omni_vllm.testing.tiny import TinySizes, build_config  # noqa: E402

# Qwen2.5-Omni-7B's thinker width (what the talker reads), talker and Token2Wav: the talker as in
# its released config.json (omni_vllm.testing.released), Token2Wav as transformers'
# Qwen2_5OmniDiTConfig / BigVGANConfig defaults, which are the 7B's; tests/test_benchmarks.py
# checks these against BENCH_SIZES * 8. Audio / vision encoders are never built here. The one
# departure: the DiT's codec table has 8448 rows (the talker's vocabulary) instead of 8193, so
# random talker codes stay in range (no compute changes).
_TALKER = TALKER_SIZES["7B"]
REAL_SIZES = TinySizes(
    vocab_size=152064,
    hidden=_TALKER["embedding_size"],
    heads=28,
    kv_heads=4,
    layers=28,
    intermediate=18944,
    talker_hidden=_TALKER["hidden_size"],
    talker_heads=_TALKER["num_attention_heads"],
    talker_kv_heads=_TALKER["num_key_value_heads"],
    talker_head_dim=_TALKER["head_dim"],
    talker_layers=_TALKER["num_hidden_layers"],
    talker_intermediate=_TALKER["intermediate_size"],
    dit_hidden=1024,
    dit_heads=16,
    dit_layers=22,
    dit_look_ahead_layers=(10,),
    dit_look_backward_layers=(0, 20),
    dit_emb_dim=512,
    dit_enc_emb_dim=192,
    dit_enc_dim=128,
    dit_enc_channels=(256, 256, 256, 256, 768),
    dit_enc_attention_channels=64,
    dit_enc_se_channels=64,
    bigvgan_channels=1536,
)
# --smoke (CI: that it runs, not what it measures): the real attention shapes (talker 896 wide with
# 12 / 4 heads of 128 reading 3584-wide rows, DiT 16 heads of 64 on 1024) and the real vocabularies,
# but 2 layers each, a narrow talker MLP and BigVGAN at 1/8 of its channels: seconds, not hours.
SMOKE_SIZES = dataclasses.replace(
    REAL_SIZES,
    talker_layers=2,
    talker_intermediate=1024,
    dit_layers=3,
    dit_look_ahead_layers=(1,),
    dit_look_backward_layers=(0, 2),
    bigvgan_channels=1536 // 8,
)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Qwen2.5-Omni-7B speech path, {'SMOKE (depths cut: not a measurement), ' if s['smoke'] else ''}"
        f"random weights; device {report['device']}; {s['threads']} CPU thread(s); torch {report['torch']}, "
        f"transformers {report['transformers']}",
        "",
    ]
    lines += [
        "Talker decode (every request's reply there; median step)",
        "",
        "| dtype | conc | ms / step | codes / s | x real time (all streams) | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in report["talker"].items():
        for row in r["rows"]:
            lines.append(
                f"| {label} | {row['concurrency']} | {row['ms_per_step']:.1f} | {row['codes_per_s']:.0f} | "
                f"{row['audio_x_realtime']:.1f} | {r['peak_mib']:.0f} |"
            )
        c = r["rows"]
        if len(c) > 1:
            lines.append(
                f"| {label} | {c[-1]['concurrency']} vs {c[0]['concurrency']} | | "
                f"**{c[-1]['codes_per_s'] / c[0]['codes_per_s']:.1f}x** codes/s | | |"
            )
    lines += [
        "",
        f"Token2Wav, one streaming window per request ({s['window_codes']} codes through the DiT, "
        f"{s['kept_codes']} kept; {s['evaluations']} DiT evaluations"
        + (
            f", timed at {s['ode_steps']} time points and scaled"
            if s["ode_steps"] != 10
            else ""
        )
        + ")",
        "",
        "| DiT / BigVGAN dtype | batch | DiT s / audio s | BigVGAN s / audio s | total s / audio s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in report["token2wav"].items():
        for row in r["rows"]:
            lines.append(
                f"| {label} | {row['batch']} | {row['dit_s_per_audio_s']:.3f} | "
                f"{row['bigvgan_s_per_audio_s']:.3f} | {row['s_per_audio_s']:.3f} | {r['peak_mib']:.0f} |"
            )
    for label, q in report.get("quality", {}).items():
        lines += [
            "",
            f"{label} against fp32 (same codes and noise, random weights): DiT mel SNR "
            f"**{q['mel_snr_db']:.1f} dB**, BigVGAN waveform SNR **{q['wav_snr_db']:.1f} dB**",
        ]
    if report.get("window_calls"):
        w = report["window_calls"]
        lines += stages.window_call_table(w["rows"], w["dtype"])
    p = report.get("pipeline")
    if p is None:
        return "\n".join(lines)
    lines += [
        "",
        f"Streaming pipeline (talker {p['talker_dtype']}, DiT {p['dit_dtype']}, BigVGAN {p['vocoder_dtype']}; "
        f"{s['codes']} codes = {s['codes'] / 50:.1f} s of speech per request, {s['thinker_tokens']} thinker tokens at "
        f"{s['thinker_tps']:g} tokens/s; Token2Wav at {s['ode_steps']} time points"
        + (
            ""
            if s["ode_steps"] == 10
            else " (not the real 10: pipeline and reference alike)"
        )
        + ")",
        "",
        "| system | capture | conc | TTFA p50 s | TTFA max s | audio s / wall s | worst RTF | worst stall s | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in p["rows"]:
        lines.append(
            f"| omni-vllm | {row.get('capture', 'off')} | {row['concurrency']} | {row['ttfa_p50']:.2f} | "
            f"{row['ttfa_max']:.2f} | {row['audio_per_wall']:.2f} | {row['rtf_max']:.2f} | "
            f"{row['stall_s_max']:.2f} | {p['peak_mib']:.0f} |"
        )
    if report.get("reference"):
        r = report["reference"]
        lines.append(
            f"| transformers, one at a time | off | 1 | {r['ttfa_p50']:.2f} | | {r['audio_per_wall']:.2f} | "
            f"{r['ttfa_p50'] / (r['audio_s'] / r['requests']):.2f} | | {r['peak_mib']:.0f} |"
        )
        top = max(p["rows"], key=lambda row: row["concurrency"])
        lines += [
            "",
            f"- omni-vllm c={top['concurrency']} / transformers: **{top['audio_per_wall'] / r['audio_per_wall']:.1f}x** "
            f"audio s per wall s (same device, same threads)",
        ]
    lines += [
        "",
        "RTF: a request's time from arrival to its last audio / its audio seconds; stall: playback gaps "
        "of a listener who starts at the first audio.",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    for label, r in report["talker"].items():
        a.plot(
            [x["concurrency"] for x in r["rows"]],
            [x["codes_per_s"] for x in r["rows"]],
            "o-",
            label=label,
        )
    a.set(
        xscale="log",
        yscale="log",
        xlabel="requests per step",
        ylabel="codes / s",
        title="Talker decode",
    )
    for label, r in report["token2wav"].items():
        b.plot(
            [x["batch"] for x in r["rows"]],
            [x["s_per_audio_s"] for x in r["rows"]],
            "o-",
            label=label,
        )
    b.set(
        xscale="log",
        yscale="log",
        xlabel="batch",
        ylabel="s compute / s audio",
        title="Token2Wav per request",
    )
    rows = report.get("pipeline", {}).get("rows", [])
    c.plot(
        [x["concurrency"] for x in rows],
        [x["ttfa_p50"] for x in rows],
        "o-",
        label="TTFA p50 s",
    )
    c.plot(
        [x["concurrency"] for x in rows],
        [x["audio_per_wall"] for x in rows],
        "s--",
        label="audio s / wall s",
    )
    c.set(xscale="log", xlabel="concurrency", title="Streaming pipeline")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Qwen2.5-Omni-7B speech path, {report['device']}"
        + (" (smoke)" if report["settings"]["smoke"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def window_calls(report: dict, args, dev: Device, t2ws: dict, cuda: bool, smoke: bool):
    """Token2Wav window calls, capture on and off, in the speech path's default on the device
    (tf32 on CUDA, else fp32): report["window_calls"]."""
    given = args.window_calls
    # not in --smoke (10 time points at the real DiT width: minutes on a CPU) unless given
    conc = given or ([1, 8, 32, 64, 96] if cuda and not smoke else None)
    if not conc or "window_calls" in args.skip:
        return
    label = "tf32" if cuda and "tf32" in t2ws else "fp32" if "fp32" in t2ws else None
    if label is None:
        return
    dev.use(label)
    rows = bench_window_calls(t2ws[label], dev, conc)
    report["window_calls"] = dict(dtype=label, rows=rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: real widths, 2-3 layers, tiny work (not a measurement)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", help="default: cuda bf16 tf32 fp32; cpu fp32 bf16"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="talker and pipeline (default cuda 1 8 32 64 96, cpu 1 4 16)",
    )
    parser.add_argument(
        "--pipeline-concurrency",
        type=int,
        nargs="+",
        help="default: --concurrency (cpu: 1 4)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        help="Token2Wav batches (default cuda 1 8 32 64, cpu 1 4 16)",
    )
    parser.add_argument(
        "--talker-steps",
        type=int,
        help="decode steps per talker row (default cuda 64, cpu 8)",
    )
    parser.add_argument(
        "--ode-steps",
        type=int,
        help="Token2Wav time points timed (10 = real; cpu default 2, scaled)",
    )
    parser.add_argument(
        "--codes",
        type=int,
        help="codes per pipeline request (default cuda 250, cpu 72)",
    )
    parser.add_argument(
        "--thinker-tokens",
        type=int,
        help="thinker tokens per request (default 24, smoke 8)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=PROMPT_TOKENS,
        help="thinker prompt rows per request",
    )
    parser.add_argument(
        "--thinker-tps",
        type=float,
        default=30.0,
        help="thinker tokens per second per request",
    )
    parser.add_argument("--reference-requests", type=int, help="default cuda 3, cpu 1")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads (both systems)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["pipeline", "reference", "window_calls"],
        help="leave out sections (the talker and Token2Wav tables always run)",
    )
    parser.add_argument(
        "--window-calls",
        type=int,
        nargs="+",
        help="Token2Wav window-call concurrencies, capture on and off (default cuda "
        "1 8 32 64 96; not run on cpu unless given)",
    )
    parser.add_argument("--out", default=str(ROOT / ".cache" / "bench"))
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    smoke = args.smoke
    pick = lambda given, gpu, cpu, tiny: (
        given if given is not None else (tiny if smoke else gpu if cuda else cpu)
    )  # noqa: E731
    dtypes = pick(
        args.dtypes, ["bf16", "tf32", "fp32"], ["fp32", "bf16"], ["fp32", "bf16"]
    )
    conc = pick(args.concurrency, [1, 8, 32, 64, 96], [1, 4, 16], [1, 2])
    pconc = pick(args.pipeline_concurrency, conc, [1, 4], [1, 2])
    batches = pick(args.batches, [1, 8, 32, 64], [1, 4, 16], [1, 2])
    talker_steps = pick(args.talker_steps, 64, 8, 3)
    ode_steps = pick(args.ode_steps, 10, 2, 2)
    codes = pick(args.codes, 250, 72, 24)
    ref_requests = pick(args.reference_requests, 3, 1, 1)
    args.thinker_tokens = pick(args.thinker_tokens, 24, 24, 8)
    torch.set_num_threads(args.threads)
    stages.PROMPT_TOKENS = args.prompt_tokens
    dev = Device(args.device)
    config = build_config(512, SMOKE_SIZES if smoke else REAL_SIZES)
    evaluations = 4 * (10 - 1)
    window, kept = (
        (24, 12) if smoke else (72, 36)
    )  # StreamConfig defaults: chunk 36 + left 24 + ahead 12
    settings = dict(
        smoke=smoke,
        dtypes=dtypes,
        concurrency=conc,
        pipeline_concurrency=pconc,
        batches=batches,
        talker_steps=talker_steps,
        ode_steps=ode_steps,
        evaluations=evaluations,
        codes=codes,
        thinker_tokens=args.thinker_tokens,
        thinker_tps=args.thinker_tps,
        window_codes=window,
        kept_codes=kept,
        threads=torch.get_num_threads(),
        reference_requests=ref_requests,
    )
    import transformers

    report = dict(
        settings=settings,
        device=torch.cuda.get_device_name()
        if cuda
        else f"cpu ({os.cpu_count()} cores)",
        torch=torch.__version__,
        transformers=transformers.__version__,
        talker={},
        token2wav={},
    )
    print(f"real_size: {json.dumps(settings)}", flush=True)
    t_start = time.perf_counter()
    max_len = stages.PROMPT_TOKENS + max(codes, talker_steps) + args.thinker_tokens + 16

    # Talker, per dtype.
    for label in dtypes:
        dtype = dev.use(label)
        dev.reset_peak()
        talker = build_talker(config, dtype, dev.name, max(conc + pconc), max_len)
        bench_talker(talker, dev, conc[:1], 2)  # warm-up
        rows = bench_talker(talker, dev, conc, talker_steps)
        report["talker"][label] = dict(rows=rows, peak_mib=dev.peak_mib())
        del talker
        if cuda and label == dtypes[0]:
            # the same steps without capture (--speech-enforce-eager): the host cost captured away
            talker = build_talker(
                config, dtype, dev.name, max(conc + pconc), max_len, enforce_eager=True
            )
            bench_talker(talker, dev, conc[:1], 2)
            rows = bench_talker(talker, dev, conc, talker_steps)
            report["talker"][f"{label}, capture off"] = dict(
                rows=rows, peak_mib=dev.peak_mib()
            )
            del talker

    # Token2Wav: every dtype for the DiT and BigVGAN together (bf16 DiT with the float32 vocoder too).
    t2ws = {}
    for label in dtypes:
        dtype = dev.use(label)
        dev.reset_peak()
        t2w = build_token2wav(config, dtype, dtype, dev.name)
        bench_token2wav(t2w, dev, [1], 12, 12, 2, 4)  # warm-up
        rows = bench_token2wav(t2w, dev, batches, window, kept, ode_steps, evaluations)
        report["token2wav"][f"{label} / {label}"] = dict(
            rows=rows, peak_mib=dev.peak_mib()
        )
        t2ws[label] = t2w
    if "fp32" in t2ws and len(t2ws) > 1:
        report["quality"] = quality(t2ws, dev, window, 10 if cuda else ode_steps)
    window_calls(report, args, dev, t2ws, cuda, smoke)

    # Best dtypes for the pipeline: the fastest talker at the top concurrency; DiT and BigVGAN apart.
    top = lambda label, key: report["token2wav"][f"{label} / {label}"]["rows"][-1][key]  # noqa: E731
    talker_label = min(
        dtypes, key=lambda d: report["talker"][d]["rows"][-1]["ms_per_step"]
    )
    dit_label = min(dtypes, key=lambda d: top(d, "dit_s_per_audio_s"))
    voc_label = min(dtypes, key=lambda d: top(d, "bigvgan_s_per_audio_s"))
    for label in list(t2ws):
        if label not in (dit_label, voc_label, "fp32"):
            del t2ws[label]
    gc.collect()
    if "pipeline" not in args.skip:
        report["pipeline"] = pipeline(
            config,
            dev,
            args,
            smoke,
            talker_label,
            dit_label,
            voc_label,
            max(conc + pconc),
            max_len,
            pconc,
            codes,
            ode_steps,
        )
    if (
        "reference" not in args.skip
    ):  # transformers, one at a time, on the same device and threads
        dev.use(talker_label)
        dev.reset_peak()
        t2w32 = t2ws.get("fp32") or build_token2wav(
            config, torch.float32, torch.float32, dev.name
        )
        ref = bench_reference(
            config,
            DTYPES[talker_label],
            t2w32,
            dev,
            ref_requests,
            codes,
            args.thinker_tokens,
            ode_steps,
        )
        ref["peak_mib"] = dev.peak_mib()
        report["reference"] = ref
    report["seconds"] = time.perf_counter() - t_start
    text = table(report)
    print("\n" + text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_size.md").write_text(text + "\n")
    (out / "real_size.json").write_text(json.dumps(report, indent=2))
    try:
        plot(report, out / "real_size.png")
    except (
        ImportError
    ):  # no matplotlib (the GPU machine): the table and JSON are the result
        print("matplotlib missing: no real_size.png", flush=True)
    print(
        f"\nwrote {out / 'real_size.md'}, real_size.json, real_size.png ({report['seconds']:.0f} s)",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
