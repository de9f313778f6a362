"""Audio input as users send it, through one real server (`python -m omni_vllm.api.serve`, tiny checkpoint).

Every common sample rate, mono and stereo, on vLLM's text-only handler and on our speaking route;
the containers that browsers (WebM/Opus, Ogg/Opus) and phones (M4A/AAC) record, and MP3, at 44.1 and
48 kHz, as `input_audio` and as an `audio_url` data URL; the same rates through `audio_url` and a
video's own sound track (`use_audio_in_video`); input that cannot be decoded or processed is an
OpenAI-shaped 4xx that names the problem. One server start for all of it.

A clip of 1 s takes 25 audio tokens at any rate (one per 40 ms at the model's 16 kHz), so the prompt
length shows that the server decoded and resampled it whole.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from api_server import assert_no_traceback, mp4_data_url, png_data_url, running_server

from omni_vllm.testing import media

RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]
SECONDS = 1.0
AUDIO_TOKENS = 25  # 1 s at one token per 40 ms
MAX_AUDIO_S = 5
SERVER_ARGS = [
    "--max-audio-tokens",
    "48",
    "--max-media-mb",
    "2",
    "--max-audio-input-seconds",
    str(MAX_AUDIO_S),
    "--speech-stream-config",
    '{"first_chunk": 12, "chunk": 24, "left_context": 12, "look_ahead": 12, '
    '"num_steps": 4}',
    "--trust-request-mm-kwargs",
]
QUESTION = {"type": "text", "text": "What is this?"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("audio_input") / "server.log"
    with running_server(tiny_checkpoint_dir, log, *SERVER_ARGS) as s:
        yield s
        assert_no_traceback(log)


def clip(sr: int, channels: int = 1, seconds: float = SECONDS) -> np.ndarray:
    """A tone at `sr`, (samples,) or (samples, channels) with a different tone in each channel."""
    tones = [
        media.tone(seconds, freq=440.0 * (1 + c / 2), sr=sr) for c in range(channels)
    ]
    return tones[0] if channels == 1 else np.stack(tones, axis=1)


def input_audio(raw: bytes, fmt: str) -> dict:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt},
    }


def audio_url(raw: bytes, fmt: str) -> dict:
    mime = media.AUDIO_CONTAINERS[fmt][2]
    return {
        "type": "audio_url",
        "audio_url": {"url": f"data:{mime};base64," + base64.b64encode(raw).decode()},
    }


def chat(server, part: dict, speak: bool, **extra) -> httpx.Response:
    body = {
        "model": server["model"],
        "max_tokens": 1,
        "messages": [{"role": "user", "content": [part, QUESTION]}],
        **extra,
    }
    if speak:
        body.update(
            modalities=["text", "audio"],
            audio={"voice": "Ethan", "format": "wav"},
            max_audio_tokens=2,
        )
    return httpx.post(server["base_url"] + "/chat/completions", json=body, timeout=300)


def ok(resp: httpx.Response, speak: bool) -> dict:
    assert resp.status_code == 200, (resp.status_code, resp.text[:2000])
    body = resp.json()
    message = body["choices"][0]["message"]
    if speak:
        assert base64.b64decode(message["audio"]["data"])[:4] == b"RIFF"
    else:
        assert message.get("audio") is None and message["content"] is not None
    return body


def error(resp: httpx.Response, status: int, *words: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text[:2000])
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(
        body["error"]
    ), body
    message = body["error"]["message"]
    for w in words:
        assert w.lower() in message.lower(), message
    assert (
        "object at 0x" not in message and "array(" not in message and len(message) < 600
    ), message
    return message


@pytest.fixture(scope="module")
def reference_prompt_tokens(server):
    """Prompt tokens of 1 s of 16 kHz mono WAV, the model's own rate (nothing resampled)."""
    raw = media.encode_audio(clip(16000), 16000, "wav")
    return {
        speak: ok(chat(server, input_audio(raw, "wav"), speak), speak)["usage"][
            "prompt_tokens"
        ]
        for speak in (False, True)
    }


