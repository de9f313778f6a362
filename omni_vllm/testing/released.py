"""The configs of the released checkpoints (Qwen/Qwen2.5-Omni-7B and -3B), sizes only, built
without downloading anything: for memory tables and real-size tests.

transformers' `Qwen2_5OmniConfig` defaults are the 7B's thinker and Token2Wav, but not its talker
(the defaults describe a 28-layer, 3584-wide talker; the released one is 24 x 896 with a 18944-wide
MLP, 1.35 B parameters). The talker numbers below are those of the released config.json files; the
3B's thinker is Qwen2.5-3B-shaped (36 x 2048, 2 KV heads) and its talker Qwen2.5-0.5B-shaped.
"""

from __future__ import annotations

_TALKER_7B = dict(
    embedding_size=3584,
    hidden_size=896,
    intermediate_size=18944,
    num_hidden_layers=24,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=32768,
)
_TALKER_3B = dict(
    embedding_size=2048,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
)
_THINKER_3B = dict(
    text_config=dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    ),
    audio_config=dict(output_dim=2048),
    vision_config=dict(out_hidden_size=2048),
)
SIZES = ("7B", "3B")
TALKER_SIZES = {
    "7B": _TALKER_7B,
    "3B": _TALKER_3B,
}  # the talker_config fields that differ


def released_config(size: str = "7B"):
    """`Qwen2_5OmniConfig` with the sizes of Qwen/Qwen2.5-Omni-{size} (bfloat16, as released)."""
    import logging

    from transformers import Qwen2_5OmniConfig

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    quiet = logging.getLogger("transformers.configuration_utils")
    level = quiet.level
    quiet.setLevel(
        logging.ERROR
    )  # the defaults' special ids are the thinker's, outside the codec vocabulary
    try:
        config = Qwen2_5OmniConfig(
            thinker_config=_THINKER_3B if size == "3B" else None,
            talker_config=_TALKER_3B if size == "3B" else _TALKER_7B,
        )
    finally:
        quiet.setLevel(level)
    config.dtype = "bfloat16"
    return config
