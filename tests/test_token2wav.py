"""Batched Token2Wav against transformers' Qwen2_5OmniToken2WavModel on the tiny checkpoint.

Same initial noise on both sides: the reference draws `torch.randn([1, 2 * num_codes, 80])` as
the first random call of `Qwen2_5OmniToken2WavModel.forward`, so `torch.manual_seed(seed)` right
before it draws what our `noise=seed` (a fresh `torch.Generator` seeded alike) draws.
"""

import pytest
import torch

from omni_vllm.token2wav import Token2Wav

torch.set_num_threads(1)

ATOL = 1e-4  # against transformers (measured about 1e-6 on mel, 1e-7 on waveform)
BATCH_ATOL = 1e-5  # batch against one at a time
# (number of codes, voice, seed): mel lengths 10, 26, 52, 74 straddle the 24-frame attention
# blocks and none is a multiple of a block, so padding lands inside real rows' windows.
REQUESTS = [
    (5, "Chelsie", 11),
    (13, "Ethan", 12),
    (26, "Ethan", 13),
    (37, "Chelsie", 14),
]


@pytest.fixture(scope="module")
def t2w(tiny_checkpoint_dir):
    return Token2Wav.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(
        tiny_checkpoint_dir
    ).eval()


@pytest.fixture(scope="module")
def codes():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 8448, (n,), generator=g) for n, _, _ in REQUESTS]


@torch.no_grad()
def reference_decode(model, codes, voice, seed):
    """transformers' full Token2Wav forward (defaults: 10 time points, guidance 0.5, sway -1),
    as `Qwen2_5OmniForConditionalGeneration.generate` calls it; the mel is captured on its way
    into BigVGAN."""
    spk = model.speaker_map[voice]
    captured = []
    hook = model.token2wav.code2wav_bigvgan_model.register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0].clone())
    )
    try:
        torch.manual_seed(seed)
        wav = model.token2wav(
            codes[None],
            conditioning=spk["cond"].float(),
            reference_mel=spk["ref_mel"].float(),
        )
    finally:
        hook.remove()
    return captured[0], wav.reshape(-1)


def max_diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("index", [1, 3], ids=["Ethan", "Chelsie"])
def test_matches_transformers(t2w, reference, codes, index):
    n, voice, seed = REQUESTS[index]
    ref_mel, ref_wav = reference_decode(reference, codes[index], voice, seed)
    mel = t2w.code2mel([codes[index]], [voice], [seed])[0]
    wav = t2w.mel2wav([mel])[0]
    assert (
        mel.shape == (80, 2 * n)
        and wav.shape == (2 * n * 240,)
        and wav.dtype == torch.float32
    )
    assert ref_wav.abs().max() > 1e-3  # a waveform, not silence
    assert max_diff(mel, ref_mel) < ATOL
    assert max_diff(wav, ref_wav) < ATOL


def test_batch_equals_one_at_a_time(t2w, codes):
    voices = [v for _, v, _ in REQUESTS]
    seeds = [s for _, _, s in REQUESTS]
    single_mel = [
        t2w.code2mel([c], [v], [s])[0] for c, v, s in zip(codes, voices, seeds)
    ]
    single_wav = [t2w.mel2wav([m])[0] for m in single_mel]

    # Any noise form works; explicit tensors here (what a streaming caller would keep).
    noise = [
        t2w.noise(len(c), torch.Generator().manual_seed(s))
        for c, s in zip(codes, seeds)
    ]
    mels = t2w.code2mel(codes, voices, noise)
    wavs = t2w.mel2wav(mels)  # one padded BigVGAN call (the boundary hooks)
    t2w.vocoder_batch = 3  # at most 3 per call: a padded call of 3, then one alone
    try:
        assert all(
            max_diff(a, b) < BATCH_ATOL
            for a, b in zip(t2w.mel2wav(mels), wavs, strict=True)
        )
    finally:
        t2w.vocoder_batch = None
    for i, (n, _, _) in enumerate(REQUESTS):
        assert wavs[i].shape == (2 * n * 240,)
        assert max_diff(mels[i], single_mel[i]) < BATCH_ATOL
        assert max_diff(wavs[i], single_wav[i]) < BATCH_ATOL


def test_unknown_voice(t2w, codes):
    with pytest.raises(ValueError, match=r"Unknown voice 'Nobody'.*Chelsie.*Ethan"):
        t2w.code2mel([codes[0]], ["Nobody"])


def snr_db(reference: torch.Tensor, x: torch.Tensor) -> float:
    return (
        10 * torch.log10(reference.pow(2).mean() / (reference - x).pow(2).mean()).item()
    )


def test_bf16_dit_and_vocoder_against_fp32(tiny_checkpoint_dir, t2w, codes):
    """bf16 DiT / bf16 BigVGAN (separate dtypes) against float32, batched with padding: outputs stay
    float32 and the error is bf16 rounding, not a bug (a dtype slip, a bf16 time step or RoPE
    frequency, drops the mel SNR to ~20 dB or below). Measured on the tiny checkpoint: mel 55 dB,
    waveform through a bf16 vocoder 38 dB; at the real size see benchmarks/real_size.py."""
    bf16 = Token2Wav.from_pretrained(
        tiny_checkpoint_dir, dtype=torch.bfloat16, vocoder_dtype=torch.bfloat16
    )
    assert (
        next(bf16.dit.parameters()).dtype
        == next(bf16.bigvgan.parameters()).dtype
        == torch.bfloat16
    )
    assert bf16.dit.rotary_embed.inv_freq.dtype == torch.float32
    voices = [v for _, v, _ in REQUESTS]
    seeds = [s for _, _, s in REQUESTS]
    mels32 = t2w.code2mel(codes, voices, seeds)
    mels16 = bf16.code2mel(codes, voices, seeds)
    wavs32, wavs16 = t2w.mel2wav(mels32), bf16.mel2wav(mels32)
    for m32, m16, w32, w16 in zip(mels32, mels16, wavs32, wavs16):
        assert (
            m16.dtype == w16.dtype == torch.float32
            and m16.shape == m32.shape
            and w16.shape == w32.shape
        )
        assert snr_db(m32, m16) > 45
        assert snr_db(w32, w16) > 30

    # Mixed: bf16 DiT, float32 vocoder (the CPU default) gives the float32 vocoder's waveform.
    mixed = Token2Wav.from_pretrained(tiny_checkpoint_dir, dtype=torch.bfloat16)
    assert next(mixed.bigvgan.parameters()).dtype == torch.float32
    assert max_diff(mixed.mel2wav(mels32[:1])[0], wavs32[0]) < BATCH_ATOL
