"""Prompt cases shared by the parity tests: one per input kind, as vLLM and transformers take them.

Each case is a user turn (content parts) plus its media, made in code (omni_vllm.testing.media).
`vllm_prompt` gives what `LLM.generate` / `AsyncLLM.generate` take; `hf_inputs` gives what
transformers' model takes, from the checkpoint's own processor and chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omni_vllm.testing import media


@dataclass
class Case:
    name: str
    content: list[dict]
    audio: list[np.ndarray] = field(
        default_factory=list
    )  # (samples,) or (channels, samples)
    audio_sr: int = media.AUDIO_SR
    images: list = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    use_audio_in_video: bool = False


def cases() -> dict[str, Case]:
    """text, audio (a tone; a spoken phrase where espeak-ng is installed), image, video, video
    with its audio track."""
    q = {"type": "text", "text": "What is this?"}
    found = [
        Case("text", [{"type": "text", "text": "Hello, how are you today?"}]),
        Case("audio_tone", [{"type": "audio"}, q], audio=[media.tone(2.0)]),
        Case("image", [{"type": "image"}, q], images=[media.image()]),
        Case("video", [{"type": "video"}, q], videos=[media.video()]),
        Case(
            "video_with_audio",
            [{"type": "video"}, q],
            videos=[media.video(seed=1)],
            audio=[media.tone(3.0, freq=330.0)],
            use_audio_in_video=True,
        ),
    ]
    speech = media.spoken_phrase()
    if speech is not None:
        found.insert(2, Case("audio_speech", [{"type": "audio"}, q], audio=[speech]))
    return {c.name: c for c in found}


def resampled_audio_cases() -> dict[str, Case]:
    """Audio that vLLM resamples to the model's 16 kHz: a tone at 48 kHz, a stereo one at 44.1 kHz
    (channels first, as vLLM's resamplers take a 2-D array)."""
    q = {"type": "text", "text": "What is this?"}
    found = [
        Case(
            "audio_tone_48k",
            [{"type": "audio"}, q],
            audio=[media.tone(2.0, sr=48000)],
            audio_sr=48000,
        ),
        Case(
            "audio_stereo_44k",
            [{"type": "audio"}, q],
            audio_sr=44100,
            audio=[
                np.stack(
                    [media.tone(2.0, 440.0, sr=44100), media.tone(2.0, 660.0, sr=44100)]
                )
            ],
        ),
    ]
    return {c.name: c for c in found}


def prompt_text(processor, case: Case) -> str:
    messages = [{"role": "user", "content": case.content}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def vllm_prompt(processor, case: Case) -> dict:
    mm: dict[str, list] = {}
    if case.audio:
        mm["audio"] = [(a, case.audio_sr) for a in case.audio]
    if case.images:
        mm["image"] = case.images
    if case.videos:
        mm["video"] = case.videos
    prompt = {"prompt": prompt_text(processor, case), "multi_modal_data": mm}
    if case.use_audio_in_video:
        prompt["mm_processor_kwargs"] = {"use_audio_in_video": True}
    return prompt


def hf_audio(case: Case) -> list[np.ndarray]:
    """The case's audio as transformers' processor takes it: mono at its 16 kHz, resampled by the
    method our vLLM processor uses (omni_vllm.processing), then mixed down as vLLM does."""
    from vllm.multimodal.audio import AudioResampler

    from omni_vllm.processing import AUDIO_RESAMPLE_METHOD

    resampler = AudioResampler(target_sr=media.AUDIO_SR, method=AUDIO_RESAMPLE_METHOD)
    out = [resampler.resample(a, orig_sr=case.audio_sr) for a in case.audio]
    return [a.mean(axis=0) if a.ndim == 2 else a for a in out]


def hf_inputs(processor, case: Case):
    return processor(
        text=prompt_text(processor, case),
        audio=hf_audio(case) or None,
        images=case.images or None,
        videos=case.videos or None,
        use_audio_in_video=case.use_audio_in_video,
        return_tensors="pt",
    )
