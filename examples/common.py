"""Shared by the examples: command line, client, demo media made with the standard library, saving audio.

Every example talks to a running server (`scripts/serve`, by default http://127.0.0.1:8000/v1) with the
`openai` SDK only; `--max-audio-tokens` is an omni-vllm extension (speech codes, 50 per second).
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import os
import struct
import wave

SAMPLE_RATE = 24000  # the server's audio output: 24 kHz mono


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL"
    )
    p.add_argument(
        "--model", default=None, help="served model name (default: the server's first)"
    )
    p.add_argument("--voice", default="Chelsie", help="Chelsie or Ethan")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="most text tokens of the reply"
    )
    p.add_argument(
        "--max-audio-tokens",
        type=int,
        default=None,
        help="most speech codes (50 per second)",
    )
    p.add_argument("--out", default=out, help="where to write the spoken reply")
    return p


def connect(args):
    """(client, model name)."""
    from openai import OpenAI

    client = OpenAI(
        base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused")
    )
    return client, args.model or client.models.list().data[0].id


def extra_body(args) -> dict:
    return (
        {}
        if args.max_audio_tokens is None
        else {"max_audio_tokens": args.max_audio_tokens}
    )


def speak(client, model, args, messages, **kw):
    """One non-streamed chat completion with text and audio (wav) out; writes args.out."""
    resp = client.chat.completions.create(
        model=model,
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": args.voice, "format": "wav"},
        max_completion_tokens=args.max_tokens,
        extra_body={**extra_body(args), **kw.pop("extra_body", {})},
        **kw,
    )
    audio = resp.choices[0].message.audio
    with open(args.out, "wb") as f:
        f.write(base64.b64decode(audio.data))
    print(f"transcript: {audio.transcript!r}")
    print(
        f"audio: {args.out} ({resp.usage.completion_tokens_details.audio_tokens} speech tokens); "
        f"audio id {audio.id} (send it back as {{'role': 'assistant', 'audio': {{'id': ...}}}})"
    )
    return resp


def tone_wav(seconds: float = 2.0, freq: float = 440.0, sr: int = 16000) -> bytes:
    """A sine tone as WAV bytes (a stand-in for a recorded question)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(
            b"".join(
                struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / sr)))
                for i in range(int(seconds * sr))
            )
        )
    return buf.getvalue()


def gradient_bmp(width: int = 96, height: int = 64) -> bytes:
    """A colour-gradient picture as BMP bytes."""
    row_pad = (4 - width * 3 % 4) % 4
    pixels = b"".join(
        bytes(
            b for x in range(width) for b in (x * 255 // width, y * 255 // height, 128)
        )
        + b"\0" * row_pad
        for y in range(height)
    )
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0
    )
    return header + info + pixels


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class WavWriter:
    """pcm16 24 kHz mono chunks appended to a WAV file as they arrive."""

    def __init__(self, path: str):
        self.w = wave.open(path, "wb")  # noqa: SIM115 (closed by close())
        self.w.setnchannels(1), self.w.setsampwidth(2), self.w.setframerate(SAMPLE_RATE)

    def write(self, pcm: bytes) -> None:
        self.w.writeframes(pcm)

    def close(self) -> None:
        self.w.close()
