"""The thinker's multimodal processing: vLLM's Qwen2.5-Omni processor with two changes of ours.

- Audio at any sample rate is resampled to the audio encoder's 16 kHz with PyAV (FFmpeg's
  libswresample). vLLM's parser defaults to torchaudio, which vLLM's CPU wheel does not ship and
  which PyAV-only installs lack; PyAV is a dependency of ours on every platform, so every install
  resamples the same way (input_audio, audio_url, a video's own sound track; the text-only route
  and ours alike, since both run this processor).
- When the Hugging Face processor refuses an input (e.g. an image of 3000x1 pixels), the error
  names the input and the processor's reason, instead of vLLM's "Failed to apply ... on data={...}"
  with the repr of every array and image of the request.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers.feature_extraction_utils import BatchFeature
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerMultiModalDataParser,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)

# One of vLLM's resamplers (vllm.multimodal.audio.AudioResampler): PyAV is installed wherever we are.
AUDIO_RESAMPLE_METHOD = "pyav"
MAX_REASON_CHARS = 300  # of a processor's error message, in ours


class OmniThinkerProcessingInfo(Qwen2_5OmniThinkerProcessingInfo):
    def get_data_parser(self) -> Qwen2_5OmniThinkerMultiModalDataParser:
        feature_extractor = self.get_feature_extractor()
        return Qwen2_5OmniThinkerMultiModalDataParser(
            spatial_merge_size=self.get_hf_config().vision_config.spatial_merge_size,
            target_sr=feature_extractor.sampling_rate,
            target_channels=self.get_target_channels(),
            audio_resample_method=AUDIO_RESAMPLE_METHOD,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


class OmniThinkerMultiModalProcessor(Qwen2_5OmniThinkerMultiModalProcessor):
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        try:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        except ValueError as e:
            cause = e.__cause__
            if cause is None:  # not vLLM's wrapper of a processor error
                raise
            what = describe_media(
                hf_data, self.info.get_feature_extractor().sampling_rate
            )
            reason = (
                str(cause)
                if len(str(cause)) <= MAX_REASON_CHARS
                else str(cause)[:MAX_REASON_CHARS] + "..."
            )
            raise ValueError(
                f"the model's processor cannot take {what or 'the input'}: {reason}"
            ) from cause


def describe_media(hf_data: Mapping[str, object], audio_sr: int) -> str:
    """A short account of the media of a processor call ("image 3000x1, audio of 2.00 s")."""
    parts = []
    for image in hf_data.get("images") or ():
        size = getattr(image, "size", None)  # PIL
        parts.append(f"image {size[0]}x{size[1]}" if size else "image")
    for video in hf_data.get("videos") or ():
        shape = getattr(video, "shape", None)  # (frames, height, width, channels)
        parts.append(
            f"video of {shape[0]} frames of {shape[2]}x{shape[1]}"
            if shape is not None and len(shape) == 4
            else "video"
        )
    for audio in hf_data.get("audio") or ():
        n = getattr(audio, "shape", (None,))[-1]
        parts.append(f"audio of {n / audio_sr:.2f} s" if n is not None else "audio")
    return ", ".join(parts)
