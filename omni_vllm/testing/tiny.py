"""Tiny random-weight Qwen2.5-Omni checkpoints with the real config schema.

No model weights can be downloaded where this project is tested, so the tests (and the demo
server) run on checkpoints built here: the full model (thinker with audio and vision encoders,
talker, token2wav), `spk_dict.pt`, a locally trained byte-level BPE tokenizer carrying every
special token, the feature extractor, image/video processors and the chat template. Everything is
seeded, so the same call writes the same files.

    python -m omni_vllm.testing.tiny OUT_DIR [--seed N] [--no-speech] [--bench]

`--bench` writes the benchmark checkpoint instead (`BENCH_SIZES`: Qwen2.5-Omni-7B's depths, its
widths / 8), whose cost split between thinker, talker and Token2Wav resembles the real model's.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# Special tokens come first in the vocabulary, in this order; the ids below follow from it.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|tts_text_pad|>",
    "<|tts_text_bos|>",
    "<|tts_text_eod|>",
    "<|spk_chelsie|>",
    "<|spk_ethan|>",
]
TOKEN_ID = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
VOICES = {"Chelsie": "<|spk_chelsie|>", "Ethan": "<|spk_ethan|>"}

# Qwen2.5-Omni's chat template (system prompt default, media placeholders per content part).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content"
    " or content['type'] == 'input_audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? "
    "Please describe this picture, this sound and this video. What is the weather like? "
    "I am a helpful assistant that can listen, look and talk. Numbers: 0 1 2 3 4 5 6 7 8 9. "
    "Qwen Omni thinks in text and speaks with a talker and a vocoder. "
)


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of a generated checkpoint.

    The defaults make a checkpoint of a few MB that runs in milliseconds. Head dims stay >= 32
    because vLLM's CPU attention backend supports no smaller ones. Fields left at None follow
    from the others (as the defaults always have), so the default checkpoint never changes.
    """

    vocab_train: int = 512
    vocab_size: int | None = (
        None  # the thinker's text vocabulary (None: the tokenizer's size)
    )
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    intermediate: int = 256
    audio_d_model: int = 64
    audio_heads: int = 2
    audio_layers: int = 2
    audio_ffn: int | None = None  # None: 2 * audio_d_model
    vision_hidden: int = 64
    vision_heads: int = 2
    vision_depth: int = 2
    vision_intermediate: int | None = None  # None: 2 * vision_hidden
    vision_fullatt_blocks: tuple[int, ...] | None = None  # None: the last block
    talker_hidden: int = 64
    talker_heads: int = 2
    talker_kv_heads: int = 1
    talker_head_dim: int | None = None  # None: talker_hidden // talker_heads
    talker_layers: int = 2
    talker_intermediate: int | None = None  # None: 2 * talker_hidden
    dit_hidden: int = 64
    dit_heads: int = 2
    dit_layers: int = 4
    dit_look_ahead_layers: tuple[int, ...] | None = None  # None: the middle layer
    dit_look_backward_layers: tuple[int, ...] | None = (
        None  # None: the first and the last layer
    )
    dit_emb_dim: int = 32
    dit_enc_emb_dim: int = 32  # speaker `cond` width
    dit_enc_dim: int = 32
    dit_enc_channels: tuple[int, ...] = (32, 32, 32, 32, 96)
    dit_enc_attention_channels: int = 16
    dit_enc_se_channels: int = 16
    bigvgan_channels: int = 128


