"""Streamed vs one-shot Token2Wav on random-weight checkpoints: how much the sliding windows cost.

For every window setting, the same codes and the same per-request noise are decoded once in one
shot (``Token2Wav.code2mel`` + ``mel2wav`` over the whole sequence) and once streamed
(``omni_vllm.streaming.decode_windows``, all requests batched, one window each per call). Columns:

    chunk / first   codes per chunk / in the first chunk (DiT block = 12 codes)
    left / ahead    DiT left context / look-ahead, codes
    voc L/R         BigVGAN left / right context, mel frames ("dit": right context taken from the
                    DiT look-ahead, nothing held back)
    mel L1 / RMS    mean |streamed - one-shot| and its RMS over the whole mel (the one-shot mel's
                    std is printed above the table for scale)
    SNR dB          10 log10(sum one-shot^2 / sum (streamed - one-shot)^2) over the waveform
    1st audio       codes that must exist before the first samples leave; 1st ms: how many ms of
                    audio that first emission holds
    cost            DiT frames computed / frames kept (window overhead); s: wall time of the streamed
                    decode (one thread)

A second table isolates the vocoder: the one-shot mel vocoded in 72-frame segments with the given
contexts. Random weights: the numbers show where the errors come from and how they fall with
context, not what a trained model sounds like.

    python benchmarks/streaming_quality.py            # tiny checkpoint (~3 min, 1 thread)
    python benchmarks/streaming_quality.py --large    # + 22-layer DiT, real-width BigVGAN (+~6.5 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from omni_vllm.streaming import (  # noqa: E402
    StreamConfig,
    StreamState,
    bigvgan_receptive_field,
    decode_windows,
    dit_receptive_field,
)
from omni_vllm.token2wav import Token2Wav  # noqa: E402

# Real Qwen2.5-Omni token2wav depths / widths where they set the receptive field or the signal
# path. The DiT is 22 layers with look-back in layers 0 and 20 and look-ahead in layer 10 (as the
# released config) but 256 wide instead of 1024 (16x cheaper; PyTorch's default init keeps
# activations' scale independent of width, so frame coupling per layer is alike). BigVGAN is the
# real one: 1536 initial channels, upsample 5,3,2,2,2,2.
LARGE = dict(dit_hidden=256, dit_heads=4, dit_layers=22, bigvgan_channels=1536)
REAL_LOOK = dict(look_ahead_layers=[10], look_backward_layers=[0, 20])

GRID = [
    # DiT context at the default chunk and vocoder
    dict(left_context=0, look_ahead=0),
    dict(left_context=24, look_ahead=0),
    dict(left_context=0, look_ahead=12),
    dict(),  # default = Qwen's own streaming windows (24 back, 12 ahead, chunks of 36)
    dict(left_context=48, look_ahead=12),
    dict(left_context=24, look_ahead=24),
    dict(left_context=48, look_ahead=24),
    dict(left_context=96, look_ahead=36),
    # chunk size at the default contexts
    dict(chunk=12, vocoder_right=12),
    dict(chunk=24),
    dict(chunk=48),
    dict(chunk=72),
    dict(first_chunk=24),
    dict(first_chunk=12, vocoder_right=12),
    # vocoder contexts at the default DiT windows
    dict(vocoder_left=0, vocoder_right=0),
    dict(vocoder_left=8, vocoder_right=8),
    dict(vocoder_left=20, vocoder_right=20),  # Qwen's
    dict(vocoder_left=34, vocoder_right=34),  # the full analytic field
    dict(vocoder_right_from_dit=True),
]
LARGE_GRID = [GRID[i] for i in (0, 3, 4, 5, 6, 18)]
VOCODER = [
    (0, 0),
    (8, 8),
    ("rf", 8),
    ("rf", 12),
    ("rf", 16),
    ("rf", 20),
    (8, "rf"),
    (16, "rf"),
    ("rf", "rf"),
]
LARGE_VOCODER = [(0, 0), ("rf", 8), ("rf", 16), (16, "rf"), ("rf", "rf")]


def build(path: Path, large: bool) -> Path:
    from omni_vllm.testing.tiny import TinySizes, build_tiny_checkpoint

    if large:
        build_tiny_checkpoint(path, sizes=TinySizes(**LARGE))
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["token2wav_config"]["dit_config"].update(REAL_LOOK)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    else:
        build_tiny_checkpoint(path)
    return path


def empirical_vocoder_field(t2w: Token2Wav, frames: int = 160) -> tuple[int, int]:
    """Frames before / after a perturbed mel frame whose waveform changes at all."""
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(t2w.mel_dim, frames, generator=g) - 4
    bumped = mel.clone()
    mid = frames // 2
    bumped[:, mid] += 3
    a, b = t2w.mel2wav([mel, bumped])
    changed = ((a - b).abs() > 0).nonzero().flatten()
    first, last = changed.min().item() // t2w.hop, changed.max().item() // t2w.hop
    return mid - first, last - mid


def snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    err = (ref - x).pow(2).sum()
    return (
        float("inf") if err == 0 else (10 * torch.log10(ref.pow(2).sum() / err)).item()
    )


def streamed(t2w, codes, voices, seeds, cfg):
    states = [
        StreamState(v, s, cfg, t2w.repeats, record_mel=True)
        for v, s in zip(voices, seeds)
    ]
    for st, c in zip(states, codes):
        st.append(c, finished=True)
    wavs = [[] for _ in states]
    start = time.perf_counter()
    while not all(st.done for st in states):
        live = [i for i, st in enumerate(states) if not st.done]
        for i, w in zip(live, decode_windows(t2w, [states[i] for i in live])):
            wavs[i].append(w)
    seconds = time.perf_counter() - start
    mels = [torch.cat(st.mel_chunks, dim=1) for st in states]
    return mels, [torch.cat(w) for w in wavs], seconds


def window_cost(cfg: StreamConfig, n: int) -> float:
    st = StreamState("x", 0, cfg)
    st.append([0] * n, finished=True)
    computed, k = 0, 0
    while st._chunk_ready(k):
        start, end = st.bounds(k)
        computed += min(end + cfg.look_ahead, n) - max(0, start - cfg.left_context)
        k += 1
    return computed / n


def vocoder_only(t2w, mels, ref_wavs, left, right, seg=72):
    parts = [[] for _ in mels]
    jobs = []
    for i, m in enumerate(mels):
        T = m.shape[1]
        for s in range(0, T, seg):
            e = min(T, s + seg)
            a, b = max(0, s - left), min(T, e + right)
            jobs.append((i, s - a, e - a, m[:, a:b]))
    wavs = t2w.mel2wav([j[3] for j in jobs])
    for (i, s, e, _), w in zip(jobs, wavs):
        parts[i].append(w[s * t2w.hop : e * t2w.hop])
    out = [torch.cat(p) for p in parts]
    return snr_db(torch.cat(ref_wavs), torch.cat(out))


def run(
    t2w: Token2Wav,
    num_codes: int,
    grid: list[dict],
    vocoder: list,
    title: str,
    requests: int = 2,
) -> None:
    base = StreamConfig()
    back, ahead = dit_receptive_field(t2w, base.num_steps)
    vb, va = bigvgan_receptive_field(t2w)
    eb, ea = empirical_vocoder_field(t2w)
    print(f"\n## {title}")
    print(
        f"DiT receptive field ({base.num_steps} time points): {back} codes back, {ahead} ahead "
        f"(one evaluation: {back // (4 * (base.num_steps - 1))} / {ahead // (4 * (base.num_steps - 1))}); "
        f"BigVGAN: analytic {vb}/{va} frames, perturbation {eb}/{ea} frames"
    )
    g = torch.Generator().manual_seed(1234)
    voices = [t2w.voices[i % len(t2w.voices)] for i in range(requests)]
    seeds = [101, 202][:requests]
    codes = [
        torch.randint(0, 8192, (num_codes - 7 * i,), generator=g)
        for i in range(requests)
    ]
    start = time.perf_counter()
    noise = [
        StreamState(v, s).noise(0, t2w.repeats * len(c), t2w.mel_dim, t2w.block_size)
        for v, s, c in zip(voices, seeds, codes)
    ]
    ref_mels = t2w.code2mel(codes, voices, noise)
    ref_wavs = t2w.mel2wav(ref_mels)
    one_shot_s = time.perf_counter() - start
    ref_mel, ref_wav = torch.cat(ref_mels, 1), torch.cat(ref_wavs)
    print(
        f"{len(codes)} requests ({', '.join(str(len(c)) for c in codes)} codes, {voices}), one-shot "
        f"{one_shot_s:.1f} s; one-shot mel std {ref_mel.std():.3f}, waveform RMS {ref_wav.pow(2).mean().sqrt():.4f}"
    )
    head = "| chunk | first | left | ahead | voc L/R | mel L1 | mel RMS | SNR dB | 1st audio (codes) | 1st ms | cost | s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for overrides in grid:
        cfg = dataclasses.replace(base, **overrides)
        cfg.validate(t2w)
        mels, wavs, seconds = streamed(t2w, codes, voices, seeds, cfg)
        mel, wav = torch.cat(mels, 1), torch.cat(wavs)
        assert mel.shape == ref_mel.shape and wav.shape == ref_wav.shape
        d = mel - ref_mel
        voc = f"{cfg.vocoder_left}/" + (
            "dit" + str(cfg.vocoder_right)
            if cfg.vocoder_right_from_dit
            else str(cfg.vocoder_right)
        )
        held = 0 if cfg.vocoder_right_from_dit else cfg.vocoder_right
        first_ms = (t2w.repeats * cfg.first - held) * t2w.hop / 24
        tag = " (default)" if cfg == StreamConfig() else ""
        print(
            f"| {cfg.chunk}{tag} | {cfg.first} | {cfg.left_context} | {cfg.look_ahead} | {voc} | "
            f"{d.abs().mean():.2e} | {d.pow(2).mean().sqrt():.2e} | {snr_db(ref_wav, wav):.1f} | "
            f"{cfg.first_audio_codes()} | {first_ms:.0f} | {window_cost(cfg, num_codes):.2f} | {seconds:.1f} |"
        )
    print("\nVocoder alone (one-shot mel, 72-frame segments):")
    print("| voc left | voc right | SNR dB |\n|---|---|---|")
    for left, right in vocoder:
        left, right = vb if left == "rf" else left, va if right == "rf" else right
        print(
            f"| {left} | {right} | {vocoder_only(t2w, ref_mels, ref_wavs, left, right):.1f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--large",
        action="store_true",
        help="also the real-depth / real-vocoder-width checkpoint",
    )
    parser.add_argument("--only-large", action="store_true")
    parser.add_argument(
        "--codes", type=int, default=240, help="codes per request (50 per second)"
    )
    parser.add_argument(
        "--large-codes", type=int, default=120, help="codes of the one large request"
    )
    parser.add_argument(
        "--full-grid",
        action="store_true",
        help="whole grid on the large checkpoint too",
    )
    parser.add_argument(
        "--large-dir", type=Path, help="reuse (or keep) the large checkpoint here"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_large:
            t2w = Token2Wav.from_pretrained(build(Path(tmp) / "tiny", large=False))
            run(
                t2w,
                args.codes,
                GRID,
                VOCODER,
                "tiny checkpoint (DiT 4 layers x 64, BigVGAN 128 channels)",
            )
        if args.large or args.only_large:
            path = args.large_dir or Path(tmp) / "large"
            if not (path / "config.json").exists():
                build(path, large=True)
            t2w = Token2Wav.from_pretrained(path)
            grid, vocoder = (
                (GRID, VOCODER) if args.full_grid else (LARGE_GRID, LARGE_VOCODER)
            )
            run(
                t2w,
                args.large_codes,
                grid,
                vocoder,
                f"large checkpoint ({LARGE}, look {REAL_LOOK})",
                requests=1,
            )


if __name__ == "__main__":
    main()
