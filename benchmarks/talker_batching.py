"""The talker's decode rate at Qwen2.5-Omni-7B's real widths, by batch size, dtype and threads.

Random weights built in code (no download): the 7B's talker (hidden 896, 24 layers, 12 query heads
and 4 KV heads of 128, MLP 18944, thinker width 3584 in, 8448 codes out; 1.35 B parameters). Each
request has a `--prompt`-token prompt whose thinker reply is already done (the reply track is
tts_text_end then pads), and samples with Qwen2.5-Omni's defaults; the stop codes' rows of the codec
head are zeroed so that random weights never stop a request early. Measured: decode steps only
(after a warm-up), ms per step, codes/s over all requests, and the batch's gain over batch 1.

    python benchmarks/talker_batching.py                      # fp32 and bf16, 1 and 2 threads, batch 1 and 16
    python benchmarks/talker_batching.py --smoke              # widths / 8, a few steps (CI)
    python benchmarks/talker_batching.py --device cuda --batches 1,8,32,64 --threads 0

Imports neither vLLM nor anything beyond torch and transformers, so that the real-size speech
benchmark can reuse `talker_config`, `random_talker` and `decode_rate` on a machine without vLLM.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from omni_vllm.talker import Talker, TalkerSampling
from omni_vllm.testing.released import TALKER_SIZES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Qwen2.5-Omni-7B's talker_config (released config.json; the codec vocabulary, 8448, is the
# config's default); `scale` divides the widths (not the depth, the head dim or the vocabularies)
# for quick runs.
REAL_TALKER = TALKER_SIZES["7B"]


def talker_config(scale: int = 1):
    """A full Qwen2.5-Omni config whose talker has the 7B's sizes (widths / `scale`)."""
    from transformers import Qwen2_5OmniConfig

    t = dict(REAL_TALKER)
    if scale > 1:
        t.update(
            hidden_size=t["hidden_size"] // scale,
            intermediate_size=t["intermediate_size"] // scale,
            embedding_size=t["embedding_size"] // scale,
            num_attention_heads=max(1, t["num_attention_heads"] // scale),
            num_key_value_heads=max(1, t["num_key_value_heads"] // scale),
        )
    talker = dict(
        t,
        rope_parameters=dict(
            rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]
        ),
        max_window_layers=t["num_hidden_layers"],
    )
    return Qwen2_5OmniConfig(talker_config=talker, enable_audio_output=True)


def random_talker(
    config, *, dtype=torch.float32, device="cpu", seed: int = 0, **talker_kwargs
) -> Talker:
    """A Talker with random weights of `config`'s talker sizes, built in `dtype` on `device`."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniTalkerForConditionalGeneration,
    )

    tcfg = config.talker_config
    with torch.device("meta"):
        shapes = {
            k: v.shape
            for k, v in Qwen2_5OmniTalkerForConditionalGeneration(tcfg)
            .state_dict()
            .items()
        }
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            bound = (
                1 / shape[-1] ** 0.5 if len(shape) > 1 else 0.02
            )  # PyTorch's default Linear scale
            state[name] = torch.empty(shape, dtype=dtype, device=device).uniform_(
                -bound, bound, generator=g
            )
    state["codec_head.weight"][
        [tcfg.tts_codec_pad_token_id, tcfg.tts_codec_end_token_id]
    ] = 0
    ids = [tcfg.tts_text_end_token_id, tcfg.tts_text_pad_token_id, 151859 + 100]
    rows = {
        i: torch.randn(tcfg.embedding_size, generator=torch.Generator().manual_seed(i))
        for i in ids
    }
    return Talker(
        config,
        state,
        rows,
        {"Chelsie": ids[2]},
        device=device,
        dtype=dtype,
        **talker_kwargs,
    )


def admit(
    talker: Talker, batch: int, *, prompt: int = 20, max_codes: int = 64
) -> list[str]:
    """Admit `batch` requests with a `prompt`-token prompt and a finished thinker, and prefill them."""
    e = talker.model.config.embedding_size
    g = torch.Generator().manual_seed(batch)
    rids = [f"r{i}" for i in range(batch)]
    for i, rid in enumerate(rids):
        talker.add_request(
            rid,
            prompt_ids=torch.full((prompt,), 1000),
            prompt_embeds=torch.randn(prompt, e, generator=g),
            prompt_hidden=torch.randn(prompt, e, generator=g),
            prompt_positions=torch.arange(prompt).expand(3, prompt),
            voice="Chelsie",
            sampling=TalkerSampling(seed=i),
            max_codes=max_codes,
        )
        talker.finish_thinker(rid)
    talker.step(rids)  # prefill
    return rids


def time_steps(
    talker: Talker, rids: list[str], *, steps: int = 6, warmup: int = 2
) -> dict:
    """Time `steps` decode steps of all `rids` together (after `warmup` steps)."""
    sync = torch.cuda.synchronize if talker.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        talker.step(rids)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    codes = 0
    for _ in range(steps):
        codes += sum(out.code is not None for out in talker.step(rids).values())
    sync()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(
        batch=len(rids),
        ms_per_step=1000 * seconds / steps,
        codes_per_s=codes / seconds,
        codes_per_cpu_s=codes / cpu,
        kv_bytes=talker.kv_cache_bytes(),
    )


def decode_rate(
    talker: Talker, batch: int, *, prompt: int = 20, steps: int = 6, warmup: int = 2
) -> dict:
    """Decode rate of `batch` requests stepping together (prefill not timed)."""
    rids = admit(talker, batch, prompt=prompt, max_codes=steps + warmup + 2)
    try:
        return time_steps(talker, rids, steps=steps, warmup=warmup)
    finally:
        for rid in rids:
            talker.remove(rid)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument(
        "--threads", default="1,2", help="torch threads to try (0: leave as is)"
    )
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--scale", type=int, default=1, help="divide the widths (1: the real 7B talker)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="widths / 8, 2 steps, one thread"
    )
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.scale, args.steps, args.threads = 8, 2, "1"
    config = talker_config(args.scale)
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    warmup = 2
    rows = []
    for name in args.dtypes.split(","):
        t0 = time.perf_counter()
        talker = random_talker(
            config, dtype=DTYPES[name], device=args.device, max_slots=max(batches)
        )
        build = time.perf_counter() - t0
        params = sum(p.numel() for p in talker.model.parameters())
        print(
            f"{name}: talker of {params / 1e9:.2f} B parameters built in {build:.1f} s",
            flush=True,
        )
        for batch in batches:
            rids = admit(
                talker,
                batch,
                prompt=args.prompt,
                max_codes=len(threads) * (args.steps + warmup) + 2,
            )
            for n in threads:
                if n:
                    torch.set_num_threads(n)
                r = time_steps(talker, rids, steps=args.steps, warmup=warmup)
                r.update(
                    dtype=name, threads=n or torch.get_num_threads(), device=args.device
                )
                key = (name, r["threads"])
                base = next(
                    (
                        x
                        for x in rows
                        if (x["dtype"], x["threads"], x["batch"]) == (*key, 1)
                    ),
                    r,
                )
                r["vs_batch1"] = r["codes_per_s"] / base["codes_per_s"]
                r["cpu_vs_batch1"] = r["codes_per_cpu_s"] / base["codes_per_cpu_s"]
                rows.append(r)
                print(
                    f"  {name} threads={r['threads']} batch={batch}: {r['ms_per_step']:.0f} ms/step, "
                    f"{r['codes_per_s']:.1f} codes/s, {r['codes_per_cpu_s']:.1f} codes per CPU-s",
                    flush=True,
                )
            for rid in rids:
                talker.remove(rid)
        del talker
    print(
        f"\nTalker decode at the 7B's widths / {args.scale} on {args.device}, prompt {args.prompt}, "
        f"{args.steps} timed steps (50 codes = 1 s of speech)"
    )
    print(
        "| dtype | threads | batch | ms/step | codes/s | codes/s per request | x batch 1 | codes per CPU-s | "
        "x batch 1 (CPU-s) | KV MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['threads']} | {r['batch']} | {r['ms_per_step']:.0f} | {r['codes_per_s']:.1f} | "
            f"{r['codes_per_s'] / r['batch']:.1f} | {r['vs_batch1']:.1f} | {r['codes_per_cpu_s']:.1f} | "
            f"{r['cpu_vs_batch1']:.1f} | {r['kv_bytes'] / 2**20:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
