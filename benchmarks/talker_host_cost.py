"""The talker decode step's host cost as the batch grows: ms and aten ops per step.

A CPU proxy of a launch-bound GPU (the issue's measurement): the 7B talker's depth (24 layers,
head dim 128, its vocabularies) at widths / 16, so the matmuls are tiny and what remains is the
per-op cost; each aten op the profiler counts is close to one kernel launch on CUDA. One thread.
Each request has a 20-token prompt and a 100-position context when measured; every request of a
step decodes (prefills are not timed). "eager" is the runner as it runs on CPU and, with
`--speech-enforce-eager`, on CUDA; "compiled" wraps the decode step in `torch.compile` (inductor
on CPU), measured after its compile.

    python benchmarks/talker_host_cost.py                  # batches 1, 4, 16, 64
    python benchmarks/talker_host_cost.py --compiled       # also torch.compile (minutes to compile)

Before/after side by side: `benchmarks/speech_host_cost.py --section talker --checkout OLD_TREE`.

Imports neither vLLM nor anything beyond torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from talker_batching import admit, random_talker, talker_config  # noqa: E402


def step_cost(talker, rids: list[str], steps: int) -> tuple[float, int]:
    """(ms per decode step, aten ops per step) of `rids` stepping together."""
    with torch.profiler.profile() as prof:
        talker.step(rids)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    t0 = time.perf_counter()
    for _ in range(steps):
        talker.step(rids)
    return 1000 * (time.perf_counter() - t0) / steps, ops


def talker_rows(
    batches: list[int], *, scale: int = 16, steps: int = 10, compiled: bool = False
) -> list[dict]:
    torch.set_num_threads(1)
    config = talker_config(scale)
    rows = []
    modes = ["eager", "compiled"] if compiled else ["eager"]
    for mode in modes:
        talker = random_talker(
            config,
            max_slots=max(batches),
            max_len=512,
            kv_cache_tokens=max(batches) * 512,
        )
        if mode == "compiled" and hasattr(talker, "runner"):
            runner = talker.runner
            torch._dynamo.config.cache_size_limit = 64
            runner._decode_step = torch.compile(runner._decode_step, dynamic=False)
        for batch in batches:
            rids = admit(talker, batch, prompt=20, max_codes=400)
            # reach a 100-position context (the same width bucket at every batch)
            for _ in range(78):
                talker.step(rids)
            t0 = time.perf_counter()
            talker.step(rids)
            first = time.perf_counter() - t0
            ms, ops = step_cost(talker, rids, steps)
            rows.append(
                dict(
                    mode=mode,
                    batch=batch,
                    ms_per_step=ms,
                    aten_ops=ops,
                    first_step_s=first,
                )
            )
            print(
                f"  talker {mode} batch {batch}: {ms:.1f} ms/step, {ops} aten ops",
                flush=True,
            )
            for rid in rids:
                talker.remove(rid)
    return rows


def print_talker_table(rows: list[dict], scale: int = 16) -> None:
    print(
        f"\nTalker decode step, the 7B's depth at widths / {scale}, CPU, 1 thread "
        "(aten ops ~ kernel launches on a GPU; real time is one step per 20 ms)"
    )
    print("| mode | batch | ms / step | aten ops / step | ops vs batch 1 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        first = next(x for x in rows if x["mode"] == r["mode"])
        print(
            f"| {r['mode']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['aten_ops']:,} | "
            f"{r['aten_ops'] / first['aten_ops']:.2f} |"
        )


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--scale", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = talker_rows(
        [int(b) for b in args.batches.split(",")],
        scale=args.scale,
        steps=args.steps,
        compiled=args.compiled,
    )
    print_talker_table(rows, args.scale)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
