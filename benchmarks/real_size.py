"""The speech path (talker + Token2Wav) at Qwen2.5-Omni-7B's real sizes, random weights built here.

The bench checkpoint (widths / 8) makes matmuls 64x cheaper relative to everything else, so its
figures do not describe the real model; this one builds the 7B's talker (1.35 B parameters: hidden
896, 24 layers, 12 query / 4 KV heads of 128, MLP 18944, reading the thinker's 3584-wide rows) and
Token2Wav (DiT 0.33 B: 22 layers of 1024; BigVGAN 0.12 B) from `REAL_SIZES` with random weights
(no download, no vLLM: it runs on the GPU machine as it is) and measures, on one device:

    talker         one batched decode step of c requests at once: ms per step, codes per second
                   (all requests' codes; 50 codes = 1 s of speech), per dtype
    token2wav      one streaming window (chunk + left context + look-ahead codes) per request, a
                   batch of b requests in ONE DiT solve (10 time points, guidance: 36 evaluations)
                   and ONE BigVGAN call: seconds of compute per second of audio kept, DiT and
                   BigVGAN apart, per dtype; bf16's mel / waveform SNR against float32 (dB)
    pipeline       c requests at once through talker -> streaming Token2Wav (one thread, the speech
                   worker's policy: first windows first and alone, else every ready window), thinker
                   rows arriving at `--thinker-tps` tokens per second per request: time to first
                   audio (TTFA), audio seconds per wall second, worst real-time factor, stalls
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_vllm.streaming import StreamConfig  # noqa: E402
from omni_vllm.testing.tiny import TOKEN_ID, VOICES, TinySizes, build_config  # noqa: E402

# Qwen2.5-Omni-7B's thinker width (what the talker reads), talker and Token2Wav, as in its released
# config.json (the talker's) and transformers' Qwen2_5OmniDiTConfig / BigVGANConfig defaults, which
# are the 7B's; tests/test_benchmarks.py checks these against BENCH_SIZES * 8. Audio / vision
# encoders are never built here. The one departure: the DiT's codec table has 8448 rows (the
# talker's vocabulary) instead of 8193, so random talker codes stay in range (no compute changes).
REAL_SIZES = TinySizes(
    vocab_size=152064,
    hidden=3584,
    heads=28,
    kv_heads=4,
    layers=28,
    intermediate=18944,
    talker_hidden=896,
    talker_heads=12,
    talker_kv_heads=4,
    talker_head_dim=128,
    talker_layers=24,
    talker_intermediate=18944,
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
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
SAMPLE_RATE, CODES_PER_SECOND = 24000, 50
PROMPT_TOKENS = 64  # thinker prompt rows per request (--prompt-tokens)


# ---------------------------------------------------------------------------------------------
# Random real-size models
# ---------------------------------------------------------------------------------------------


def random_state(module_cls, config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for `module_cls(config)` without building it: shapes from a meta-device copy,
    values U(-1, 1) / sqrt(fan_in) (PyTorch's default scale), norms 1, Snake parameters 0 (log
    scale). Tensors of one fan-in are views of one shared pool, so the dict costs a few hundred MB
    however large the model (the consumer copies them into its own parameters)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in module_cls(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    need: dict[int, int] = {}
    for shape in shapes.values():
        if len(shape) > 1:
            fan_in = math.prod(shape[1:])
            need[fan_in] = max(need.get(fan_in, 0), math.prod(shape))
    pools = {
        f: (torch.rand(n, generator=g) * 2 - 1) / math.sqrt(f) for f, n in need.items()
    }
    small = (
        torch.rand(max(s[0] for s in shapes.values() if len(s) == 1), generator=g) * 2
        - 1
    ) * 0.02
    state = {}
    for name, shape in shapes.items():
        if len(shape) > 1:
            state[name] = pools[math.prod(shape[1:])][: math.prod(shape)].view(shape)
        elif "norm" in name and name.endswith("weight"):
            state[name] = torch.ones(shape)
        elif name.endswith(("alpha", "beta")):
            state[name] = torch.zeros(shape)
        else:
            state[name] = small[: shape[0]]
    return state


def speakers(config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dit = config.token2wav_config.dit_config
    return {
        name: {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=g),
            "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=g),
            "bos_token": TOKEN_ID[token],
        }
        for name, token in VOICES.items()
    }


def build_talker(config, dtype, device, max_slots: int, max_len: int):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniTalkerForConditionalGeneration,
    )

    from omni_vllm.talker import Talker

    tc = config.talker_config
    voices = {name: TOKEN_ID[token] for name, token in VOICES.items()}
    g = torch.Generator().manual_seed(1)
    rows = {
        t: torch.randn(tc.embedding_size, generator=g) * 0.02
        for t in {*voices.values(), tc.tts_text_end_token_id, tc.tts_text_pad_token_id}
    }
    state = random_state(Qwen2_5OmniTalkerForConditionalGeneration, tc)
    return Talker(
        config,
        state,
        rows,
        voices,
        device=device,
        dtype=dtype,
        max_slots=max_slots,
        max_len=max_len,
        max_codes=max_len,
    )


def build_token2wav(config, dtype, vocoder_dtype, device):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniToken2WavModel,
    )

    from omni_vllm.token2wav import Token2Wav

    state = random_state(Qwen2_5OmniToken2WavModel, config.token2wav_config)
    return Token2Wav(
        config.token2wav_config,
        state,
        speakers(config),
        device=device,
        dtype=dtype,
        vocoder_dtype=vocoder_dtype,
    )


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


class Device:
    """Timing and peak memory on one device; TF32 per dtype label."""

    def __init__(self, name: str):
        self.name, self.cuda = name, name.startswith("cuda")

    def use(self, label: str) -> torch.dtype:
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
                label == "tf32"
            )
        return DTYPES[label]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):  # resets VmHWM to the current RSS
                Path("/proc/self/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def synthetic_prompt(talker, g: torch.Generator):
    """A thinker prompt of PROMPT_TOKENS text rows: (ids, input embeddings, last hidden states)."""
    e = talker.thinker_config.text_config.hidden_size
    ids = torch.full((PROMPT_TOKENS,), 100, dtype=torch.long)
    return (
        ids,
        torch.randn(PROMPT_TOKENS, e, generator=g) * 0.02,
        torch.randn(PROMPT_TOKENS, e, generator=g),
    )


def add_request(talker, rid, g, max_codes, seed):
    from omni_vllm.talker import TalkerSampling

    ids, embeds, hidden = synthetic_prompt(talker, g)
    talker.add_request(
        rid,
        prompt_ids=ids,
        prompt_embeds=embeds,
        prompt_hidden=hidden,
        prompt_positions=torch.arange(PROMPT_TOKENS).expand(3, -1),
        voice="Chelsie" if seed % 2 else "Ethan",
        sampling=TalkerSampling(seed=seed),
        max_codes=max_codes,
    )


def thinker_row(talker, g):
    e = talker.thinker_config.text_config.hidden_size
    return torch.randn(e, generator=g) * 0.02, torch.randn(e, generator=g)


def bench_talker(talker, dev: Device, concurrency: list[int], steps: int) -> list[dict]:
    """Decode throughput: c requests whose whole reply is there (the thinker is done), so that every
    step is one full batch; the prefill step is timed apart."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for c in concurrency:
        rids = [f"t{c}-{i}" for i in range(c)]
        for i, rid in enumerate(rids):
            add_request(talker, rid, g, steps + 1, seed=i)
            for _ in range(4):
                talker.add_thinker_token(rid, *thinker_row(talker, g))
            talker.finish_thinker(rid)
        t = dev.now()
        talker.step(rids)  # prefill
        prefill = dev.now() - t
        codes, times = 0, []
        while live := [r for r in rids if r in talker]:
            t = dev.now()
            out = talker.step(live)
            times.append(dev.now() - t)
            codes += sum(o.code is not None for o in out.values())
        for rid in rids:
            talker.remove(rid)
        ms = 1000 * statistics.median(times)
        rows.append(
            dict(
                concurrency=c,
                steps=len(times),
                prefill_s=prefill,
                ms_per_step=ms,
                codes_per_s=codes / sum(times),
                audio_x_realtime=codes / sum(times) / CODES_PER_SECOND,
            )
        )
        print(
            f"  talker c={c}: {ms:.1f} ms/step, {rows[-1]['codes_per_s']:.0f} codes/s",
            flush=True,
        )
    return rows