# Qwen2.5-Omni-7B with every width divided by 8 and its real depths (thinker 28 layers, audio
# encoder 32, vision encoder 32 blocks, talker 24, DiT 22, BigVGAN's real 6 upsamples and 3
# resblock kernels), so that thinker, talker and Token2Wav cost roughly what they cost relative
# to each other in the real model: the benchmarks' checkpoint (`--bench`). Real values from
# transformers' Qwen2_5Omni*Config defaults (the 7B's) and the released config.json (talker).
# Where width / 8 would leave an attention head narrower than 32 (vLLM's CPU attention minimum),
# the head COUNT is divided instead and the head dim kept as close to the real one as the width
# allows; the query and KV widths still shrink by 8:
#   thinker  28 x 128 -> 7 x 64, KV 4 x 128 -> 1 x 64 (queries per KV head stay 7)
#   talker   12 x 128 -> 3 x 64, KV 4 x 128 -> 1 x 64 (its head_dim is set, not hidden / heads)
#   audio    20 x 64  -> 5 x 32;  vision 16 x 80 -> 2 x 80;  DiT 16 x 64 -> 2 x 64
# The talker's codec vocabulary (8448) and the mel / codec rates are not widths and stay.
BENCH_SIZES = TinySizes(
    vocab_size=152064
    // 8,  # 19008; the tokenizer stays the small trained one (see build_config)
    hidden=3584 // 8,
    heads=7,
    kv_heads=1,
    layers=28,
    intermediate=18944 // 8,
    audio_d_model=1280 // 8,
    audio_heads=5,
    audio_layers=32,
    audio_ffn=5120 // 8,
    vision_hidden=1280 // 8,
    vision_heads=2,
    vision_depth=32,
    vision_intermediate=428,  # 3420 / 8 = 427.5
    vision_fullatt_blocks=(7, 15, 23, 31),
    talker_hidden=896 // 8,
    talker_heads=3,
    talker_kv_heads=1,
    talker_head_dim=64,
    talker_layers=24,
    talker_intermediate=18944 // 8,
    dit_hidden=1024 // 8,
    dit_heads=2,
    dit_layers=22,
    dit_look_ahead_layers=(10,),
    dit_look_backward_layers=(0, 20),
    dit_emb_dim=512 // 8,
    dit_enc_emb_dim=192 // 8,
    dit_enc_dim=128 // 8,
    dit_enc_channels=(256 // 8,) * 4 + (768 // 8,),
    dit_enc_attention_channels=64 // 8,
    dit_enc_se_channels=64 // 8,
    bigvgan_channels=1536 // 8,
)


def _mrope_section(head_dim: int) -> list[int]:
    # Real model: head_dim 128 -> [16, 24, 24]; keep the proportions, sum must be head_dim / 2.
    quarter = head_dim // 8
    return [
        quarter,
        (head_dim // 2 - quarter) // 2,
        head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2,
    ]


def train_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Train a byte-level BPE with the special tokens first; return the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 8, trainer=trainer)
    hf_tok = Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        extra_special_tokens={
            "image_token": "<|IMAGE|>",
            "audio_token": "<|AUDIO|>",
            "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>",
            "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
    )
    for t in SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(t) == TOKEN_ID[t], t
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return len(hf_tok)


def build_config(
    vocab_size: int, sizes: TinySizes = TinySizes(), enable_audio_output: bool = True
):
    """The full Qwen2.5-Omni config, with every special id taken from our tokenizer.

    `vocab_size` is the tokenizer's; `sizes.vocab_size` may make the model's text vocabulary
    larger, as the real checkpoint's is (152064 rows for 151665 tokens)."""
    from transformers import Qwen2_5OmniConfig

    s = sizes
    text_vocab = s.vocab_size or vocab_size
    if text_vocab < vocab_size:
        raise ValueError(
            f"text vocab {text_vocab} is smaller than the tokenizer's {vocab_size}"
        )
    head_dim = s.hidden // s.heads
    talker_head_dim = s.talker_head_dim or s.talker_hidden // s.talker_heads
    media_ids = dict(
        audio_token_index=TOKEN_ID["<|AUDIO|>"],
        image_token_index=TOKEN_ID["<|IMAGE|>"],
        video_token_index=TOKEN_ID["<|VIDEO|>"],
        audio_start_token_id=TOKEN_ID["<|audio_bos|>"],
        audio_end_token_id=TOKEN_ID["<|audio_eos|>"],
        position_id_per_seconds=25,
        seconds_per_chunk=2,
    )
    thinker = dict(
        **media_ids,
        user_token_id=TOKEN_ID["<|im_start|>"],
        vision_start_token_id=TOKEN_ID["<|vision_bos|>"],
        vision_end_token_id=TOKEN_ID["<|vision_eos|>"],
        bos_token_id=TOKEN_ID["<|endoftext|>"],
        eos_token_id=TOKEN_ID["<|im_end|>"],
        pad_token_id=TOKEN_ID["<|endoftext|>"],
        text_config=dict(
            vocab_size=text_vocab,
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads,
            max_position_embeddings=32768,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=1000000.0,
                mrope_section=_mrope_section(head_dim),
            ),
            max_window_layers=s.layers,
            tie_word_embeddings=False,
            bos_token_id=TOKEN_ID["<|endoftext|>"],
            eos_token_id=TOKEN_ID["<|im_end|>"],
            pad_token_id=TOKEN_ID["<|endoftext|>"],
        ),
        audio_config=dict(
            num_mel_bins=128,
            encoder_layers=s.audio_layers,
            encoder_attention_heads=s.audio_heads,
            encoder_ffn_dim=s.audio_ffn or 2 * s.audio_d_model,
            d_model=s.audio_d_model,
            max_source_positions=1500,
            n_window=100,
            output_dim=s.hidden,
        ),
        vision_config=dict(
            depth=s.vision_depth,
            hidden_size=s.vision_hidden,
            intermediate_size=s.vision_intermediate or 2 * s.vision_hidden,
            num_heads=s.vision_heads,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=s.hidden,
            fullatt_block_indexes=list(s.vision_fullatt_blocks or [s.vision_depth - 1]),
        ),
    )
    talker = dict(
        **media_ids,
        vocab_size=8448,
        tts_text_start_token_id=TOKEN_ID["<|tts_text_bos|>"],
        tts_text_end_token_id=TOKEN_ID["<|tts_text_eod|>"],
        tts_text_pad_token_id=TOKEN_ID["<|tts_text_pad|>"],
        tts_codec_start_token_id=8293,
        tts_codec_end_token_id=8294,
        tts_codec_pad_token_id=8292,
        tts_codec_mask_token_id=8296,
        vision_start_token_id=TOKEN_ID["<|vision_bos|>"],
        vision_end_token_id=TOKEN_ID["<|vision_eos|>"],
        embedding_size=s.hidden,
        hidden_size=s.talker_hidden,
        intermediate_size=s.talker_intermediate or 2 * s.talker_hidden,
        num_hidden_layers=s.talker_layers,
        num_attention_heads=s.talker_heads,
        num_key_value_heads=s.talker_kv_heads,
        head_dim=talker_head_dim,
        max_position_embeddings=32768,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=1000000.0,
            mrope_section=_mrope_section(talker_head_dim),
        ),
        max_window_layers=s.talker_layers,
        spatial_merge_size=2,
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=s.dit_hidden,
            num_hidden_layers=s.dit_layers,
            num_attention_heads=s.dit_heads,
            head_dim=s.dit_hidden // s.dit_heads,
            ff_mult=2,
            emb_dim=s.dit_emb_dim,
            block_size=24,
            look_ahead_layers=list(s.dit_look_ahead_layers or [s.dit_layers // 2]),
            look_backward_layers=list(
                s.dit_look_backward_layers or [0, s.dit_layers - 1]
            ),
            repeats=2,
            num_embeds=8448,  # must cover the talker's codec vocabulary
            mel_dim=80,
            dropout=0.0,
            enc_emb_dim=s.dit_enc_emb_dim,
            enc_dim=s.dit_enc_dim,
            enc_channels=list(s.dit_enc_channels),
            enc_kernel_sizes=[5, 3, 3, 3, 1],
            enc_dilations=[1, 2, 3, 4, 1],
            enc_attention_channels=s.dit_enc_attention_channels,
            enc_res2net_scale=2,
            enc_se_channels=s.dit_enc_se_channels,
        ),
        bigvgan_config=dict(
            mel_dim=80,
            upsample_initial_channel=s.bigvgan_channels,
            resblock_kernel_sizes=[3, 7, 11],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            upsample_rates=[5, 3, 2, 2, 2, 2],
            upsample_kernel_sizes=[11, 7, 4, 4, 4, 4],
        ),
    )
    config = Qwen2_5OmniConfig(
        thinker_config=thinker,
        talker_config=talker,
        token2wav_config=token2wav,
        enable_audio_output=enable_audio_output,
    )
    config.architectures = ["Qwen2_5OmniModel"]
    config.torch_dtype = torch.float32
    return config


