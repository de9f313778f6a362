"""Text-only thinker throughput: our registered class versus vLLM's stock in-tree thinker.

Both run the same checkpoint in fresh processes, alternated A/B/A/B so that machine noise hits
both alike; ours has the plugin loaded (hidden-state capture patches installed, no request asking
for them), stock has every vLLM plugin switched off (VLLM_PLUGINS=""). Prints a table and the
ratio of medians. Target: ours >= 95% of stock.

    python benchmarks/thinker_throughput.py [--model DIR] [--rounds 3] [--prompts 64] [--tokens 64]
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
t = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t
n = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps({"class": cls, "tokens": n, "seconds": dt}))
"""


def run(variant: str, args) -> dict:
    env = dict(os.environ)
    if variant == "stock":
        env["VLLM_PLUGINS"] = ""  # an allowlist naming no plugin: vLLM loads none
    else:
        env.pop("VLLM_PLUGINS", None)
    job = json.dumps({"model": args.model, "prompts": args.prompts, "tokens": args.tokens})
    out = subprocess.run(
        [sys.executable, "-c", WORKER, job], env=env, capture_output=True, text=True, check=True
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: a tiny one built now)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.model is None:
        from omni_vllm.testing.tiny import build_tiny_checkpoint

        args.model = str(build_tiny_checkpoint(tempfile.mkdtemp() + "/tiny"))

    rates: dict[str, list[float]] = {"ours": [], "stock": []}
    print(f"{'round':>5} {'variant':>7} {'model class':>42} {'tokens':>7} {'s':>7} {'tok/s':>9}")
    for r in range(args.rounds):
        for variant in ("stock", "ours") if r % 2 else ("ours", "stock"):
            res = run(variant, args)
            rate = res["tokens"] / res["seconds"]
            rates[variant].append(rate)
            print(f"{r:>5} {variant:>7} {res['class']:>42} {res['tokens']:>7} {res['seconds']:>7.3f} {rate:>9.1f}")
    ours, stock = statistics.median(rates["ours"]), statistics.median(rates["stock"])
    print(f"\nmedian tok/s: ours {ours:.1f}, stock {stock:.1f}; ours/stock = {ours / stock:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
