"""The thinker as a vLLM model: the in-tree Qwen2.5-Omni thinker, plus what the speech path needs.

vLLM already serves the thinker well (paged attention, TMRoPE with audio-in-video interleave, the
multimodal processors for text, image, audio and video); we subclass it rather than copy it, and
register the parent's multimodal processor on ours with the changes of `omni_vllm.processing`
(audio resampled with PyAV; processor errors that name the input).

What we add:
- TMRoPE positions for a video with its audio track (`use_audio_in_video`) as the model was
  trained (transformers' `get_rope_index`): vLLM 0.32's in-tree version lays the interleaved
  video/audio positions one token early (starting on `<|audio_bos|>`) and gives the paired
  bos/eos tokens consecutive positions, where the reference gives `<|vision_bos|><|audio_bos|>`
  one shared position and `<|audio_eos|><|vision_eos|>` another.
- The checkpoint's `talker.*` and `token2wav.*` tensors are not the thinker's to load
(the speech path loads them), but they are counted and logged here instead of vanishing silently.
- Per-request hidden states for the speech path: requests that opt in
  (`omni_vllm.hidden_states.request_hidden_states`) get the decoder's input embedding and final
  hidden state of every position they consume, sent out of the engine with their tokens. The
  model runner does the capture (patches/runner_hidden_states.py, applied when this model is
  built, i.e. only in processes that run it); `supports_omni_hidden_states` lets it in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from omni_vllm.processing import (
    OmniThinkerMultiModalProcessor,
    OmniThinkerProcessingInfo,
)

logger = init_logger(__name__)

SPEECH_PREFIXES = ("talker", "token2wav")


@MULTIMODAL_REGISTRY.register_processor(  # the parent's, resampling with PyAV (omni_vllm.processing)
    OmniThinkerMultiModalProcessor,
    info=OmniThinkerProcessingInfo,
    dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder,
)
class OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """Qwen2.5-Omni thinker served by vLLM, loading the full checkpoint's weight names."""

    # The runner patch captures (input embedding, last hidden state) rows only for models that
    # say so: forward() returns the post-norm last hidden state, and its `inputs_embeds` are the
    # merged multimodal embeddings the decoder consumes.
    supports_omni_hidden_states: ClassVar[bool] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        from omni_vllm.patches import runner_hidden_states

        runner_hidden_states.apply()
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _compute_interleaved_positions(
        self, start_idx: int, data: dict
    ) -> tuple[np.ndarray, int]:
        """Positions of `<|audio_bos|>`, the interleaved chunks, `<|audio_eos|><|vision_eos|>`.

        vLLM's caller places this block at the `<|audio_bos|>` token that follows
        `<|vision_bos|>`, with `start_idx` one past `<|vision_bos|>`'s position, and continues
        with the text after the block. As in the reference, both eos tokens take the position
        after the maximum of the last chunk laid out (audio, unless the video has more chunks).
        """
        chunks, n_chunk_tokens = super()._compute_interleaved_positions(start_idx, data)
        per_chunk = int(
            self.config.position_id_per_seconds * self.config.seconds_per_chunk
        )
        t_chunk = (np.arange(data["grid_t"]) * data["t_factor"]).astype(
            np.int64
        ) // per_chunk
        n_audio = self._compute_audio_token_count(data["audio_feature_length"])
        if -(-n_audio // per_chunk) >= len(np.unique(t_chunk)):
            last_chunk = chunks[:, -1:]
        else:
            n_last = (
                int((t_chunk == t_chunk.max()).sum()) * data["grid_h"] * data["grid_w"]
            )
            last_chunk = chunks[:, -n_last:]
        bos = np.full((3, 1), start_idx - 1)  # shared with <|vision_bos|>
        eos = np.full(
            (3, 2), int(last_chunk.max()) + 1
        )  # <|audio_eos|> and <|vision_eos|>
        return np.concatenate([bos, chunks, eos], axis=1), n_chunk_tokens + 3

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: Counter[str] = Counter()

        def tally(items: Iterable[tuple[str, torch.Tensor]]):
            for name, tensor in items:
                seen[name.split(".", 1)[0]] += 1
                yield name, tensor

        loaded = super().load_weights(tally(weights))
        speech = {p: seen[p] for p in SPEECH_PREFIXES}
        logger.info(
            "omni-vllm thinker: %d thinker.* tensors loaded into %d vLLM parameters; left to the "
            "speech path: %s",
            seen["thinker"],
            len(loaded),
            ", ".join(f"{n} {p}.* tensors" for p, n in speech.items())
            if any(speech.values())
            else "nothing (this checkpoint has no talker/token2wav weights)",
        )
        return loaded