def _reinit_pytorch_defaults(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every layer with PyTorch's own defaults.

    transformers' 0.02-std init gives a vocoder that outputs silence; default init gives a
    waveform with real amplitude, which the audio tests need.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()


def _write_processors(out_dir: Path) -> None:
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=16000,
            hop_length=160,
            chunk_length=300,
            n_fft=400,
        ),
        tokenizer=Qwen2TokenizerFast.from_pretrained(out_dir),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)


def _speakers(config, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    dit = config.token2wav_config.dit_config
    return {
        name: {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=g),
            "ref_mel": torch.randn(1, 120, dit.mel_dim, generator=g),
            "bos_token": TOKEN_ID[token],
        }
        for name, token in VOICES.items()
    }


def build_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    sizes: TinySizes = TinySizes(),
    speech: bool = True,
) -> Path:
    """Write a full tiny Qwen2.5-Omni checkpoint to `out_dir` and return its path.

    With `speech=False` the checkpoint has the thinker only (as a text-only export would), so the
    audio path must refuse politely.
    """
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = train_tokenizer(out, sizes.vocab_train)
    config = build_config(vocab, sizes, enable_audio_output=speech)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval().float()
    _reinit_pytorch_defaults(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=TOKEN_ID["<|endoftext|>"],
        eos_token_id=[TOKEN_ID["<|im_end|>"], TOKEN_ID["<|endoftext|>"]],
        pad_token_id=TOKEN_ID["<|endoftext|>"],
    ).save_pretrained(out)
    if speech:
        torch.save(_speakers(config, seed), out / "spk_dict.pt")
    _write_processors(out)
    (out / "README.md").write_text(
        "Tiny Qwen2.5-Omni checkpoint with RANDOM weights, built by omni_vllm.testing.tiny "
        f"(seed {seed}). Its text and speech are noise; it exists for tests and demos.\n"
    )
    return out


