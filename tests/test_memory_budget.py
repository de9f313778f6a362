"""The speech path's memory budget (omni_vllm.memory, omni_vllm.api.server.plan_speech), its dtypes, and its
load errors.

* The estimate against what is really allocated: the tiny checkpoint's loaded modules (weights,
  talker KV per position, Token2Wav's peak for a window batch measured with a simulated device),
  and the released 7B's modules built on the meta device (weights at the real size).
* The share arithmetic with a simulated GPU size: what is taken out of vLLM's
  `gpu_memory_utilization`, `--max-speaking` from the budget, errors that name the flags.
* Each load error (out of memory at an allocation, tensors missing or unexpected, a bad dtype) is a
  SpeechLoadError naming the flag, or with `allow_text_only` a text-only engine.
* A prompt that cannot fit the talker is refused with a 400 before the thinker runs (a real server).
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import torch

from omni_vllm import memory as M
from omni_vllm.errors import SpeechLoadError
from omni_vllm.speech import SpeechEngine, load_speech_modules
from omni_vllm.streaming import StreamConfig
from omni_vllm.testing.device_memory import SimulatedDeviceMemory
from omni_vllm.testing.released import released_config

GiB = 2**30
FP32 = dict(talker=torch.float32, token2wav=torch.float32, vocoder=torch.float32)


def _bytes(module: torch.nn.Module) -> int:
    return sum(
        t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
    )


def _load(ckpt, dtypes=FP32, **kw):
    return load_speech_modules(
        ckpt,
        device="cpu",
        dtypes=dtypes,
        **{**dict(max_slots=2, max_len=64, kv_cache_tokens=128, max_codes=32), **kw},
    )


@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig.from_pretrained(tiny_checkpoint_dir)


# ------------------------------------------------------------------- the estimate vs allocations


@pytest.mark.parametrize(
    "talker_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"]
)
def test_memory_budget_weights_match_loaded_modules(
    tiny_checkpoint_dir, tiny_config, talker_dtype
):
    talker, t2w = _load(tiny_checkpoint_dir, dict(FP32, talker=talker_dtype))
    est = M.estimate_speech_memory(
        tiny_config, max_speaking=1, positions=64, talker_dtype=talker_dtype
    )
    # Buffers (RoPE frequencies) are counted as fp32: the talker keeps inv_freq in fp32.
    slack = (
        sum(b.numel() for b in talker.model.buffers()) * 2
        if talker_dtype != torch.float32
        else 0
    )
    assert est.talker_weights - slack <= _bytes(talker.model) <= est.talker_weights
    assert est.token2wav_weights == _bytes(t2w.model)


def test_memory_budget_kv_per_token_matches_talker_cache(
    tiny_checkpoint_dir, tiny_config
):
    talker, _ = _load(tiny_checkpoint_dir, max_slots=3, max_len=40)
    per_token = M.talker_kv_bytes_per_token(tiny_config, torch.float32)
    if hasattr(
        talker, "kv_cache_bytes"
    ):  # the paged talker (contract.md): memory follows use
        assert talker.kv_cache_bytes() <= 3 * 40 * per_token
    else:  # preallocated slots: max_slots x max_len positions per layer
        allocated = sum(
            t.numel() * t.element_size() for t in [*talker.k_cache, *talker.v_cache]
        )
        assert allocated == 3 * 40 * per_token


@pytest.mark.parametrize("size", ["7B", "3B"])
def test_memory_budget_released_weights_on_meta(size):
    """The released checkpoints' speech modules at their real sizes (meta device, nothing allocated):
    the estimate's bytes are those of the modules cast as the speech path casts them."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    config = released_config(size)
    with torch.device("meta"):
        talker = ref.Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config).to(
            torch.bfloat16
        )
        t2w = ref.Qwen2_5OmniToken2WavModel(config.token2wav_config)
    est = M.estimate_speech_memory(
        config, max_speaking=1, positions=4096, talker_dtype=torch.bfloat16
    )
    buffers = sum(b.numel() for b in talker.buffers())
    assert est.talker_weights == _bytes(talker) + 2 * buffers  # buffers counted fp32
    assert est.token2wav_weights == _bytes(t2w)
    params = M.module_parameters(config)
    if size == "7B":  # DESIGN.md: talker 1.35 B, DiT 0.33 B, BigVGAN 0.12 B
        assert round(params["talker"][0] / 1e9, 2) == 1.35
        assert (
            round(params["dit"][0] / 1e9, 2) == 0.33
            and round(params["bigvgan"][0] / 1e9, 2) == 0.12
        )
        # KV per position: 24 layers x 2 x 4 heads x 128 in bf16
        assert (
            M.talker_kv_bytes_per_token(config, torch.bfloat16) == 24 * 2 * 4 * 128 * 2
        )