def bench_token2wav(
    t2w,
    dev: Device,
    batches: list[int],
    window_codes: int,
    kept_codes: int,
    ode_steps: int,
    evaluations: int,
) -> list[dict]:
    """One streaming window per request: `window_codes` codes through the DiT, `kept_codes` of them
    (plus 34 frames of vocoder context) through BigVGAN. Seconds of compute per second of kept
    audio. With `ode_steps` < 10 the DiT's time is scaled to the real 36 evaluations."""
    g = torch.Generator().manual_seed(0)
    scale = evaluations / (4 * (ode_steps - 1))
    vocoder_frames = 2 * kept_codes + 34
    rows = []
    for b in batches:
        codes = [torch.randint(0, 8192, (window_codes,), generator=g) for _ in range(b)]
        voices = [("Chelsie", "Ethan")[i % 2] for i in range(b)]
        t = dev.now()
        mels = t2w.code2mel(codes, voices, list(range(b)), num_steps=ode_steps)
        dit = (dev.now() - t) * scale
        t = dev.now()
        t2w.mel2wav([m[:, :vocoder_frames] for m in mels])
        voc = dev.now() - t
        audio = b * kept_codes / CODES_PER_SECOND
        rows.append(
            dict(
                batch=b,
                dit_s=dit,
                bigvgan_s=voc,
                dit_s_per_audio_s=dit / audio,
                bigvgan_s_per_audio_s=voc / audio,
                s_per_audio_s=(dit + voc) / audio,
            )
        )
        print(
            f"  token2wav b={b}: DiT {dit / audio:.3f} + BigVGAN {voc / audio:.3f} s per audio s",
            flush=True,
        )
    return rows


