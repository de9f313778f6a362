"""transformers' Qwen2.5-Omni as the tests' reference, with two of its 5.19 bugs corrected.

1. `GenerationMixin.generate` drops an all-ones attention mask before calling the model, and the
   talker's forward keys its prefill on that mask: without it the codec pad/bos embeddings are
   never added to the last two prompt positions and the TMRoPE positions of media prompts become
   plain 0..n-1, so a single unpadded request runs a talker the model was not trained with.
   We hand the mask back to the talker, which restores the original code's behaviour.
2. `Qwen2_5OmniForConditionalGeneration.generate` forwards the thinker's `pixel_values` /
   `pixel_values_videos` to the talker's `generate`, which rejects them; the talker never reads
   them, so they are dropped.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch


@contextmanager
def corrected_reference(model):
    """Within the block, `model.generate` (a `Qwen2_5OmniForConditionalGeneration`) is correct."""
    talker = model.talker
    forward, generate = talker.forward, talker.generate

    @functools.wraps(forward)
    def forward_with_mask(*args, **kwargs):
        if kwargs.get("attention_mask") is None:
            x = (
                kwargs["inputs_embeds"]
                if kwargs.get("inputs_embeds") is not None
                else kwargs["input_ids"]
            )
            past = kwargs.get("past_key_values")
            n_past = past.get_seq_length() if past is not None else 0
            kwargs["attention_mask"] = torch.ones(
                x.shape[0], n_past + x.shape[1], dtype=torch.long, device=x.device
            )
        return forward(*args, **kwargs)

    @functools.wraps(generate)
    def generate_without_pixels(*args, **kwargs):
        kwargs.pop("pixel_values", None)
        kwargs.pop("pixel_values_videos", None)
        return generate(*args, **kwargs)

    talker.forward, talker.generate = forward_with_mask, generate_without_pixels
    try:
        yield model
    finally:
        del talker.forward, talker.generate  # back to the class's methods