def _window_peak(t2w, batch: int, stream: StreamConfig) -> int:
    """Measured peak bytes of one batched Token2Wav call over `batch` default windows (DiT then BigVGAN)."""
    codes = [
        torch.randint(
            0, 8000, (stream.chunk + stream.left_context + stream.look_ahead,)
        )
        for _ in range(batch)
    ]
    voice = t2w.voices[0]
    with SimulatedDeviceMemory() as dit:
        t2w.code2mel(codes, [voice] * batch, list(range(batch)), num_steps=2)
    mels = [
        torch.randn(
            t2w.mel_dim, 2 * stream.chunk + stream.vocoder_left + stream.vocoder_right
        )
        for _ in range(batch)
    ]
    with SimulatedDeviceMemory() as vocoder:
        t2w.mel2wav(mels)
    return max(dit.peak, vocoder.peak)


@pytest.mark.parametrize("batch", [1, 3])
def test_memory_budget_token2wav_peak_bounds_measured(
    tiny_checkpoint_dir, tiny_config, batch
):
    _, t2w = _load(tiny_checkpoint_dir)
    stream = StreamConfig()
    peak = _window_peak(t2w, batch, stream)
    est = M.estimate_speech_memory(
        tiny_config,
        max_speaking=batch,
        positions=64,
        talker_dtype=torch.float32,
        stream=stream,
    )
    assert est.token2wav_peak >= peak
    assert batch * est.window_bytes >= peak  # the per-window part alone covers it ...
    assert batch * est.window_bytes <= 2 * peak  # ... and is not far above


