"""The thinker as a vLLM model: the in-tree Qwen2.5-Omni thinker, plus what the speech path needs.

vLLM already serves the thinker well (paged attention, TMRoPE with audio-in-video interleave, the
multimodal processors for text, image, audio and video); we subclass it rather than copy it, so the
multimodal processor registered on the parent class applies to ours unchanged.

What we add: the checkpoint's `talker.*` and `token2wav.*` tensors are not the thinker's to load
(the speech path loads them), but they are counted and logged here instead of vanishing silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerForConditionalGeneration,
)

logger = init_logger(__name__)

SPEECH_PREFIXES = ("talker", "token2wav")


class OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """Qwen2.5-Omni thinker served by vLLM, loading the full checkpoint's weight names."""

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
            ", ".join(f"{n} {p}.* tensors" for p, n in speech.items()) if any(speech.values())
            else "nothing (this checkpoint has no talker/token2wav weights)",
        )
        return loaded