@pytest.mark.parametrize("speak", [False, True], ids=["text", "audio_out"])
@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
@pytest.mark.parametrize("sr", RATES)
def test_wav_at_any_rate(server, reference_prompt_tokens, sr, channels, speak):
    raw = media.encode_audio(clip(sr, channels), sr, "wav")
    body = ok(chat(server, input_audio(raw, "wav"), speak), speak)
    assert body["usage"]["prompt_tokens"] == reference_prompt_tokens[speak]
    if speak:
        assert body["usage"]["prompt_tokens_details"]["audio_tokens"] == AUDIO_TOKENS


@pytest.mark.parametrize("sr", [44100, 48000])
@pytest.mark.parametrize("fmt", ["webm", "m4a", "aac", "mp3", "ogg", "flac"])
@pytest.mark.parametrize("route", ["input_audio", "audio_url"])
def test_browser_and_phone_formats(server, reference_prompt_tokens, route, fmt, sr):
    """Compressed formats: decoders add priming and pad their last frame (AAC 1024 samples, MP3 a
    frame), which may add an audio token or two. `input_audio.format` is only a label: at 48 kHz it
    says "wav" whatever the bytes are (OpenAI's SDK types it "wav" | "mp3")."""
    raw = media.encode_audio(clip(sr, channels=2), sr, fmt)
    part = (
        input_audio(raw, fmt if sr == 44100 else "wav")
        if route == "input_audio"
        else audio_url(raw, fmt)
    )
    speak = (
        fmt in ("webm", "m4a") and sr == 48000
    )  # the speaking route too, for the new containers
    body = ok(chat(server, part, speak), speak)
    assert 0 <= body["usage"]["prompt_tokens"] - reference_prompt_tokens[speak] <= 2, (
        body["usage"]
    )


def test_formats_keep_the_length_limit(server):
    for fmt in (
        "webm",
        "m4a",
        "aac",
    ):  # WebM: no duration in the header; ADTS: estimated from the bit rate
        raw = media.encode_audio(clip(48000, seconds=MAX_AUDIO_S + 1.0), 48000, fmt)
        for part in (input_audio(raw, fmt), audio_url(raw, fmt)):
            error(chat(server, part, False), 413, "limit is 5 s")


@pytest.mark.parametrize("sr", RATES)
def test_audio_url_at_any_rate(server, reference_prompt_tokens, sr):
    raw = media.encode_audio(clip(sr), sr, "wav")
    body = ok(chat(server, audio_url(raw, "wav"), False), False)
    assert body["usage"]["prompt_tokens"] == reference_prompt_tokens[False]


@pytest.mark.parametrize("sr", RATES)
def test_video_sound_track_at_any_rate(server, sr):
    """A video's own AAC track at `sr` (`use_audio_in_video`): 2 s of sound, 50 audio tokens, plus the
    AAC encoder's priming and last-frame padding (up to 2048 samples), whatever the rate."""
    url = mp4_data_url(
        media.video(frames=4), fps=2, audio=media.tone(2.0, sr=sr), sr=sr
    )
    part = {"type": "video_url", "video_url": {"url": url}}
    speak = sr in (8000, 48000)
    body = ok(
        chat(server, part, speak, mm_processor_kwargs={"use_audio_in_video": True}),
        speak,
    )
    if speak:
        padding = int(np.ceil(2048 / sr * AUDIO_TOKENS))
        assert (
            50 <= body["usage"]["prompt_tokens_details"]["audio_tokens"] <= 50 + padding
        ), body["usage"]


