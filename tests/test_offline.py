"""`OmniLLM` end to end: prompt -> text + speech, against transformers' `generate`.

The thinker runs in the real vLLM CPU engine through our plugin, its hidden states come out of
the engine, our batched Talker and Token2Wav make the speech. The reference is transformers'
`Qwen2_5OmniForConditionalGeneration.generate` (two 5.19 bugs corrected, see
omni_vllm.testing.reference), greedy thinker and talker, with the same Token2Wav noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_vllm.talker import TalkerSampling
from omni_vllm.testing.cases import cases, hf_inputs, vllm_prompt
from omni_vllm.testing.reference import corrected_reference

THINKER_TOKENS = 8
TALKER_CODES = 24
WAVE_ATOL = 1e-4
CASES = cases()
VOICES = {name: ("Chelsie", "Ethan")[i % 2] for i, name in enumerate(CASES)}
GREEDY = TalkerSampling(do_sample=False)
# A small fp32 in-process engine: the settings every OmniLLM of this file uses.
ENGINE = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def omni(tiny_checkpoint_dir):
    from omni_vllm.offline import OmniLLM

    return OmniLLM(
        str(tiny_checkpoint_dir),
        max_model_len=4096,
        kv_cache_memory_bytes=2**28,
        seed=0,
        **ENGINE,
    )


def _greedy(n=THINKER_TOKENS, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_dir, processor):
    """transformers' text ids, codes and waveform per case (noise seed = case index)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        tiny_checkpoint_dir, dtype=torch.float32
    )
    model.eval()
    results = {}
    for seed, (name, case) in enumerate(CASES.items()):
        inputs = hf_inputs(processor, case)
        seen = {}
        token2wav_forward = model.token2wav.forward

        def token2wav(
            code, *args, _seed=seed, _forward=token2wav_forward, _seen=seen, **kwargs
        ):
            _seen["codes"] = code[0].tolist()
            torch.manual_seed(_seed)  # Token2Wav's first draw is its initial noise
            return _forward(code, *args, **kwargs)

        model.token2wav.forward = token2wav
        try:
            with corrected_reference(model), torch.no_grad():
                sequences, wave = model.generate(
                    **inputs,
                    speaker=VOICES[name],
                    use_audio_in_video=case.use_audio_in_video,
                    thinker_max_new_tokens=THINKER_TOKENS,
                    thinker_do_sample=False,
                    talker_max_new_tokens=TALKER_CODES,
                    talker_do_sample=False,
                )
        finally:
            del model.token2wav.forward
        n_prompt = inputs["input_ids"].shape[1]
        results[name] = dict(
            token_ids=sequences[0, n_prompt:].tolist(),
            codes=seen["codes"],
            wave=wave.numpy(),
            seed=seed,
        )
    return results


def _generate(omni, processor, names):
    return omni.generate(
        [vllm_prompt(processor, CASES[n]) for n in names],
        _greedy(),
        voice=[VOICES[n] for n in names],
        talker_sampling=GREEDY,
        max_codes=TALKER_CODES,
        noise=[list(CASES).index(n) for n in names],
    )


@pytest.mark.parametrize("name", list(CASES))
def test_speech_matches_transformers(name, omni, processor, reference):
    (out,) = _generate(omni, processor, [name])
    ref = reference[name]
    assert out.token_ids == ref["token_ids"], "thinker text ids"
    assert out.codes == ref["codes"], "talker codes"
    assert out.audio.dtype == np.float32 and out.sample_rate == 24000
    assert out.audio.shape == ref["wave"].shape
    diff = float(np.abs(out.audio - ref["wave"]).max())
    print(
        f"{name}: {len(out.codes)} codes, {out.audio.size} samples, waveform max abs diff {diff:.2e}"
    )
    assert diff <= WAVE_ATOL, f"waveform differs by {diff:.2e}"


def test_batch_of_mixed_requests_equals_one_at_a_time(omni, processor):
    names = [list(CASES)[i % len(CASES)] for i in range(8)]
    batch = _generate(omni, processor, names)
    for name, got in zip(names, batch, strict=True):
        (alone,) = _generate(omni, processor, [name])
        assert got.token_ids == alone.token_ids and got.codes == alone.codes, name
        np.testing.assert_allclose(
            got.audio, alone.audio, rtol=0, atol=1e-5, err_msg=name
        )


def test_text_only_request_has_no_audio(omni, processor):
    (out,) = omni.generate(
        [vllm_prompt(processor, CASES["text"])], _greedy(), audio=False
    )
    assert out.audio is None and len(out.token_ids) == THINKER_TOKENS


def test_unknown_voice_is_a_clear_error(omni, processor):
    with pytest.raises(ValueError, match="Chelsie"):
        omni.generate(
            [vllm_prompt(processor, CASES["text"])], _greedy(), voice="Nobody"
        )


def test_checkpoint_without_speech_weights_refuses_audio(tmp_path):
    from omni_vllm.offline import OmniLLM, SpeechUnavailable
    from omni_vllm.testing.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "thinker-only", speech=False)
    omni = OmniLLM(str(path), max_model_len=1024, kv_cache_memory_bytes=2**26, **ENGINE)
    (out,) = omni.generate(["Hello"], _greedy(4, ignore_eos=True), audio=False)
    assert len(out.token_ids) == 4  # text still works
    with pytest.raises(SpeechUnavailable, match="talker"):
        omni.generate(["Hello"], _greedy(4))