def snr_db(reference: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(
        reference.pow(2).mean().item()
        / max((reference - x).pow(2).mean().item(), 1e-30)
    )


def quality(t2ws: dict, dev: Device, window_codes: int, ode_steps: int) -> dict:
    """Each dtype against float32 (TF32 off) on the same codes and noise: the DiT's mel SNR and
    BigVGAN's waveform SNR on the float32 mel, in dB (random weights: rounding, not fidelity)."""
    g = torch.Generator().manual_seed(7)
    codes = [torch.randint(0, 8192, (window_codes,), generator=g)]
    dev.use("fp32")
    m32 = t2ws["fp32"].code2mel(codes, ["Chelsie"], [3], num_steps=ode_steps)[0]
    w32 = t2ws["fp32"].mel2wav([m32])[0]
    out = {}
    for label, t2w in t2ws.items():
        if label != "fp32":
            dev.use(label)
            mel = t2w.code2mel(codes, ["Chelsie"], [3], num_steps=ode_steps)[0]
            out[label] = dict(
                mel_snr_db=snr_db(m32, mel),
                wav_snr_db=snr_db(w32, t2w.mel2wav([m32])[0]),
            )
    return out


def bench_pipeline(
    talker,
    t2w,
    dev: Device,
    concurrency: list[int],
    codes: int,
    thinker_tokens: int,
    thinker_tps: float,
    stream,
) -> list[dict]:
    """c requests arriving together, thinker rows at `thinker_tps` each, through the talker and the
    streaming Token2Wav (`stream`: a StreamConfig) in one loop (the speech worker's policy, simplified)."""
    from omni_vllm.streaming import StreamingToken2Wav

    rows = []
    g = torch.Generator().manual_seed(1)
    for c in concurrency:
        streamer = StreamingToken2Wav(t2w, stream)
        rids = [f"p{c}-{i}" for i in range(c)]
        t0 = dev.now()
        state = {}
        for i, rid in enumerate(rids):
            add_request(talker, rid, g, codes, seed=100 + i)
            streamer.open(rid, "Chelsie", noise=i)
            state[rid] = dict(fed=0, first=None, done=None, samples=0, stall=0.0)
        call_s = 0.0
        while any(s["done"] is None for s in state.values()):
            now = time.perf_counter() - t0
            for rid, s in state.items():  # thinker rows due by now
                due = min(thinker_tokens, int(now * thinker_tps) + 1)
                while rid in talker and s["fed"] < due:
                    talker.add_thinker_token(rid, *thinker_row(talker, g))
                    s["fed"] += 1
                    if s["fed"] == thinker_tokens:
                        talker.finish_thinker(rid)
            t_talk = time.perf_counter()
            while ready := talker.ready():  # talker steps for up to one Token2Wav call
                for rid, out in talker.step(ready).items():
                    streamer.push(
                        rid,
                        [] if out.code is None else [out.code],
                        finished=out.finished,
                    )
                dev.sync()
                firsts = [r for r in streamer.ready() if state[r]["first"] is None]
                if firsts or time.perf_counter() - t_talk >= call_s:
                    break
            ready = streamer.ready()
            firsts = [r for r in ready if state[r]["first"] is None]
            chosen = firsts or ready
            if not chosen:
                if not talker.ready():
                    time.sleep(0.001)
                continue
            t = time.perf_counter()
            out = streamer.step(request_ids=chosen)
            dev.sync()
            call_s = time.perf_counter() - t
            now = time.perf_counter() - t0
            for rid, o in out.items():
                s = state[rid]
                if len(o.audio):
                    if s["first"] is None:
                        s["first"] = now
                    s["stall"] += max(
                        0.0, now - (s["first"] + s["samples"] / SAMPLE_RATE)
                    )
                    s["samples"] += len(o.audio)
                if o.done:
                    s["done"] = now
        wall = time.perf_counter() - t0
        audio = sum(s["samples"] for s in state.values()) / SAMPLE_RATE
        rtf = [s["done"] / (s["samples"] / SAMPLE_RATE) for s in state.values()]
        rows.append(
            dict(
                concurrency=c,
                wall_s=wall,
                audio_s=audio,
                audio_per_wall=audio / wall,
                ttfa_p50=statistics.median(s["first"] for s in state.values()),
                ttfa_max=max(s["first"] for s in state.values()),
                rtf_max=max(rtf),
                stall_s_max=max(s["stall"] for s in state.values()),
            )
        )
        print(
            f"  pipeline c={c}: TTFA p50 {rows[-1]['ttfa_p50']:.2f} s, {rows[-1]['audio_per_wall']:.2f} "
            f"audio s / s, worst RTF {rows[-1]['rtf_max']:.2f}",
            flush=True,
        )
    return rows


def bench_reference(
    config,
    talker_dtype,
    t2w32,
    dev: Device,
    requests: int,
    codes: int,
    thinker_tokens: int,
    ode_steps: int,
) -> dict:
    """transformers, one request at a time: the talker's `generate` on the whole reply, then
    Token2Wav's forward (float32, as transformers runs it) on all codes."""
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniTalkerForConditionalGeneration,
    )

    from omni_vllm.testing.reference import corrected_reference

    tc = config.talker_config
    tc._attn_implementation = "sdpa"
    with no_init_weights(), torch.device(dev.name):
        model = Qwen2_5OmniTalkerForConditionalGeneration(tc)
    model.load_state_dict(random_state(Qwen2_5OmniTalkerForConditionalGeneration, tc))
    inv_freq = (
        model.model.rotary_emb.inv_freq.clone()
    )  # stays float32, as in omni_vllm.talker
    model = model.to(dtype=talker_dtype).eval()
    model.model.rotary_emb.inv_freq = inv_freq
    e = tc.embedding_size
    g = torch.Generator().manual_seed(2)
    spk = speakers(config)["Chelsie"]
    times, talker_s, audio = [], 0.0, 0.0
    holder = type("Holder", (), {})()
    holder.talker = model
    for i in range(requests):
        t = dev.now()
        n = PROMPT_TOKENS + 2
        embeds = (torch.randn(1, n, e, generator=g) * 0.02).to(dev.name, talker_dtype)
        reply = (torch.randn(1, thinker_tokens + 1, e, generator=g) * 0.02).to(
            dev.name, talker_dtype
        )
        with corrected_reference(holder), torch.no_grad():
            seq = model.generate(
                input_ids=torch.full(
                    (1, n), tc.tts_codec_mask_token_id, device=dev.name
                ),
                input_text_ids=torch.full((1, n), 100, device=dev.name),
                thinker_reply_part=reply,
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, n, dtype=torch.long, device=dev.name),
                suppress_tokens=[tc.tts_codec_start_token_id],
                do_sample=True,
                top_k=40,
                top_p=0.8,
                temperature=0.9,
                repetition_penalty=1.05,
                eos_token_id=[tc.tts_codec_pad_token_id],
                max_new_tokens=codes,
                min_new_tokens=codes,
            )
        talker_s += dev.now() - t
        code = seq[0, n:]
        if (
            dev.cuda
        ):  # transformers' float32 Token2Wav at its fastest: TF32 tensor cores allowed
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
                True
            )
        with torch.no_grad():
            wav = t2w32.model(
                code[None].to(dev.name),
                conditioning=spk["cond"].to(dev.name),
                reference_mel=spk["ref_mel"].to(dev.name),
                num_steps=ode_steps,
            )
        times.append(dev.now() - t)
        audio += wav.numel() / SAMPLE_RATE
    del model
    return dict(
        requests=requests,
        audio_s=audio,
        wall_s=sum(times),
        audio_per_wall=audio / sum(times),
        ttfa_p50=statistics.median(times),
        talker_s=talker_s,
        token2wav_s=sum(times) - talker_s,
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def pipeline(
    config,
    dev: Device,
    args,
    smoke: bool,
    talker_label: str,
    dit_label: str,
    voc_label: str,
    slots: int,
    max_len: int,
    concurrency: list[int],
    codes: int,
    ode_steps: int,
) -> dict:
    """The streaming pipeline in the fastest dtypes measured (TF32 is one global switch)."""
    dev.use("tf32" if "tf32" in (talker_label, dit_label, voc_label) else "fp32")
    t2w = build_token2wav(config, DTYPES[dit_label], DTYPES[voc_label], dev.name)
    if not dev.cuda and not smoke:
        t2w.vocoder_batch = 1  # at the real size one request per BigVGAN call is cheaper on a CPU (README)
    dev.reset_peak()
    talker = build_talker(config, DTYPES[talker_label], dev.name, slots, max_len)
    # The server's stream windows (smoke: the smallest ones, first audio after 24 codes).
    stream = (
        StreamConfig(chunk=12, left_context=12, num_steps=ode_steps)
        if smoke
        else StreamConfig(num_steps=ode_steps)
    )
    bench_pipeline(
        talker, t2w, dev, [1], 24, 4, 1e6, dataclasses.replace(stream, num_steps=2)
    )  # warm-up
    rows = bench_pipeline(
        talker,
        t2w,
        dev,
        concurrency,
        codes,
        args.thinker_tokens,
        args.thinker_tps,
        stream,
    )
    return dict(
        rows=rows,
        talker_dtype=talker_label,
        dit_dtype=dit_label,
        vocoder_dtype=voc_label,
        peak_mib=dev.peak_mib(),
    )


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
        "| system | conc | TTFA p50 s | TTFA max s | audio s / wall s | worst RTF | worst stall s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in p["rows"]:
        lines.append(
            f"| omni-vllm | {row['concurrency']} | {row['ttfa_p50']:.2f} | {row['ttfa_max']:.2f} | "
            f"{row['audio_per_wall']:.2f} | {row['rtf_max']:.2f} | {row['stall_s_max']:.2f} | {p['peak_mib']:.0f} |"
        )
    if report.get("reference"):
        r = report["reference"]
        lines.append(
            f"| transformers, one at a time | 1 | {r['ttfa_p50']:.2f} | | {r['audio_per_wall']:.2f} | "
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


def main(argv: list[str] | None = None) -> dict:
    global PROMPT_TOKENS
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
        help="talker and pipeline (default cuda 1 8 32 64, cpu 1 4 16)",
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
        choices=["pipeline", "reference"],
        help="leave out sections (the talker and Token2Wav tables always run)",
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
    conc = pick(args.concurrency, [1, 8, 32, 64], [1, 4, 16], [1, 2])
    pconc = pick(args.pipeline_concurrency, conc, [1, 4], [1, 2])
    batches = pick(args.batches, [1, 8, 32, 64], [1, 4, 16], [1, 2])
    talker_steps = pick(args.talker_steps, 64, 8, 3)
    ode_steps = pick(args.ode_steps, 10, 2, 2)
    codes = pick(args.codes, 250, 72, 24)
    ref_requests = pick(args.reference_requests, 3, 1, 1)
    args.thinker_tokens = pick(args.thinker_tokens, 24, 24, 8)
    torch.set_num_threads(args.threads)
    PROMPT_TOKENS = args.prompt_tokens
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
    max_len = PROMPT_TOKENS + max(codes, talker_steps) + args.thinker_tokens + 16

    # Talker, per dtype.
    for label in dtypes:
        dtype = dev.use(label)
        dev.reset_peak()
        talker = build_talker(config, dtype, dev.name, max(conc + pconc), max_len)
        bench_talker(talker, dev, conc[:1], 2)  # warm-up
        rows = bench_talker(talker, dev, conc, talker_steps)
        report["talker"][label] = dict(rows=rows, peak_mib=dev.peak_mib())
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