def cached_checkpoint(
    path: str | Path, sizes: TinySizes = TinySizes(), on_build=None
) -> Path:
    """The checkpoint of `sizes` at `path`, built there unless a complete one from this builder (this
    file's code, these sizes) is there already; `on_build(path)` is called before a build. The
    build goes to a temporary folder that replaces `path` at once, so a half-built checkpoint is
    never taken for a complete one."""
    import hashlib
    import os

    path = Path(path)
    stamp = hashlib.sha256(
        Path(__file__).read_bytes() + repr(sizes).encode()
    ).hexdigest()[:16]
    marker = path / ".omni-vllm-complete"
    if marker.exists() and marker.read_text() == stamp:
        return path
    if on_build is not None:
        on_build(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    build_tiny_checkpoint(tmp, sizes=sizes)
    (tmp / marker.name).write_text(stamp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-speech", action="store_true", help="thinker only, no talker/token2wav"
    )
    parser.add_argument(
        "--bench", action="store_true", help="the benchmark checkpoint (BENCH_SIZES)"
    )
    args = parser.parse_args(argv)
    sizes = BENCH_SIZES if args.bench else TinySizes()
    path = build_tiny_checkpoint(
        args.out_dir, seed=args.seed, sizes=sizes, speech=not args.no_speech
    )
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(json.dumps({"path": str(path), "size_mib": round(size, 2)}))


if __name__ == "__main__":
    main()