@pytest.mark.parametrize("speak", [False, True], ids=["text", "audio_out"])
def test_undecodable_input_is_a_4xx_that_names_it(server, speak):
    garbage = b"not audio at all" * 64
    for part in (input_audio(garbage, "wav"), audio_url(garbage, "webm")):
        error(chat(server, part, speak), 422, "could not be decoded", "webm")
    truncated = media.encode_audio(clip(48000), 48000, "m4a")[:200]
    error(
        chat(server, input_audio(truncated, "m4a"), speak), 422, "could not be decoded"
    )
    image_only = base64.b64decode(png_data_url(media.image()).split(",", 1)[1])
    error(chat(server, input_audio(image_only, "wav"), speak), 422, "no audio stream")
    # use_audio_in_video with a video that has no sound track
    silent = {
        "type": "video_url",
        "video_url": {"url": mp4_data_url(media.video(frames=4), fps=2)},
    }
    error(
        chat(server, silent, speak, mm_processor_kwargs={"use_audio_in_video": True}),
        400,
        "audio",
    )
    # an image the model's processor refuses: its reason and the image's size, not an object's repr
    thin = {
        "type": "image_url",
        "image_url": {"url": png_data_url(media.image(width=3000, height=1))},
    }
    error(chat(server, thin, speak), 400, "image 3000x1", "aspect ratio")


def test_resampled_tone_keeps_frequency_and_level():
    """The resampler the server uses (vLLM's PyAV one, omni_vllm.processing): a 1 kHz tone at each rate
    comes out at 16 kHz with its frequency and level, and content above 8 kHz is filtered out, not
    folded back (the figures are in api/README.md)."""
    from vllm.multimodal.audio import AudioResampler

    from omni_vllm.processing import AUDIO_RESAMPLE_METHOD

    resampler = AudioResampler(target_sr=16000, method=AUDIO_RESAMPLE_METHOD)
    for sr in RATES:
        t = np.arange(2 * sr) / sr
        x = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
        y = resampler.resample(x, orig_sr=sr)
        assert abs(len(y) - 32000) <= 1, (sr, len(y))
        peak, level = tone_peak(y, 16000), rms(y[1600:-1600])
        assert (
            abs(peak - 1000.0) <= 0.5
            and abs(20 * np.log10(level / (0.5 / np.sqrt(2)))) < 0.1
        ), (sr, peak, level)
        if (
            sr >= 32000
        ):  # a 12 kHz tone cannot exist at 16 kHz: it must vanish, not alias to 4 kHz
            alias = resampler.resample(
                (0.5 * np.sin(2 * np.pi * 12000.0 * t)).astype(np.float32), orig_sr=sr
            )
            assert 20 * np.log10(rms(alias[1600:-1600]) / (0.5 / np.sqrt(2))) < -40, sr


def tone_peak(y: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y)), n=16 * len(y)))
    return float(np.argmax(spectrum) * sr / (16 * len(y)))


def rms(y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))


def test_encoded_test_media_is_what_it_says():
    """The containers the tests send: their codec, rate and channels, as FFmpeg reads them."""
    import av

    expected = {
        "wav": "pcm_s16le",
        "flac": "flac",
        "mp3": "mp3float",
        "ogg": "opus",
        "webm": "opus",
        "m4a": "aac",
        "aac": "aac",
    }
    for fmt, codec in expected.items():
        with av.open(io.BytesIO(media.encode_audio(clip(44100, 2), 44100, fmt))) as c:
            stream = c.streams.audio[0]
            assert (stream.codec_context.name, stream.channels) == (codec, 2), fmt
            assert stream.rate == (48000 if codec == "opus" else 44100), fmt


def test_describe_media():
    from omni_vllm.processing import describe_media

    data = {
        "images": [media.image(width=3000, height=1)],
        "videos": [media.video(frames=4)],
        "audio": [np.zeros(32000, np.float32)],
    }
    assert (
        describe_media(data, 16000)
        == "image 3000x1, video of 4 frames of 84x56, audio of 2.00 s"
    )
    assert describe_media({"text": "hi"}, 16000) == ""