@pytest.mark.slow
def test_memory_budget_token2wav_peak_real_size():
    """At the 7B's Token2Wav sizes (random weights, ~1 min on one core): measured 27 MiB (DiT) and
    30 MiB (BigVGAN) for one default window in fp32."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    from omni_vllm.token2wav import Token2Wav

    config = released_config("7B")
    config.token2wav_config.dit_config.dropout = 0.0
    state = ref.Qwen2_5OmniToken2WavModel(config.token2wav_config).state_dict()
    speakers = {
        "Chelsie": dict(
            cond=torch.randn(192), ref_mel=torch.randn(300, 80), bos_token=151870
        )
    }
    t2w = Token2Wav(config.token2wav_config, state, speakers)
    del state
    peak = _window_peak(t2w, 1, StreamConfig())
    est = M.estimate_speech_memory(
        config, max_speaking=1, positions=64, talker_dtype=torch.bfloat16
    )
    print(
        f"7B Token2Wav window: measured {peak / 2**20:.1f} MiB, estimated {est.token2wav_peak / 2**20:.1f} MiB"
    )
    assert peak <= est.token2wav_peak <= peak + M.TOKEN2WAV_FIXED + peak


# ------------------------------------------------------------------------- the share arithmetic


def _plan(config, **kw):
    base = dict(
        device="cuda:0",
        device_total=80 * GiB,
        shared=True,
        talker_dtype=torch.bfloat16,
        max_model_len=8192,
        max_codes=4096,
    )
    return M.plan_speech_memory(config, **{**base, **kw})


def test_memory_budget_share_arithmetic():
    config = released_config("7B")
    positions = 8192 + 4096
    kv = M.talker_kv_bytes_per_token(config, torch.bfloat16)

    # Shared GPU, defaults: 25 % of it, taken out of vLLM's default; the KV pool gets what is left.
    plan = _plan(config)
    assert plan.budget == int(0.25 * 80 * GiB) and plan.memory.total <= plan.budget
    bigger = replace(plan.memory, pool_tokens=plan.kv_cache_tokens + M.KV_BLOCK)
    assert bigger.total > plan.budget  # as large as fits
    assert plan.kv_cache_tokens == M.pool_that_fits(plan.memory, plan.budget)
    assert plan.memory.talker_kv == (plan.kv_cache_tokens + M.KV_BLOCK) * kv
    vllm_default = M._vllm_default_utilization()  # 0.92 in vLLM 0.32
    assert plan.gpu_memory_utilization == pytest.approx(
        vllm_default - plan.budget / (80 * GiB), abs=1e-3
    )
    assert plan.gpu_memory_utilization <= vllm_default - plan.budget / (80 * GiB)
    assert plan.talker_max_len == positions
    # the goal: >= 64 typical voices beside the 7B thinker at 8192 (19 worst-case before)
    assert plan.max_speaking == 64 and plan.memory.typical_voices >= 64
    assert plan.kv_cache_tokens >= positions

    # A GPU of its own: vLLM's share untouched, 90 % of it for speech; >= 200 typical voices.
    own = _plan(config, device="cuda:1", shared=False)
    assert own.gpu_memory_utilization is None and own.budget == int(0.9 * 80 * GiB)
    assert own.max_speaking == 256 and own.memory.typical_voices >= 200
    assert own.memory.total <= own.budget

    # --speech-gpu-memory-gb: the pool fills it; --max-speaking given: the batch bound only.
    fixed = _plan(config, budget_gb=30)
    assert fixed.budget == 30 * GiB and fixed.kv_cache_tokens > plan.kv_cache_tokens
    given = _plan(config, max_speaking=4)
    assert given.max_speaking == 4 and given.budget == plan.budget
    assert given.kv_cache_tokens > plan.kv_cache_tokens  # less workspace, more pool
    # a small budget: fewer speakers per step, as many as the pool holds typical voices
    small = _plan(config, budget_gb=8)
    assert 1 <= small.max_speaking < 64
    assert small.memory.typical_voices >= small.max_speaking

    # The user's --gpu-memory-utilization is kept if the speech share fits beside it.
    kept = _plan(config, budget_gb=10, gpu_memory_utilization=0.85)
    assert kept.gpu_memory_utilization is None and "left as is" in kept.report()

    # CPU: no device share, 32 speakers, a pool of 32 typical voices (at least one longest).
    cpu = _plan(config, device="cpu", device_total=None, shared=False)
    assert (
        cpu.max_speaking == 32
        and cpu.budget is None
        and cpu.gpu_memory_utilization is None
        and cpu.kv_cache_tokens == max(32 * M.TYPICAL_POSITIONS, positions)
    )

    # bf16 vs fp32: the talker's KV per position doubles, so the pool holds fewer positions.
    fp32 = _plan(config, max_speaking=4, talker_dtype=torch.float32)
    assert fp32.memory.kv_per_token == 2 * given.memory.kv_per_token
    assert fp32.kv_cache_tokens < given.kv_cache_tokens


def test_memory_budget_errors_name_the_flags():
    config = released_config("7B")
    with pytest.raises(M.SpeechMemoryError, match="--speech-gpu-memory-gb") as e:
        _plan(config, budget_gb=1)  # smaller than the weights
    assert "--allow-text-only" in str(e.value) and "to hold one request of" in str(
        e.value
    )
    with pytest.raises(M.SpeechMemoryError, match="--max-speaking 256"):
        _plan(config, max_speaking=256, budget_gb=9)
    with pytest.raises(M.SpeechMemoryError, match="lower --gpu-memory-utilization"):
        _plan(config, max_speaking=8, gpu_memory_utilization=0.95)
    with pytest.raises(M.SpeechMemoryError, match="leaves vLLM"):
        _plan(config, max_speaking=64, device_total=40 * GiB, budget_gb=36)
    with pytest.raises(M.SpeechMemoryError, match="--speech-dtype"):
        M.speech_dtypes("float64", torch.bfloat16)


def test_memory_budget_plan_from_server_args(tiny_checkpoint_dir, capsys):
    """omni_vllm.api.server.parse_args settles the plan before the engine is built (simulated 8 GiB GPU)."""
    from omni_vllm.api.server import parse_args

    base = [
        "--model",
        str(tiny_checkpoint_dir),
        "--max-model-len",
        "2048",
        "--max-audio-tokens",
        "512",
    ]
    default = M._vllm_default_utilization()
    shared = parse_args([*base, "--speech-device", "cuda:0"], device_total=8 * GiB)
    assert shared.max_speaking >= 1 and shared.talker_max_len == 2048 + 512
    assert shared.gpu_memory_utilization == pytest.approx(
        default - shared.speech_gpu_memory_gb / 8, abs=1e-3
    )
    own = parse_args(
        [*base, "--speech-device", "cuda:1"], device_total=8 * GiB
    )  # TP 1: vLLM on cuda:0
    assert (
        own.gpu_memory_utilization == default
        and own.speech_gpu_memory_gb == pytest.approx(0.9 * 8)
    )
    two = parse_args(
        [*base, "--speech-device", "cuda:1", "-tp", "2"], device_total=8 * GiB
    )
    assert two.gpu_memory_utilization < default  # TP 2 uses cuda:1 too
    given = parse_args(
        [
            *base,
            "--speech-device",
            "cuda:0",
            "--max-speaking",
            "3",
            "--speech-dtype",
            "bfloat16",
        ],
        device_total=8 * GiB,
    )
    assert given.max_speaking == 3

    with pytest.raises(SystemExit, match="--speech-gpu-memory-gb"):
        parse_args(
            [*base, "--speech-device", "cuda:0", "--speech-gpu-memory-gb", "0.01"],
            device_total=8 * GiB,
        )
    text_only = parse_args(
        [
            *base,
            "--speech-device",
            "cuda:0",
            "--speech-gpu-memory-gb",
            "0.01",
            "--allow-text-only",
        ],
        device_total=8 * GiB,
    )
    assert (
        "GiB" in text_only.speech_disabled
        and text_only.gpu_memory_utilization == default
    )


# ------------------------------------------------------------------------------ dtype and errors


def _engine(ckpt, **kw) -> SpeechEngine:
    """A SpeechEngine whose loading is under test (loading does not touch the AsyncLLM)."""
    return SpeechEngine(
        None, ckpt, device="cpu", max_speaking=2, max_codes=32, talker_max_len=64, **kw
    )


def _close(speech: SpeechEngine) -> None:
    asyncio.run(speech.shutdown())


@pytest.mark.parametrize("speech_dtype", ["bfloat16", "float32", "auto"])
def test_speech_dtype_bf16_reaches_the_modules(tiny_checkpoint_dir, speech_dtype):
    speech = _engine(tiny_checkpoint_dir, speech_dtype=speech_dtype)
    try:
        bf16 = speech_dtype == "bfloat16"
        talker_dtype = (
            torch.bfloat16 if bf16 else torch.float32
        )  # auto: the thinker's (none here: fp32)
        assert speech.talker.dtype == talker_dtype
        assert {p.dtype for p in speech.talker.model.parameters()} == {talker_dtype}
        dit_dtype = torch.bfloat16 if bf16 else torch.float32
        assert {p.dtype for p in speech.token2wav.dit.parameters()} == {dit_dtype}
    finally:
        _close(speech)
    assert M.speech_dtypes("auto", torch.bfloat16) == dict(
        talker=torch.bfloat16, token2wav=torch.float32, vocoder=torch.float32
    )
    with pytest.raises(ValueError, match="--speech-dtype"):
        _engine(tiny_checkpoint_dir, speech_dtype="float64")


def test_memory_budget_out_of_memory_at_load(tiny_checkpoint_dir):
    """An allocation past the (simulated) device's capacity while loading: a start-up error naming
    the flags, or with allow_text_only a text-only engine."""
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint_dir / "model.safetensors"), "pt") as f:
        state = sum(
            torch.Size(f.get_slice(n).get_shape()).numel()
            for n in f.keys()  # noqa: SIM118 (safe_open has no `in`)
            if n.startswith("talker.")
        )
    # Room for the talker's tensors read from the file (host memory on a GPU machine), not for the
    # talker built from them: the allocation that crosses it is in the talker's construction.
    capacity = int(1.5 * 4 * state)
    with (
        SimulatedDeviceMemory(capacity=capacity) as mem,
        pytest.raises(SpeechLoadError, match="out of memory") as e,
    ):
        _engine(tiny_checkpoint_dir)
    assert mem.peak <= capacity and isinstance(
        e.value.__cause__, torch.OutOfMemoryError
    )
    assert "--speech-gpu-memory-gb" in str(e.value) and "--allow-text-only" in str(
        e.value
    )
    with SimulatedDeviceMemory(capacity=capacity):
        speech = _engine(tiny_checkpoint_dir, allow_text_only=True)
    assert not speech.has_speech and "out of memory" in speech.unavailable_reason
    _close(speech)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_memory_budget_bad_tensors_at_load(tiny_checkpoint_dir, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint_dir, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    name = next(
        n for n in tensors if n.startswith("token2wav.") and n.endswith(".weight")
    )
    if damage == "missing":
        del tensors[name]
    elif damage == "unexpected":
        tensors["talker.model.extra.weight"] = torch.zeros(2)
    else:
        tensors[name] = torch.zeros(3, 3)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpeechLoadError, match="do not match its config") as e:
        _engine(ckpt)
    assert "--allow-text-only" in str(e.value)
    speech = _engine(ckpt, allow_text_only=True)
    assert not speech.has_speech and "do not match" in speech.unavailable_reason
    _close(speech)


# --------------------------------------------------------------- the talker's length, on a server


@pytest.mark.slow
def test_memory_budget_long_prompt_refused_before_the_thinker(
    tiny_checkpoint_dir, tmp_path
):
    """--talker-max-len 24: a prompt of more than 22 tokens asking for audio is a 400 and never
    reaches the thinker; the same prompt for text only is served; the plan is printed."""
    import openai
    from api_server import metric, running_server, tail
    from openai import OpenAI

    long = [
        {
            "role": "user",
            "content": "Please tell me a long story about the quick brown fox. " * 3,
        }
    ]
    with running_server(
        tiny_checkpoint_dir, tmp_path / "server.log", "--talker-max-len", "24"
    ) as s:
        log = s["log"].read_text(errors="replace")
        assert "max_speaking=32, talker_max_len=24" in log, tail(s["log"])
        assert "speech path memory on cpu" in log
        client = OpenAI(
            base_url=s["base_url"], api_key="unused", timeout=120, max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(
                model=s["model"],
                messages=long,
                modalities=["text", "audio"],
                audio={"voice": "Chelsie", "format": "wav"},
                max_tokens=2,
            )
        body = ei.value.response.json()["error"]
        assert (
            body["param"] == "messages" and "--talker-max-len 24" in body["message"]
        ), body
        with pytest.raises(openai.BadRequestError):
            client.audio.speech.create(
                model=s["model"], input="the quick brown fox " * 10, voice="Ethan"
            )
        assert not metric(
            s["root"], "vllm:prompt_tokens_total"
        )  # the thinker never ran
        resp = client.chat.completions.create(
            model=s["model"], messages=long, max_tokens=2
        )
        assert resp.choices[0].message.content is not None
        assert metric(s["root"], "vllm:prompt_tokens_total") == resp.usage.prompt_tokens
        with urllib.request.urlopen(f"{s['root']}/health", timeout=10) as r:
            assert r.status == 200


def test_offline_speech_dtype_bf16_follows_the_thinker(tiny_checkpoint_dir):
    """OmniLLM(speech_dtype="auto") with a bf16 thinker: the talker in bf16, Token2Wav in fp32; the
    batch still speaks."""
    from vllm import SamplingParams

    from omni_vllm.offline import OmniLLM

    omni = OmniLLM(
        str(tiny_checkpoint_dir),
        max_model_len=1024,
        kv_cache_memory_bytes=2**26,
        dtype="bfloat16",
        enforce_eager=True,
        distributed_executor_backend="uni",
        speech_dtype="auto",
    )
    talker, t2w = omni._speech_modules()
    assert talker.dtype == torch.bfloat16 and {
        p.dtype for p in talker.model.parameters()
    } == {torch.bfloat16}
    assert {p.dtype for p in t2w.dit.parameters()} == {torch.float32}
    (out,) = omni.generate(
        ["Hello"],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        max_codes=24,
    )
    assert (
        len(out.codes) == 24
        and out.audio is not None
        and len(out.audio) > 0
        and np.isfinite(out.audio).all()
    )


@pytest.mark.slow
def test_memory_budget_server_load_error_is_a_start_up_error(
    tiny_checkpoint_dir, tmp_path
):
    """A checkpoint whose talker tensors do not match its config: the server stops at start-up with
    the message (after the thinker loaded, without a traceback of ours); with --allow-text-only it
    serves text and refuses audio with a 400 that says why."""
    import openai
    from api_server import running_server, tail
    from openai import OpenAI
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint_dir, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors[next(n for n in tensors if n.startswith("talker.model.layers.0."))]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})

    with (
        pytest.raises(RuntimeError, match="server exited") as e,
        running_server(ckpt, tmp_path / "fails.log"),
    ):
        pass
    log = (tmp_path / "fails.log").read_text(errors="replace")
    assert "the speech path did not load" in log and "--allow-text-only" in log, str(
        e.value
    )[-3000:]
    assert "Traceback" not in log.split("the speech path did not load")[-1], tail(
        tmp_path / "fails.log"
    )

    with running_server(ckpt, tmp_path / "text.log", "--allow-text-only") as s:
        client = OpenAI(
            base_url=s["base_url"], api_key="unused", timeout=120, max_retries=0
        )
        assert (
            client.chat.completions.create(
                model=s["model"],
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=2,
            )
            .choices[0]
            .message.content
            is not None
        )
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(
                model=s["model"],
                messages=[{"role": "user", "content": "Hi"}],
                modalities=["text", "audio"],
                audio={"voice": "Chelsie", "format": "wav"},
                max_tokens=2,
            )
        assert "do not match" in ei.value.response.json()["error"]["message"]


def test_memory_budget_readme_tables_are_the_code_s(capsys):
    """README.md and api/README.md show what `python -m omni_vllm.memory 7B 3B --gpu-gb 80` prints."""
    from pathlib import Path

    M.main(["7B", "3B", "--gpu-gb", "80"])
    table = "\n".join(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("|")
    )
    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "api/README.md"):
        assert table in (root / doc).read_text(), (
            f"{doc}: regenerate the table with python -m omni_vllm.memory"
        )


@pytest.fixture
def fresh_plan(monkeypatch):
    """No plan made in this process yet (each start-up makes one)."""
    monkeypatch.setattr(M, "_current_plan", None)
    monkeypatch.setattr(M, "_planned", False)
    monkeypatch.setattr(M, "_disabled", None)


def test_memory_budget_plan_under_vllm_serve_endpoint_plugin(
    tiny_checkpoint_dir, monkeypatch, fresh_plan
):
    """Stock `vllm serve` with our endpoint plugin (VLLM_PLUGINS=omni_vllm): the plan runs in
    EngineArgs.create_engine_config, before vLLM claims its share (a simulated 8 GiB GPU), lowers
    that share, and the talker's pool allocates exactly the bytes the plan printed."""
    from vllm.engine.arg_utils import EngineArgs

    from omni_vllm.patches import speech_memory_plan
    from omni_vllm.plugin import register
    from omni_vllm.talker import Talker

    register()
    assert getattr(EngineArgs.create_engine_config, speech_memory_plan._APPLIED)
    monkeypatch.setenv("VLLM_PLUGINS", "omni_vllm")
    monkeypatch.setenv("OMNI_VLLM_SPEECH_DEVICE", "cuda:0")
    monkeypatch.setenv("OMNI_VLLM_MAX_AUDIO_TOKENS", "512")
    monkeypatch.setenv("OMNI_VLLM_SIMULATE_GPU_GB", "8")
    engine_args = EngineArgs(
        model=str(tiny_checkpoint_dir), max_model_len=2048, enforce_eager=True
    )
    # what create_engine_config does first: the plan (vLLM's config itself is not built here:
    # a CPU machine has no CUDA device to build it for)
    plan = speech_memory_plan.plan_for_engine_args(engine_args, 8 * GiB)
    assert M.current_plan() is plan and M.planned()
    assert plan.device == "cuda:0" and plan.shared and plan.budget == 2 * GiB
    assert engine_args.gpu_memory_utilization == plan.gpu_memory_utilization
    assert plan.gpu_memory_utilization == pytest.approx(
        M._vllm_default_utilization() - 0.25, abs=1e-3
    )
    assert plan.talker_max_len == 2048 + 512
    talker = Talker.from_pretrained(
        tiny_checkpoint_dir,
        max_slots=plan.max_speaking,
        max_len=plan.talker_max_len,
        kv_cache_tokens=plan.kv_cache_tokens,
        dtype=torch.float32,
    )
    assert talker.kv_pool_bytes() == plan.memory.talker_kv
    assert f"{plan.kv_cache_tokens} positions" in plan.report()


