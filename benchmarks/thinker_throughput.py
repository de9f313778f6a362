"""Text-only thinker throughput: our registered class versus vLLM's stock in-tree thinker.

Both run the same checkpoint in fresh processes, alternated A/B/A/B so that machine noise hits
both alike; ours has the plugin loaded (hidden-state capture patches installed, no request asking
for them), stock has every vLLM plugin switched off (VLLM_PLUGINS=""). Prints a table and the
ratios ours/stock of the medians and of the best runs, by wall time and by CPU time of the
(single, in-process) engine process. On a shared machine noise only ever slows a run down, so the
best of several runs is the steadiest estimate of what each variant costs. Target: ours >= 95%
of stock.

    python benchmarks/thinker_throughput.py [--model DIR | --bench] [--rounds 3] [--prompts 64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm import ModelRegistry
llm = LLM(args["model"], dtype="float32", max_model_len=2048, kv_cache_memory_bytes=2**29,
          enforce_eager=True, distributed_executor_backend="uni", enable_prefix_caching=False, seed=0)
cls = llm.apply_model(lambda m: type(m).__name__)[0]
prompts = [f"Request {i}: tell me a story about the number {i}." for i in range(args["prompts"])]
params = SamplingParams(temperature=0.0, max_tokens=args["tokens"], ignore_eos=True)
llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
t, c = time.perf_counter(), time.process_time()
outs = llm.generate(prompts, params, use_tqdm=False)
dt, dc = time.perf_counter() - t, time.process_time() - c
n = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps({"class": cls, "tokens": n, "seconds": dt, "cpu_seconds": dc}))
"""


def run(variant: str, args) -> dict:
    env = dict(os.environ)
    if variant == "stock":
        env["VLLM_PLUGINS"] = ""  # an allowlist naming no plugin: vLLM loads none
    else:
        env.pop("VLLM_PLUGINS", None)
    job = json.dumps(
        {"model": args.model, "prompts": args.prompts, "tokens": args.tokens}
    )
    out = subprocess.run(
        [sys.executable, "-c", WORKER, job],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="checkpoint dir (default: a tiny one built now)"
    )
    parser.add_argument(
        "--bench",
        action="store_true",
        help="the bench checkpoint (7B depths, widths / 8; built once into .cache/bench-omni)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.bench:
        from e2e import ROOT, bench_checkpoint

        args.model = str(bench_checkpoint(ROOT / ".cache" / "bench-omni"))
    elif args.model is None:
        from omni_vllm.testing.tiny import build_tiny_checkpoint

        args.model = str(build_tiny_checkpoint(tempfile.mkdtemp() + "/tiny"))

    rates: dict[str, list[float]] = {"ours": [], "stock": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "stock": []}
    print(
        f"{'round':>5} {'variant':>7} {'model class':>42} {'tokens':>7} {'s':>7} {'tok/s':>9} {'tok/cpu-s':>10}"
    )
    for r in range(args.rounds):
        for variant in ("stock", "ours") if r % 2 else ("ours", "stock"):
            res = run(variant, args)
            rate, cpu_rate = (
                res["tokens"] / res["seconds"],
                res["tokens"] / res["cpu_seconds"],
            )
            rates[variant].append(rate)
            cpu_rates[variant].append(cpu_rate)
            print(
                f"{r:>5} {variant:>7} {res['class']:>42} {res['tokens']:>7} {res['seconds']:>7.3f} "
                f"{rate:>9.1f} {cpu_rate:>10.1f}"
            )
    for label, table in (("tok/s (wall)", rates), ("tok/cpu-s", cpu_rates)):
        for stat, fn in (("median", statistics.median), ("best", max)):
            ours, stock = fn(table["ours"]), fn(table["stock"])
            print(
                f"{stat:>6} {label:>12}: ours {ours:9.1f}, stock {stock:9.1f}; ours/stock = {ours / stock:.3f} "
                "(target >= 0.95)"
            )


if __name__ == "__main__":
    main()
