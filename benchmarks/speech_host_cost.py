"""Host cost of the speech path: ms and aten ops per talker step / Token2Wav window call.

A CPU proxy of a launch-bound GPU: the 7B's depths and layouts at widths / N (default 16), so the
matmuls are tiny and what remains is per-op overhead; the torch profiler counts the aten ops of
one call (every `aten::` event, nested ones included; each close to one kernel launch on CUDA).
One thread (`torch.set_num_threads(1)`).

    python benchmarks/speech_host_cost.py --section token2wav      # Token2Wav window calls
    python benchmarks/speech_host_cost.py --section talker         # talker decode steps
    python benchmarks/speech_host_cost.py --section all
    python benchmarks/speech_host_cost.py --section token2wav --checkout /work/main   # "before"

Sections:

    token2wav  one streaming window call (StreamConfig defaults: a 72-code window, 36 codes kept,
               10 ODE points with guidance: 36 DiT evaluations, then BigVGAN over the kept frames
               with their vocoder context) at window batch 1 and 16, on the 7B's DiT depth (22
               layers, look-back in 0 and 20, look-ahead in 10) and BigVGAN layout (6 upsamples,
               3 resblock kernels) at widths / N. Rows: `eager` (what the CPU runs: the call
               unpadded), `captured fn` (the function a CUDA graph records, padded to the bucket and
               the fixed window shape, run eagerly here through GraphCache's `capture` hook: its ops
               are the kernels one replay launches; on CUDA the host cost of the call is then one
               graph replay plus the input copies), and `compiled DiT eval` (torch.compile of one
               DiT evaluation, timed against the same evaluation eager, x 36: whether inductor
               pays on this CPU). `--checkout` imports omni_vllm from another checkout (e.g. main
               before this change: its eager row is the "before").
    talker     one decode step of every request at batch 1/4/16/64 (`--talker-batches`), on the
               7B talker's depth (24 layers, head dim 128, its vocabularies) at widths / N, each
               request at a 100-position context: `eager` (what the CPU runs, and CUDA with
               --speech-enforce-eager), `compiled` with `--compile` (torch.compile of the decode
               step, timed after compiling). The captured step on CUDA replays the eager step's
               kernels in one launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _paths(checkout: str | None) -> None:
    """omni_vllm from `checkout` (default: this one), benchmarks/ helpers from this one."""
    sys.path[:0] = [str(Path(checkout or ROOT).resolve()), str(ROOT / "benchmarks")]


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def aten_ops(fn) -> int:
    """aten ops of one `fn()` call (torch profiler, CPU events, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def best_ms(fn, repeat: int) -> float:
    """Best of `repeat` timed calls, ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


# ---------------------------------------------------------------------------------------------
# Token2Wav
# ---------------------------------------------------------------------------------------------


def token2wav_sizes(scale: int):
    """real_size.py's 7B Token2Wav sizes with widths / `scale` (depths and layouts kept; the
    DiT's head dim 64 kept, its head count divided)."""
    from real_size import REAL_SIZES

    s = REAL_SIZES
    return dataclasses.replace(
        s,
        dit_hidden=s.dit_hidden // scale,
        dit_heads=max(1, s.dit_heads // scale),
        dit_emb_dim=max(8, s.dit_emb_dim // scale),
        dit_enc_emb_dim=max(8, s.dit_enc_emb_dim // scale),
        dit_enc_dim=max(8, s.dit_enc_dim // scale),
        dit_enc_channels=tuple(max(8, c // scale) for c in s.dit_enc_channels),
        dit_enc_attention_channels=max(8, s.dit_enc_attention_channels // scale),
        dit_enc_se_channels=max(8, s.dit_enc_se_channels // scale),
        bigvgan_channels=s.bigvgan_channels // scale,
    )


def _reset(streamer, snapshot):
    """Put every stream back to its state after the first window (to time the same call again)."""
    for rid, (next_chunk, emitted, mel, base) in snapshot.items():
        s = streamer.streams[rid]
        s.next_chunk, s.frames_emitted, s._mel, s._mel_base = (
            next_chunk,
            emitted,
            mel,
            base,
        )


def _snapshot(streamer):
    return {
        rid: (s.next_chunk, s.frames_emitted, s._mel, s._mel_base)
        for rid, s in streamer.streams.items()
    }


def _one_call(streamer, snapshot):
    def call():
        _reset(streamer, snapshot)
        streamer.step()

    return call


def _fake_capture(fn, pool, warmup):
    outputs = fn()

    def replay():
        for out, new in zip(outputs, fn()):
            out.copy_(new)

    return replay, outputs


def _host_side(streamer, snapshot):
    """A captured call as the host runs it on CUDA, with the replay itself left out: plan, fill
    the buffers, copy the outputs out, apply (the graph launch is one more host call)."""
    from omni_vllm.streaming import StreamingToken2Wav
    from omni_vllm.token2wav_runner import WindowRunner

    def no_replay(fn, pool, warmup):
        return (lambda: None), fn()

    runner = WindowRunner(streamer.t2w, streamer.config, capture=no_replay)
    host = StreamingToken2Wav(streamer.t2w, streamer.config, runner=runner)
    host.streams = streamer.streams
    call = _one_call(host, snapshot)
    call()  # the capture (records once), not timed
    return call


def _captured_fn(streamer, snapshot):
    """The function a CUDA graph of this call would record (its buffers filled for this call)."""
    from omni_vllm.streaming import plan_windows
    from omni_vllm.token2wav_runner import WindowRunner

    runner = WindowRunner(streamer.t2w, streamer.config, capture=_fake_capture)
    _reset(streamer, snapshot)
    call = plan_windows(streamer.t2w, list(streamer.streams.values()))
    key = runner.key(call)
    bufs = runner._buffers[key] = runner._allocate(key)
    runner._fill(bufs, call)
    return runner._function(key, bufs), key


def _dit_eval(t2w, batch: int, frames: int):
    """One DiT evaluation (22 layers, guidance rows) on fixed inputs, as `Token2Wav.solve` runs it."""
    import torch

    rows = 2 * batch
    dit = t2w.dit
    dim = dit.config.hidden_size
    hidden = torch.randn(rows, frames, dim)
    temb = t2w._time_embedding(torch.full((rows,), 0.5))
    pos = dit.rotary_embed(hidden, torch.arange(frames)[None].expand(rows, -1))
    block_diff = t2w._block_diff(torch.full((rows,), frames), frames)

    def evaluate(hidden, temb):
        for layer in dit.transformer_blocks:
            hidden = layer(hidden, temb, position_embeddings=pos, block_diff=block_diff)
        return dit.proj_out(dit.norm_out(hidden, temb))

    return evaluate, (hidden, temb)


def token2wav_table(args) -> dict:
    import torch

    from omni_vllm.streaming import StreamConfig
    from omni_vllm.testing.tiny import build_config

    torch.set_num_threads(1)
    from real_size_stages import build_token2wav

    config = build_config(512, token2wav_sizes(args.scale))
    t2w = build_token2wav(config, torch.float32, torch.float32, "cpu")
    stream = StreamConfig()
    rows = []
    for batch in args.batches:
        from real_size_stages import window_call_streams

        streamer, _ = window_call_streams(t2w, batch, config=stream)
        snapshot = _snapshot(streamer)
        call = _one_call(streamer, snapshot)
        with torch.no_grad():
            rows.append(
                dict(
                    variant=f"eager ({args.label})",
                    batch=batch,
                    ms=best_ms(call, args.repeat),
                    aten_ops=aten_ops(call),
                )
            )
            print(rows[-1], flush=True)
            if not args.eager_only:
                fn, key = _captured_fn(streamer, snapshot)
                rows.append(
                    dict(
                        variant=f"captured fn, bucket {key[0]}x{key[2]} frames",
                        batch=batch,
                        ms=best_ms(fn, args.repeat),
                        aten_ops=aten_ops(fn),
                    )
                )
                print(rows[-1], flush=True)
                host = _host_side(streamer, snapshot)
                rows.append(
                    dict(
                        variant="captured call, host side (+ 1 graph replay)",
                        batch=batch,
                        ms=best_ms(host, args.repeat),
                        aten_ops=aten_ops(host),
                    )
                )
                print(rows[-1], flush=True)
    if args.compile and not args.eager_only:
        rows += compile_rows(t2w, args)
    return dict(scale=args.scale, rows=rows)


def compile_rows(t2w, args) -> list[dict]:
    """One DiT evaluation eager vs torch.compile (inductor), x 36 for a window call's DiT."""
    import torch

    out = []
    for batch in args.batches:
        evaluate, inputs = _dit_eval(t2w, batch, 144)
        with torch.no_grad():
            eager = best_ms(lambda f=evaluate, x=inputs: f(*x), args.repeat)
            t = time.perf_counter()
            compiled = torch.compile(evaluate, dynamic=False)
            compiled(*inputs)
            compile_s = time.perf_counter() - t
            fast = best_ms(lambda f=compiled, x=inputs: f(*x), args.repeat)
        for variant, ms in (
            ("DiT eval x 36, eager", eager),
            ("DiT eval x 36, compiled", fast),
        ):
            out.append(dict(variant=variant, batch=batch, ms=36 * ms, aten_ops=None))
        out[-1]["compile_s"] = compile_s
        print(out[-2:], flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Talker (the lead's section)
# ---------------------------------------------------------------------------------------------


def talker_table(args) -> dict:
    """Talker decode steps at batch 1/4/16/64 (`--talker-batches`), the 7B's depth at widths / N:
    ms and aten ops per step, every request decoding at a 100-position context
    (benchmarks/talker_host_cost.py). `eager` is what the CPU runs (and CUDA with
    --speech-enforce-eager); `compiled` (with `--compile`) the decode step under torch.compile.
    With `--checkout` of a tree before the paged talker, its eager rows are the "before"."""
    from talker_host_cost import talker_rows

    rows = talker_rows(
        args.talker_batches,
        scale=args.scale,
        steps=max(3, 2 * args.repeat),
        compiled=args.compile and not args.eager_only,
    )
    return dict(
        scale=args.scale,
        label=args.label,
        rows=[
            dict(
                variant=r["mode"],
                batch=r["batch"],
                ms=r["ms_per_step"],
                aten_ops=r["aten_ops"],
            )
            for r in rows
        ],
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def markdown(section: str, table: dict) -> str:
    lines = [
        f"{section} (widths / {table['scale']}, 1 thread)",
        "",
        "| variant | batch | ms / call | aten ops / call |",
        "|---|---:|---:|---:|",
    ]
    for r in table["rows"]:
        ops = "-" if r["aten_ops"] is None else f"{r['aten_ops']:,}"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['ms']:.0f} | {ops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--section", choices=["talker", "token2wav", "all"], default="all"
    )
    parser.add_argument("--scale", type=int, default=16, help="widths / N")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--talker-batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--checkout", help="import omni_vllm from this checkout")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument(
        "--eager-only", action="store_true", help="only the eager rows (any checkout)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile one DiT evaluation"
    )
    parser.add_argument("--out", default=str(ROOT / ".cache" / "bench"))
    args = parser.parse_args(argv)
    _paths(args.checkout)
    import omni_vllm

    print(f"omni_vllm from {Path(omni_vllm.__file__).parent}", flush=True)
    report = {}
    sections = ["talker", "token2wav"] if args.section == "all" else [args.section]
    for section in sections:
        table = (talker_table if section == "talker" else token2wav_table)(args)
        report[section] = table
        print("\n" + markdown(section, table), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speech_host_cost.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
