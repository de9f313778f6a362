"""Deterministic media inputs for tests and demos: tones, speech, images and videos made in code.

torchvision's video IO does not load beside the CPU torch build, so videos are numpy frame arrays.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np

AUDIO_SR = 16000


def tone(seconds: float = 2.0, freq: float = 440.0, sr: int = AUDIO_SR) -> np.ndarray:
    """A sine tone with a slow amplitude wobble, float32 mono."""
    t = np.arange(int(seconds * sr)) / sr
    env = 0.5 + 0.3 * np.sin(2 * np.pi * 1.5 * t)
    return (0.4 * env * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def spoken_phrase(
    text: str = "Hello, what can you hear?", sr: int = AUDIO_SR
) -> np.ndarray | None:
    """`text` spoken by espeak-ng at `sr`, or None where espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    import soundfile as sf

    wav = subprocess.run(
        ["espeak-ng", "--stdout", text], check=True, capture_output=True
    ).stdout
    data, native_sr = sf.read(io.BytesIO(wav), dtype="float32")
    if data.ndim > 1:
        data = data.mean(axis=1)
    # Linear-interpolation resampling is enough for a test input.
    n = int(len(data) * sr / native_sr)
    return np.interp(
        np.linspace(0, len(data) - 1, n), np.arange(len(data)), data
    ).astype(np.float32)


def image(width: int = 112, height: int = 84, seed: int = 0):
    """An RGB PIL image: colour gradients plus a little seeded noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1
    )
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def video(
    frames: int = 8, width: int = 84, height: int = 56, seed: int = 0
) -> np.ndarray:
    """A (T, H, W, 3) uint8 clip of a square moving across a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        f = np.stack(
            [x * 255 / width, y * 255 / height, np.full_like(x, 40 * (i % 6))], axis=-1
        )
        cx = int((i + 0.5) * width / frames)
        f[height // 3 : 2 * height // 3, max(cx - 8, 0) : cx + 8] = (255, 255, 255)
        out[i] = np.clip(f + rng.normal(0, 8, f.shape), 0, 255).astype(np.uint8)
    return out


# Containers and codecs that browsers and phones send, as FFmpeg (PyAV) names them:
# format -> (PyAV container, codec, MIME type)
AUDIO_CONTAINERS = {
    "wav": ("wav", "pcm_s16le", "audio/wav"),
    "flac": ("flac", "flac", "audio/flac"),
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "ogg": (
        "ogg",
        "libopus",
        "audio/ogg",
    ),  # Ogg/Opus: voice notes, Firefox's MediaRecorder
    "webm": (
        "webm",
        "libopus",
        "audio/webm",
    ),  # WebM/Opus: Chrome's MediaRecorder (no duration in it)
    "m4a": (
        "ipod",
        "aac",
        "audio/mp4",
    ),  # M4A/AAC: phone recorders, Safari's MediaRecorder
    "aac": (
        "adts",
        "aac",
        "audio/aac",
    ),  # raw AAC (ADTS): FFmpeg estimates its length from the bit rate
}


def encode_audio(audio: np.ndarray, sr: int, fmt: str) -> bytes:
    """float32 audio, (samples,) or (samples, channels), as a file of `fmt` (AUDIO_CONTAINERS),
    written by PyAV. Opus runs at 48 kHz only, so Opus files are resampled to it by the encoder. WebM
    is written as a live stream, as browsers' MediaRecorder does: its header has no duration."""
    import av

    container, codec, _ = AUDIO_CONTAINERS[fmt]
    audio = np.asarray(audio, np.float32)
    planar = audio.reshape(1, -1) if audio.ndim == 1 else np.ascontiguousarray(audio.T)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    rate = 48000 if codec == "libopus" else sr
    buf = io.BytesIO()
    with av.open(
        buf, "w", format=container, options={"live": "1"} if fmt == "webm" else {}
    ) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        fmt_name = stream.codec_context.format.name
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = sr
        resampler = av.AudioResampler(
            format=fmt_name, layout=layout, rate=rate, frame_size=frame_size
        )
        for f in [*resampler.resample(frame), *resampler.resample(None), None]:
            for packet in stream.encode(f):
                out.mux(packet)
    return buf.getvalue()