def test_memory_budget_under_vllm_serve_refusal_names_the_variables(
    tiny_checkpoint_dir, monkeypatch, fresh_plan
):
    from vllm.engine.arg_utils import EngineArgs

    from omni_vllm.patches import speech_memory_plan

    monkeypatch.setenv("OMNI_VLLM_SPEECH_DEVICE", "cuda:0")
    monkeypatch.setenv("OMNI_VLLM_SPEECH_GPU_MEMORY_GB", "0.001")
    engine_args = EngineArgs(model=str(tiny_checkpoint_dir), max_model_len=2048)
    with pytest.raises(SystemExit) as e:
        speech_memory_plan.plan_for_engine_args(engine_args, 8 * GiB)
    message = str(e.value)
    assert "OMNI_VLLM_SPEECH_GPU_MEMORY_GB" in message
    assert "OMNI_VLLM_ALLOW_TEXT_ONLY" in message and "--speech-gpu" not in message
    assert "--max-model-len" in message  # vLLM's own flag keeps its name


@pytest.mark.parametrize("size", ["7B", "3B"])
def test_memory_budget_kv_pool_allocates_what_the_plan_prints(size):
    """The released checkpoints (meta device, nothing allocated): the pool the plan sizes takes
    exactly the plan's talker KV bytes."""
    from omni_vllm.talker_kv_cache import TalkerKVPool

    config = released_config(size)
    t = config.talker_config
    for shared in (True, False):
        plan = _plan(config, device="cuda:0" if shared else "cuda:1", shared=shared)
        pool = TalkerKVPool(
            num_layers=t.num_hidden_layers,
            num_kv_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            device=torch.device("meta"),
            dtype=torch.bfloat16,
            max_tokens=plan.kv_cache_tokens,
            block_size=M.KV_BLOCK,
        )
        assert pool.pool_bytes() == plan.memory.talker_kv
        assert pool.num_blocks * M.KV_BLOCK == plan.kv_cache_tokens
