"""What benchmarks/real_size.py measures, stage by stage, on Qwen2.5-Omni-7B's speech path at its
real sizes with random weights: the talker's batched decode, Token2Wav's streaming windows, bf16
against float32, the streaming pipeline, and transformers one request at a time.

Apart from real_size.py (its sizes, command line and report) so that each measurement reads on its
own; the timing and memory tools are benchmarks/meters.py's. No vLLM (it runs on the GPU machine as
it is). `PROMPT_TOKENS` is the thinker prompt per request; real_size.py's `--prompt-tokens` sets it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
from meters import DTYPE_LABELS, Device

from omni_vllm.streaming import StreamConfig
from omni_vllm.testing.tiny import TOKEN_ID, VOICES

DTYPES = {label: getattr(torch, name) for label, name in DTYPE_LABELS.items()}
SAMPLE_RATE, CODES_PER_SECOND = 24000, 50
PROMPT_TOKENS = 64  # thinker prompt rows per request (real_size.py --prompt-tokens)

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


def build_talker(
    config, dtype, device, max_slots: int, max_len: int, enforce_eager: bool = False
):
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
        kv_cache_tokens=max_slots * max_len,
        enforce_eager=enforce_eager,
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
    enforce_eager: bool = False,
) -> list[dict]:
    """c requests arriving together, thinker rows at `thinker_tps` each, through the talker and the
    streaming Token2Wav (`stream`: a StreamConfig) in one loop (the speech worker's policy, simplified)."""
    from omni_vllm.streaming import StreamingToken2Wav

    rows = []
    g = torch.Generator().manual_seed(1)
    for c in concurrency:
        streamer = StreamingToken2Wav(t2w, stream, enforce_eager=enforce_eager)
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
    # The server's stream windows (smoke: the smallest ones, first audio after 24 codes).
    stream = (
        StreamConfig(chunk=12, left_context=12, num_steps=ode_steps)
        if smoke
        else StreamConfig(num_steps=ode_steps)
    )
    rows = []
    # captured talker steps and window calls (the default on CUDA), then all eager
    # (--speech-enforce-eager); on the CPU both are eager: one run
    for eager in (False, True) if dev.cuda else (True,):
        talker = build_talker(
            config, DTYPES[talker_label], dev.name, slots, max_len, enforce_eager=eager
        )
        bench_pipeline(
            talker,
            t2w,
            dev,
            [1],
            24,
            4,
            1e6,
            dataclasses.replace(stream, num_steps=2),
            enforce_eager=eager,
        )  # warm-up
        for row in bench_pipeline(
            talker,
            t2w,
            dev,
            concurrency,
            codes,
            args.thinker_tokens,
            args.thinker_tps,
            stream,
            enforce_eager=eager,
        ):
            rows.append(dict(row, capture="off" if eager else "on"))
        del talker
    return dict(
        rows=rows,
        talker_dtype=talker_label,
        dit_dtype=dit_label,
        vocoder_dtype=voc_label,
        peak_mib=dev.peak_mib(),
    )


# ---------------------------------------------------------------------------------------------
# Token2Wav window calls, captured vs eager (the Token2Wav runner)
# ---------------------------------------------------------------------------------------------


def window_call_streams(
    t2w,
    batch: int,
    codes: int = 84,
    config: StreamConfig | None = None,
    **streamer_kwargs,
):
    """A StreamingToken2Wav of `batch` streams whose first window is decoded and whose second
    (72 codes: 24 left + 36 + 12 ahead, StreamConfig's defaults) is ready, and `call()`: that
    second window call, repeatable (each call puts the streams back first)."""
    from omni_vllm.streaming import StreamingToken2Wav

    streamer = StreamingToken2Wav(t2w, config or StreamConfig(), **streamer_kwargs)
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        streamer.open(i, ("Chelsie", "Ethan")[i % 2], noise=i)
        streamer.push(i, torch.randint(0, 8192, (codes,), generator=g).tolist())
    streamer.step()  # first windows
    for s in streamer.streams.values():
        # keep codes and noise so that the same call can run again
        s._release = lambda *args: None
    saved = {
        rid: (s.next_chunk, s.frames_emitted, s._mel, s._mel_base)
        for rid, s in streamer.streams.items()
    }

    def call():
        for rid, (chunk, emitted, mel, base) in saved.items():
            s = streamer.streams[rid]
            s.next_chunk, s.frames_emitted, s._mel, s._mel_base = (
                chunk,
                emitted,
                mel,
                base,
            )
        return streamer.step()

    return streamer, call


def bench_window_calls(
    t2w, dev: Device, concurrency: list[int], repeat: int = 3
) -> list[dict]:
    """One window call of c streams (c windows in one DiT solve + one BigVGAN call), with the
    runner's capture on (one CUDA graph per bucket; off CUDA it runs eagerly anyway) and off
    (`--speech-enforce-eager`): ms per call (best of `repeat`, after the first call, which
    captures), the first call's seconds, and audio seconds per call (36 codes per stream)."""
    rows = []
    for captured in (True, False):
        for c in concurrency:
            streamer, call = window_call_streams(
                t2w, c, enforce_eager=not captured, max_batch=max(concurrency)
            )
            with torch.no_grad():
                t = dev.now()
                call()
                first = dev.now() - t
                times = []
                for _ in range(repeat):
                    t = dev.now()
                    call()
                    times.append(dev.now() - t)
            ms = 1000 * min(times)
            audio = c * 36 / CODES_PER_SECOND
            rows.append(
                dict(
                    capture=captured and streamer.runner.captured,
                    concurrency=c,
                    ms_per_call=ms,
                    first_call_s=first,
                    audio_s_per_call=audio,
                    x_real_time=audio / (ms / 1000),
                )
            )
            print(
                f"  window call c={c} capture={rows[-1]['capture']}: {ms:.1f} ms "
                f"(first {first:.2f} s), {rows[-1]['x_real_time']:.1f}x real time",
                flush=True,
            )
            del streamer, call
    return rows


def window_call_table(rows: list[dict], dtype: str) -> list[str]:
    """real_size.md lines for `bench_window_calls`."""
    lines = [
        "",
        f"Token2Wav window calls ({dtype}; c streams' windows in one call: 72 codes through the DiT, "
        "36 kept, 10 time points; capture: one CUDA graph per window-batch bucket)",
        "",
        "| capture | conc | ms / call | first call s | audio s / call | x real time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['capture'] else 'off'} | {r['concurrency']} | {r['ms_per_call']:.1f} | "
            f"{r['first_call_s']:.2f} | {r['audio_s_per_call']:.2f} | {r['x_real_time']:.1f} |"
        )
    return lines
