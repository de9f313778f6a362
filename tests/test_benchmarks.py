"""The benchmarks' checkpoint and the end-to-end benchmark.

* The bench checkpoint's config (`BENCH_SIZES`, no weights built): Qwen2.5-Omni-7B's depths, its
  widths / 8, and the constraints of the pitfalls list (head dims vLLM's CPU attention supports,
  M-RoPE sections, widths that must equal the thinker's, the DiT covering the codec vocabulary).
* benchmarks/real_size.py: its sizes are the 7B's (parameter counts of the talker, DiT and BigVGAN
  built on the meta device), and `--smoke` runs end to end in a process where `import vllm` fails,
  which is how it runs on the GPU machine (no vLLM there): the speech path needs no vLLM.
* benchmarks/e2e.py on the tiny checkpoint at its smallest settings. Not a measurement (the tiny
  checkpoint's costs say nothing), only that the one command starts all three systems in their own
  processes, finishes, and writes its table, JSON and plot. Slow: the two omni-vllm processes each
  start a vLLM engine (about 65 s in all on two cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_config_is_the_7b_with_widths_divided_by_8():
    from omni_vllm.testing.tiny import BENCH_SIZES, build_config

    config = build_config(
        532, BENCH_SIZES
    )  # 532: the trained tokenizer's size (the model's vocab is larger)
    thinker, talker = config.thinker_config, config.talker_config
    text, audio, vision = (
        thinker.text_config,
        thinker.audio_config,
        thinker.vision_config,
    )
    dit, bigvgan = (
        config.token2wav_config.dit_config,
        config.token2wav_config.bigvgan_config,
    )
    head_dim = text.hidden_size // text.num_attention_heads
    # depths as the real model
    assert (text.num_hidden_layers, audio.encoder_layers, vision.depth) == (28, 32, 32)
    assert (talker.num_hidden_layers, dit.num_hidden_layers) == (24, 22)
    assert len(bigvgan.upsample_rates) == 6 and len(bigvgan.resblock_kernel_sizes) == 3
    # widths / 8 (real 7B values)
    widths = [
        (text.vocab_size, 152064),
        (text.hidden_size, 3584),
        (text.intermediate_size, 18944),
        (text.num_key_value_heads * head_dim, 4 * 128),
        (audio.d_model, 1280),
        (audio.encoder_ffn_dim, 5120),
        (vision.hidden_size, 1280),
        (talker.hidden_size, 896),
        (talker.intermediate_size, 18944),
        (talker.num_attention_heads * talker.head_dim, 12 * 128),
        (talker.num_key_value_heads * talker.head_dim, 4 * 128),
        (dit.hidden_size, 1024),
        (dit.emb_dim, 512),
        (dit.enc_emb_dim, 192),
        (dit.enc_dim, 128),
        (bigvgan.upsample_initial_channel, 1536),
    ]
    assert all(ours * 8 == real for ours, real in widths), widths
    # the pitfalls: head dims vLLM's CPU attention supports, M-RoPE, shared widths, codec vocabulary
    assert head_dim in (32, 64, 80, 96, 112, 128)
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert sum(talker.rope_parameters["mrope_section"]) == talker.head_dim // 2
    assert (
        min(
            audio.d_model // audio.encoder_attention_heads,
            vision.hidden_size // vision.num_heads,
        )
        >= 32
    )
    assert (
        audio.output_dim
        == vision.out_hidden_size
        == talker.embedding_size
        == text.hidden_size
    )
    assert dit.num_embeds >= talker.vocab_size


@pytest.mark.slow
def test_e2e_benchmark_runs_and_reports(tiny_checkpoint_dir, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "e2e.py"),
        "--model",
        str(tiny_checkpoint_dir),
        "--requests",
        "3",
        "--concurrency",
        "1",
        "2",
        "--tokens",
        "4",
        "--codes",
        "24",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (
        "| omni-vllm streaming | 2 |" in proc.stdout and "target >= 8x" in proc.stdout
    )
    assert (tmp_path / "e2e.md").read_text().startswith("model ")
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "e2e.json").read_text())
    results = report["results"]
    assert set(results) == {"reference", "streaming", "non-streaming"}
    assert [r["concurrency"] for r in results["streaming"]["rows"]] == [1, 2]
    for system in results.values():
        for row in system["rows"]:
            assert row["requests"] == 3 and row["text_tokens"] == 3 * 4
            # The same work everywhere: 24 codes = 0.48 s of speech per request (random weights never stop).
            assert row["audio_s"] == pytest.approx(3 * 24 * 2 * 240 / 24000)
            assert row["ttfa_p50"] <= row["completion_p50"] and row["peak_rss_mib"] > 0
    assert report["ratios"]["throughput"] > 0 and set(
        report["ratios"]["ttfa_over_completion"]
    ) == {"1", "2"}


def test_real_sizes_are_the_7b():
    import torch
    from transformers import Qwen2_5OmniBigVGANConfig, Qwen2_5OmniDiTConfig
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_size import REAL_SIZES

    from omni_vllm.testing.tiny import BENCH_SIZES, build_config

    config = build_config(532, REAL_SIZES)
    talker, t2w = config.talker_config, config.token2wav_config
    dit, bigvgan = t2w.dit_config, t2w.bigvgan_config
    # The released 7B talker (config.json): 896 wide, 24 layers, 12 query / 4 KV heads of 128, MLP 18944.
    assert (talker.hidden_size, talker.num_hidden_layers, talker.intermediate_size) == (
        896,
        24,
        18944,
    )
    assert (
        talker.num_attention_heads,
        talker.num_key_value_heads,
        talker.head_dim,
    ) == (12, 4, 128)
    assert (
        talker.embedding_size == config.thinker_config.text_config.hidden_size == 3584
    )
    assert sum(talker.rope_parameters["mrope_section"]) == 64
    # transformers' DiT / BigVGAN defaults are the 7B's; ours are the same but for the codec table
    # (the talker's 8448 codes, so random codes stay in range) and dropout (eval anyway).
    for ours, default in (
        (dit, Qwen2_5OmniDiTConfig()),
        (bigvgan, Qwen2_5OmniBigVGANConfig()),
    ):
        for key, value in default.to_diff_dict().items():
            if key not in (
                "num_embeds",
                "dropout",
                "transformers_version",
                "rope_parameters",
            ):
                assert getattr(ours, key) == value or list(getattr(ours, key)) == list(
                    value
                ), key
    # BENCH_SIZES is these widths / 8 (their test above checks it against the 7B's numbers too).
    assert (
        REAL_SIZES.talker_hidden == 8 * BENCH_SIZES.talker_hidden
        and REAL_SIZES.dit_hidden == 8 * BENCH_SIZES.dit_hidden
    )

    with torch.device("meta"):
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (
                ("talker", ref.Qwen2_5OmniTalkerForConditionalGeneration(talker)),
                ("dit", ref.Qwen2_5OmniToken2WavDiTModel(dit)),
                ("bigvgan", ref.Qwen2_5OmniToken2WavBigVGANModel(bigvgan)),
            )
        }
    # DESIGN.md's sizes: talker 1.35 B, DiT 0.33 B, BigVGAN 0.12 B.
    assert counts["talker"] == pytest.approx(1.35e9, rel=0.02), counts
    assert counts["dit"] == pytest.approx(0.33e9, rel=0.05), counts
    assert counts["bigvgan"] == pytest.approx(0.12e9, rel=0.1), counts


# Run a script as if vLLM were not installed, as on the GPU machine: `import vllm` raises
# ModuleNotFoundError and `importlib.util.find_spec("vllm")` is None (what optional checks see).
WITHOUT_VLLM = """
import runpy, sys

