"""The thinker served by vLLM (through our plugin) matches transformers' reference.

For text, audio (a tone and, where espeak-ng is installed, speech; a tone at 48 kHz and a stereo one
at 44.1 kHz, which vLLM resamples, and transformers is fed resampled by the same method), image,
video, video with its audio track, and a batch mixing all of them, on the real vLLM CPU engine in fp32:
- TMRoPE position ids of the prompt equal transformers' `get_rope_index`;
- prompt logits agree within 1e-4;
- greedy output token ids are identical.

Positions and last hidden states are read off the model's forward inside the engine; logits are
computed from them with the model's own `compute_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import system_tools
import torch

from omni_vllm.testing import media
from omni_vllm.testing.cases import cases, hf_inputs, resampled_audio_cases, vllm_prompt

MAX_NEW_TOKENS = 8
LOGITS_ATOL = 1e-4
CASES = {**cases(), **resampled_audio_cases()}


@dataclass
class Reference:
    input_ids: list[int]
    positions: torch.Tensor  # (3, L)
    logits: torch.Tensor  # (L, V)
    output_ids: list[int]


@pytest.fixture(scope="module")
def processor(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def hf_thinker(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        tiny_checkpoint_dir, dtype=torch.float32
    )
    return model.thinker.eval()


@pytest.fixture(scope="module")
def reference(processor, hf_thinker):
    """transformers' positions, logits and greedy ids, computed once per case."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name in cache:
            return cache[name]
        case = CASES[name]
        inputs = hf_inputs(processor, case)
        audio_lens = inputs["feature_attention_mask"].sum(-1) if case.audio else None
        second_per_grid = (
            torch.as_tensor(inputs["video_second_per_grid"]) if case.videos else None
        )
        positions, _ = hf_thinker.get_rope_index(
            inputs["input_ids"],
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            inputs["attention_mask"],
            case.use_audio_in_video,
            audio_lens,
            second_per_grid,
        )
        with torch.no_grad():
            logits = hf_thinker(
                **inputs, use_audio_in_video=case.use_audio_in_video
            ).logits
            generated = hf_thinker.generate(
                **inputs,
                use_audio_in_video=case.use_audio_in_video,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
            )
        n_prompt = inputs["input_ids"].shape[1]
        cache[name] = Reference(
            input_ids=inputs["input_ids"][0].tolist(),
            positions=positions[:, 0, :],
            logits=logits[0],
            output_ids=generated[0, n_prompt:].tolist(),
        )
        return cache[name]

    return get


def _record_forward(model) -> bool:
    """Wrap the model's forward so each call's positions and last hidden states are kept."""
    model._omni_test_calls = []
    inner = model.forward

    def forward(input_ids, positions, *args, **kwargs):
        hidden = inner(input_ids, positions, *args, **kwargs)
        model._omni_test_calls.append((positions.clone(), hidden.clone()))
        return hidden

    model.forward = forward
    return True


@pytest.fixture(scope="module")
def llm(tiny_checkpoint_dir):
    from vllm import LLM

    engine = LLM(
        str(tiny_checkpoint_dir),
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=8192,  # every prompt of the batch case prefills in one step
        kv_cache_memory_bytes=2**28,
        enforce_eager=True,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"audio": 2, "image": 1, "video": 1},
        seed=0,
    )
    assert all(engine.apply_model(_record_forward))
    return engine


def _run(llm, processor, names: list[str]):
    """Generate greedily for `names` in one batch; return outputs and the prefill records."""
    from vllm import SamplingParams

    llm.apply_model(lambda m: m._omni_test_calls.clear())
    outputs = llm.generate(
        [vllm_prompt(processor, CASES[n]) for n in names],
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS),
        use_tqdm=False,
    )
    (calls,) = llm.apply_model(lambda m: list(m._omni_test_calls))
    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    positions, hidden = calls[0]
    assert positions.shape[1] == sum(prompt_lens), (
        "the batch did not prefill in one step"
    )
    (logits,) = llm.apply_model(lambda m: m.compute_logits(hidden))
    bounds = np.cumsum([0, *prompt_lens])
    per_request = [
        (positions[:, a:b], logits[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return outputs, per_request


def _check(name, output, positions, logits, ref: Reference):
    assert output.prompt_token_ids == ref.input_ids, f"{name}: prompt token ids differ"
    torch.testing.assert_close(
        positions, ref.positions, rtol=0, atol=0, msg=f"{name}: positions"
    )
    diff = (logits - ref.logits).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{name}: prompt logits differ by {diff:.2e}"
    assert list(output.outputs[0].token_ids) == ref.output_ids, (
        f"{name}: greedy ids differ"
    )


@pytest.mark.parametrize("name", list(CASES))
def test_single_request_matches_transformers(name, llm, processor, reference):
    outputs, per_request = _run(llm, processor, [name])
    _check(name, outputs[0], *per_request[0], reference(name))


def test_mixed_batch_matches_transformers(llm, processor, reference):
    names = list(CASES)
    outputs, per_request = _run(llm, processor, names)
    for name, output, (positions, logits) in zip(
        names, outputs, per_request, strict=True
    ):
        _check(name, output, positions, logits, reference(name))


def test_speech_input_is_available_to_the_suite():
    """espeak-ng makes the spoken-phrase case possible (scripts/setup.sh installs it); without
    it the case is left out of CASES and this test skips, saying so."""
    system_tools.require("espeak-ng")
    assert media.spoken_phrase() is not None and "audio_speech" in CASES