sys.modules["vllm"] = None
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
assert sys.modules["vllm"] is None and not any(m.startswith("vllm.") for m in sys.modules), "vllm was imported"
"""


# Slow: the real-size speech path in miniature (every stage, and transformers' reference) in its
# own interpreter, a minute or more on 2 cores.
@pytest.mark.slow
def test_real_size_smoke_runs_without_vllm(tmp_path):
    cmd = [
        sys.executable,
        "-c",
        WITHOUT_VLLM,
        str(ROOT / "benchmarks" / "real_size.py"),
        "--smoke",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (
        "SMOKE" in proc.stdout
        and "| transformers, one at a time | off | 1 |" in proc.stdout
    )
    assert (
        (tmp_path / "real_size.md")
        .read_text()
        .startswith("Qwen2.5-Omni-7B speech path")
    )
    assert (tmp_path / "real_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "real_size.json").read_text())
    assert set(report["talker"]) == {"fp32", "bf16"} and set(report["token2wav"]) == {
        "fp32 / fp32",
        "bf16 / bf16",
    }
    for r in report["talker"].values():
        assert [row["concurrency"] for row in r["rows"]] == [1, 2] and all(
            row["codes_per_s"] > 0 for row in r["rows"]
        )
    for r in report["token2wav"].values():
        assert [row["batch"] for row in r["rows"]] == [1, 2] and all(
            row["s_per_audio_s"] > 0 for row in r["rows"]
        )
    assert (
        report["quality"]["bf16"]["mel_snr_db"] > 20
        and report["quality"]["bf16"]["wav_snr_db"] > 20
    )
    pipeline = report["pipeline"]["rows"]
    assert [row["concurrency"] for row in pipeline] == [1, 2]
    for row in pipeline:
        assert (
            0 < row["ttfa_p50"] <= row["ttfa_max"] <= row["wall_s"]
            and row["audio_s"] > 0
        )
    assert report["reference"]["audio_s"] == pytest.approx(24 * 2 * 240 / 24000)


def test_speech_host_cost_talker_section_runs(tmp_path):
    """benchmarks/speech_host_cost.py --section talker (the 7B talker's depth at widths / 16):
    it runs without vLLM and reports aten ops per decode step that do not grow with the batch."""
    cmd = [
        sys.executable,
        "-c",
        "import sys, runpy; sys.modules['vllm'] = None; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        str(ROOT / "benchmarks" / "speech_host_cost.py"),
        "--section",
        "talker",
        "--talker-batches",
        "1",
        "4",
        "--repeat",
        "1",
        "--eager-only",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "speech_host_cost.json").read_text())["talker"][
        "rows"
    ]
    ops = {r["batch"]: r["aten_ops"] for r in rows}
    assert set(ops) == {1, 4} and ops[4] <= 1.1 * ops[1]
