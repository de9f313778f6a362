"""Reliability of the OpenAI-compatible server (api/): a mixed concurrent load with aborts, a corpus of bad
inputs, and a property-based fuzzer, all against the real `python -m omni_vllm.api.serve` on the tiny checkpoint in a
subprocess, driven with the real `openai` SDK and raw httpx. After each: no 5xx, every request answered, the
speech engine's and vLLM's gauges back to zero, the server healthy; after the load, its memory flat.

A longer soak (not run by CI): benchmarks/soak.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
from api_server import (
    assert_no_traceback,
    metric,
    mp4_data_url,
    png_data_url,
    running_server,
    wav_b64,
)
from PIL import Image

from omni_vllm.testing import media

SR = 24000
SAMPLES_PER_CODE = 480
CODES = 16  # max_audio_tokens of the load's requests
MAX_AUDIO_S = 5
STREAM = '{"first_chunk": 12, "chunk": 24, "left_context": 12, "look_ahead": 12, "num_steps": 2}'
SERVER_ARGS = [
    "--max-audio-tokens",
    "24",
    "--max-media-mb",
    "1",
    "--max-audio-input-seconds",
    str(MAX_AUDIO_S),
    "--max-video-input-seconds",
    "3",
    "--max-image-pixels",
    str(1024 * 1024),
    "--max-request-mb",
    "4",
    "--audio-id-ttl",
    "600",
    "--speech-stream-config",
    STREAM,
]
USER = [{"role": "user", "content": "Hello, how are you today?"}]
GAUGES = (
    "omni_vllm:speaking_requests",
    "omni_vllm:speech_waiting",
    "omni_vllm:speech_talker_slots_used",
    "omni_vllm:speech_queued_windows",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)
N_LOAD, N_WARM, CLIENTS = 200, 200, 16  # warm-up: one round of the same mix
FORMATS = ["wav", "mp3", "flac", "opus", "pcm16"]
KINDS = ["text", "input_audio", "image_url", "video_url"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    with running_server(
        tiny_checkpoint_dir, tmp_path_factory.mktemp("rel") / "server.log", *SERVER_ARGS
    ) as s:
        yield s


def mixed_media_parts() -> dict:
    """The content part of each input kind of the load's mix (None: text only)."""
    tone = wav_b64(media.tone(0.5))
    return {
        "text": None,
        "input_audio": {
            "type": "input_audio",
            "input_audio": {"data": tone, "format": "wav"},
        },
        "image_url": {
            "type": "image_url",
            "image_url": {"url": png_data_url(media.image(width=56, height=56))},
        },
        "video_url": {
            "type": "video_url",
            "video_url": {"url": mp4_data_url(media.video(frames=2))},
        },
    }


@pytest.fixture(scope="module")
def media_parts():
    return mixed_media_parts()


def server_procs(server):
    """The server process (a child of this pytest, started by running_server) and its children."""
    import psutil

    port = server["root"].rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "omni_vllm.api.serve" in cmd and port in cmd:
            return [child, *child.children(recursive=True)]
    raise AssertionError("server process not found")


def server_rss(server) -> dict[str, int]:
    """Resident memory of each server process (API server, EngineCore, worker, ...), bytes."""
    import psutil

    out = {}
    for p in server_procs(server):
        with contextlib.suppress(psutil.Error):
            out[f"{p.name()}:{p.pid}"] = p.memory_info().rss
    return out


def rss_line(rss: dict[str, int]) -> str:
    return (
        f"{sum(rss.values()) / 2**20:.0f} MiB ("
        + ", ".join(f"{k.rsplit(':', 1)[0]} {v / 2**20:.0f}" for k, v in rss.items())
        + ")"
    )


def wait_idle(server, timeout: float = 60.0) -> dict[str, float | None]:
    """Poll /metrics until every gauge of GAUGES is zero (bounded); the last values seen."""
    deadline = time.monotonic() + timeout
    while True:
        values = {g: metric(server["root"], g) for g in GAUGES}
        if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.25)


def assert_healthy(server) -> None:
    assert httpx.get(server["root"] + "/health", timeout=30).status_code == 200
    r = httpx.post(
        server["base_url"] + "/chat/completions",
        timeout=120,
        json={
            "model": server["model"],
            "messages": USER,
            "max_tokens": 2,
            "modalities": ["text", "audio"],
            "audio": {"voice": "Ethan", "format": "pcm16"},
            "max_audio_tokens": 2,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    pcm = base64.b64decode(r.json()["choices"][0]["message"]["audio"]["data"])
    assert len(pcm) > 0 and len(pcm) % 2 == 0


def decode(data: bytes, fmt: str) -> int:
    """Number of samples of an audio answer; the container must decode at 24 kHz mono."""
    if fmt == "pcm16":
        assert len(data) % 2 == 0
        return len(data) // 2
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SR and audio.ndim == 1 and np.isfinite(audio).all()
    return len(audio)


# --------------------------------------------------------------------------- 1. load with aborts


def plan(i: int) -> dict:
    """Request i of the mix: input kind, stream or not, voice, format, abort after the first delta."""
    stream = i % 2 == 1
    return {
        "kind": KINDS[(i // 2) % 4],
        "stream": stream,
        "voice": ["Chelsie", "ethan"][(i // 3) % 2],
        "fmt": "pcm16" if stream else FORMATS[(i // 2) % 5],
        "abort": i % 10 in (1, 5),
        "text_only": i % 20 == 8,
        "max_tokens": 8 + i % 9,
        "codes": 12 + i % 13,
    }


def one_request(client, server, parts, i: int) -> dict:
    import openai

    p = plan(i)
    content = "Tell me something. " * (1 + i % 3)
    if parts[p["kind"]] is not None:
        content = [parts[p["kind"]], {"type": "text", "text": "What is this?"}]
    args = dict(
        model=server["model"],
        messages=[{"role": "user", "content": content}],
        max_tokens=p["max_tokens"],
        extra_body={"ignore_eos": True},
    )
    if not p["text_only"]:
        args.update(
            modalities=["text", "audio"],
            audio={"voice": p["voice"], "format": p["fmt"]},
        )
        args["extra_body"]["max_audio_tokens"] = p["codes"]
    out = {"i": i, "status": 200, "aborted": False, **p}
    t0 = time.monotonic()
    try:
        if not p["stream"]:
            resp = client.chat.completions.create(**args)
            choice = resp.choices[0]
            assert choice.finish_reason in ("length", "stop"), choice
            if p["text_only"]:
                assert isinstance(choice.message.content, str)
            else:
                n = decode(base64.b64decode(choice.message.audio.data), p["fmt"])
                codes = resp.usage.completion_tokens_details.audio_tokens
                assert 0 < codes <= p["codes"] and n == codes * SAMPLES_PER_CODE, (
                    n,
                    codes,
                )
                assert choice.message.audio.transcript is not None
        else:
            stream = client.chat.completions.create(
                **args, stream=True, stream_options={"include_usage": True}
            )
            pcm, finish, usage = b"", None, None
            with stream:
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    c = chunk.choices[0]
                    audio = getattr(c.delta, "audio", None) or (
                        c.delta.model_extra or {}
                    ).get("audio")
                    data = (
                        audio.get("data")
                        if isinstance(audio, dict)
                        else getattr(audio, "data", None)
                    )
                    text = (
                        audio.get("transcript")
                        if isinstance(audio, dict)
                        else getattr(audio, "transcript", None)
                    )
                    if data:
                        pcm += base64.b64decode(data)
                    finish = c.finish_reason or finish
                    if p["abort"] and (data or text or c.delta.content):
                        out["aborted"] = True
                        break  # leaving the `with` closes the connection mid-stream
            if not out["aborted"]:
                assert finish in ("length", "stop") and usage is not None, (
                    finish,
                    usage,
                )
                if not p["text_only"]:
                    codes = usage.completion_tokens_details.audio_tokens
                    assert (
                        len(pcm) % 2 == 0
                        and len(pcm) == 2 * SAMPLES_PER_CODE * codes
                        and codes > 0
                    )
    except openai.APIStatusError as e:
        out.update(status=e.status_code, error=e.response.text[:300])
    out["seconds"] = time.monotonic() - t0
    return out


def run_round(server, parts, indices) -> list[dict]:
    from openai import OpenAI

    local = threading.local()

    def work(i):
        if not hasattr(local, "client"):
            local.client = OpenAI(
                base_url=server["base_url"],
                api_key="unused",
                timeout=180,
                max_retries=0,
            )
        return one_request(local.client, server, parts, i)

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(work, indices, timeout=900))


def test_load_with_aborts(server, media_parts):
    warm = run_round(server, media_parts, range(N_WARM))
    assert all(r["status"] == 200 for r in warm), [
        r for r in warm if r["status"] != 200
    ][:3]
    assert all(v == 0 for v in wait_idle(server).values())
    time.sleep(1.0)
    rss_warm = server_rss(server)
    t0 = time.monotonic()
    results = run_round(server, media_parts, range(N_WARM, N_WARM + N_LOAD))
    elapsed = time.monotonic() - t0
    idle = wait_idle(server)
    time.sleep(1.0)
    rss_after = server_rss(server)
    errors = [r for r in results if r["status"] != 200]
    aborted = sum(r["aborted"] for r in results)
    lat = sorted(r["seconds"] for r in results)
    print(
        f"\nload: {len(results)} requests ({aborted} aborted, {len(errors)} errors, "
        f"{sum(r['status'] >= 500 for r in results)} 5xx) in {elapsed:.1f} s with {CLIENTS} clients; "
        f"p50 {lat[len(lat) // 2]:.2f} s p95 {lat[int(len(lat) * 0.95)]:.2f} s; "
        f"server RSS {rss_line(rss_warm)} after warm-up -> {rss_line(rss_after)} after load"
    )
    assert not errors, errors[:5]
    assert (
        aborted >= 0.2 * len(results) * 0.9
    )  # 20% planned: the first delta always arrives
    assert all(v == 0 for v in idle.values()), idle
    assert abs(sum(rss_after.values()) - sum(rss_warm.values())) <= 0.10 * sum(
        rss_warm.values()
    ), (rss_warm, rss_after)
    assert_no_traceback(server["log"])
    assert_healthy(server)


# --------------------------------------------------------------------------- 2. bad inputs


def _wav_claiming_huge() -> str:
    """A WAV whose RIFF and data sizes claim ~4 GiB, followed by 0.1 s of samples."""
    pcm = (np.sin(np.arange(1600) / 5) * 10000).astype("<i2").tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16)
    return base64.b64encode(
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFF0)
        + b"WAVE"
        + fmt
        + b"data"
        + struct.pack("<I", 0xFFFFFF00)
        + pcm
    ).decode()


def _png_claiming(width: int, height: int) -> str:
    """A PNG data URL whose header says width x height, with (almost) no pixel data after it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _video(url: str) -> list:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url}},
                {"type": "text", "text": "what?"},
            ],
        }
    ]


def _chunked(data: bytes):
    """A body sent without Content-Length (chunked transfer encoding)."""
    for i in range(0, len(data), 2**20):
        yield data[i : i + 2**20]


def _audio(data: str, fmt: str = "wav") -> list:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
            ],
        }
    ]


def _image(url: str) -> list:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "what?"},
            ],
        }
    ]


TRUNCATED_WAV = wav_b64(media.tone(0.5))[
    :200
]  # whole base64 quanta of a cut file: header, no samples
# (name, path, body: dict merged into a valid audio chat body / bytes sent raw / callable, allowed statuses)
BAD = [
    # malformed bodies
    ("json_garbage", "chat", b"{not json", {400, 422}),
    ("json_truncated", "chat", b'{"model": "tiny-omni", "messages": [', {400, 422}),
    ("json_array", "chat", b"[1, 2, 3]", {400, 422}),
    ("json_empty_body", "chat", b"", {400, 422}),
    (
        "json_nan",
        "chat",
        b'{"model": "tiny-omni", "messages": [{"role": "user", "content": "x"}], '
        b'"max_tokens": NaN}',
        {400, 422},
    ),
    ("binary_body", "chat", bytes(range(256)) * 4, {400, 422}),
    # wrong types / missing fields
    ("missing_messages", "chat", {"messages": None}, {400, 422}),
    ("messages_not_list", "chat", {"messages": "hello"}, {400, 422}),
    (
        "empty_messages",
        "chat",
        {"messages": []},
        {200, 400, 422},
    ),  # vLLM renders an empty chat
    ("message_no_role", "chat", {"messages": [{"content": "hi"}]}, {400, 422}),
    # vLLM allows custom roles
    (
        "unknown_role",
        "chat",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {200, 400, 422},
    ),
    (
        "content_is_int",
        "chat",
        {"messages": [{"role": "user", "content": 42}]},
        {400, 422},
    ),
    (
        "unknown_part_type",
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "hologram", "x": 1}]}]},
        {400, 422},
    ),
    ("max_tokens_string", "chat", {"max_tokens": "many"}, {400, 422}),
    ("max_tokens_negative", "chat", {"max_tokens": -5}, {400, 422}),
    ("max_tokens_huge", "chat", {"max_tokens": 10**12}, {400, 422}),
    ("temperature_negative", "chat", {"temperature": -1.0}, {400, 422}),
    ("audio_not_object", "chat", {"audio": "Ethan"}, {400, 422}),
    ("modalities_string", "chat", {"modalities": "audio"}, {400, 422}),
    ("max_audio_tokens_negative", "chat", {"max_audio_tokens": -3}, {400}),
    ("max_audio_tokens_string", "chat", {"max_audio_tokens": "lots"}, {400}),
    (
        "max_audio_tokens_huge",
        "chat",
        {"max_audio_tokens": 10**12},
        {200, 400},
    ),  # capped by --max-audio-tokens
    # voices and formats
    ("voice_unknown", "chat", {"audio": {"voice": "nobody", "format": "wav"}}, {400}),
    # OpenAI's voice names are aliases of the checkpoint's (omni_vllm.voices)
    ("voice_openai", "chat", {"audio": {"voice": "alloy", "format": "wav"}}, {200}),
    ("voice_wrong_type", "chat", {"audio": {"voice": 7, "format": "wav"}}, {400}),
    ("format_unknown", "chat", {"audio": {"voice": "Ethan", "format": "midi"}}, {400}),
    (
        "format_stream_mp3",
        "chat",
        {"audio": {"voice": "Ethan", "format": "mp3"}, "stream": True},
        {400},
    ),
    # media
    ("audio_broken_base64", "chat", {"messages": _audio("%%%not base64%%%")}, {400}),
    ("audio_truncated", "chat", {"messages": _audio(TRUNCATED_WAV)}, {400, 422}),
    (
        "audio_not_audio",
        "chat",
        {"messages": _audio(base64.b64encode(b"GIF89a" + b"\0" * 500).decode())},
        {422},
    ),
    ("audio_empty", "chat", {"messages": _audio("")}, {400, 422}),
    (
        "audio_wrong_format_field",
        "chat",
        {"messages": _audio(wav_b64(media.tone(0.2)), "banana")},
        {400, 422},
    ),
    # the header's sizes are not trusted: libsndfile reads the 0.1 s that are there
    (
        "audio_header_claims_4gib",
        "chat",
        {"messages": _audio(_wav_claiming_huge())},
        {200},
    ),
    (
        "image_zero_bytes",
        "chat",
        {"messages": _image("data:image/png;base64,")},
        {400, 422},
    ),
    (
        "image_not_image",
        "chat",
        {
            "messages": _image(
                "data:image/png;base64," + base64.b64encode(b"x" * 64).decode()
            )
        },
        {400, 422},
    ),
    (
        "image_broken_base64",
        "chat",
        {"messages": _image("data:image/png;base64,@@@@")},
        {400, 422},
    ),
    (
        "image_huge_data_url",
        "chat",
        {"messages": _image("data:image/png;base64," + "A" * (2 * 2**20))},
        {413},
    ),
    (
        "image_bad_scheme",
        "chat",
        {"messages": _image("ftp://127.0.0.1/x.png")},
        {400, 422},
    ),
    (
        "video_not_video",
        "chat",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "video_url",
                            "video_url": {
                                "url": "data:video/mp4;base64," + "eHl6" * 30
                            },
                        }
                    ],
                }
            ]
        },
        {400, 422},
    ),
    (
        "too_many_parts_images",
        "chat",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA"},
                        }
                    ]
                    * 500,
                }
            ]
        },
        {400, 413, 422},
    ),
    (
        "too_many_parts_text",
        "chat",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "word " * 3}] * 3000,
                }
            ]
        },
        {400, 413, 422},
    ),
    (
        "prompt_too_long",
        "chat",
        {"messages": [{"role": "user", "content": "hello " * 5000}]},
        {400, 413},
    ),
    # audio ids, model
    (
        "audio_id_unknown",
        "chat",
        {
            "messages": [
                *USER,
                {"role": "assistant", "audio": {"id": "audio_nope"}},
                {"role": "user", "content": "?"},
            ]
        },
        {400},
    ),
    (
        "audio_id_not_string",
        "chat",
        {
            "messages": [
                *USER,
                {"role": "assistant", "audio": {"id": 12}},
                {"role": "user", "content": "?"},
            ]
        },
        {400, 422},
    ),
    ("model_wrong", "chat", {"model": "gpt-4o-audio-preview"}, {404}),
    # /v1/audio/speech
    ("speech_empty_input", "speech", {"input": ""}, {400}),
    ("speech_input_too_long", "speech", {"input": "x" * 5000}, {400}),
    ("speech_format_unknown", "speech", {"response_format": "midi"}, {400}),
    ("speech_format_aac", "speech", {"response_format": "aac"}, {200}),
    ("speech_speed_high", "speech", {"speed": 4.5}, {400}),
    ("speech_speed_low", "speech", {"speed": 0.1}, {400}),
    ("speech_speed_string", "speech", {"speed": "fast"}, {400, 422}),
    ("speech_voice_unknown", "speech", {"voice": "nobody"}, {400}),
    ("speech_voice_openai", "speech", {"voice": "marin"}, {200}),
    ("speech_input_missing", "speech", {"input": None}, {400, 422}),
    ("speech_model_wrong", "speech", {"model": "tts-1"}, {404}),
    ("speech_malformed_json", "speech", b'{"input": "hi", ', {400, 422}),
]
# Limits (this server: 1 MiB media items, 5 s audio, 3 s video, 1 Mpx images and frames, 4 MiB bodies):
# (name, body as in BAD, words the 413's message must contain)
LIMITS = [
    (
        "image_header_30000x20000",
        {"messages": _image(_png_claiming(30000, 20000))},
        "pixels",
    ),
    (
        "image_1100x1000",
        {"messages": _image(png_data_url(Image.new("RGB", (1100, 1000))))},
        "pixels",
    ),
    (
        "video_5s",
        {"messages": _video(mp4_data_url(media.video(frames=10), fps=2))},
        "video is 5.0 s long",
    ),
    (
        "video_frame_1280x1024",
        {"messages": _video(mp4_data_url(np.zeros((1, 1024, 1280, 3), np.uint8)))},
        "video frame is 1280x1024",
    ),
    (
        "audio_6s",
        {"messages": _audio(wav_b64(np.zeros(16000 * 6, np.float32)))},
        "audio is 6.0 s long",
    ),
    (
        "media_item_2mib",
        {"messages": _image("data:image/png;base64," + "A" * (3 * 2**20))},
        "1 MiB",
    ),
    (
        "body_5mib",
        {"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]},
        "request body",
    ),
    (
        "body_5mib_chunked",
        lambda: _chunked(
            b'{"messages": [{"role": "user", "content": "'
            + b"x" * (5 * 2**20)
            + b'"}]}'
        ),
        "request body",
    ),
]
# unicode edge cases as JSON string literals (raw, so lone surrogates survive): may be answered (200), never a 5xx
UNICODE = {
    "lone_surrogate": '"a\\ud800b"',
    "lone_low_surrogate": '"\\udfff"',
    "nul": '"a\\u0000b\\u0000"',
    "rtl": json.dumps(
        "\u202eolleh \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627"
    ),
    "emoji_zwj": json.dumps(
        "\U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f600" * 20
    ),
    "combining": json.dumps("e" + "\u0301" * 300),
    "bom_and_controls": json.dumps("\ufeff\x01\x07\x1b[31m\x7f"),
    "noncharacters": json.dumps("\uffff\ufffe\U0010ffff"),
    "raw_invalid_utf8": b'"\xff\xfe\xc3("',
}


def _base(server, path: str) -> dict:
    if path == "speech":
        return {
            "model": server["model"],
            "input": "Hello there.",
            "voice": "Ethan",
            "response_format": "wav",
            "max_audio_tokens": 4,
        }
    return {
        "model": server["model"],
        "messages": USER,
        "max_tokens": 2,
        "modalities": ["text", "audio"],
        "audio": {"voice": "Ethan", "format": "wav"},
        "max_audio_tokens": 4,
        "ignore_eos": True,
    }


def _post(server, path: str, body) -> httpx.Response:
    url = server["base_url"] + (
        "/audio/speech" if path == "speech" else "/chat/completions"
    )
    if isinstance(body, bytes) or callable(body):
        return httpx.post(
            url,
            content=body() if callable(body) else body,
            headers={"content-type": "application/json"},
            timeout=120,
        )
    full = {k: v for k, v in {**_base(server, path), **body}.items() if v is not None}
    return httpx.post(url, json=full, timeout=120)


def assert_openai_error(r: httpx.Response, allowed: set[int]) -> None:
    assert r.status_code in allowed, (r.status_code, r.text[:1000])
    if r.status_code < 400:
        return
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), body
    assert (
        isinstance(err["message"], str)
        and err["message"]
        and isinstance(err["type"], str)
    ), body
    assert err["code"] == r.status_code, body


@pytest.mark.parametrize("name, path, body, allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, name, path, body, allowed):
    assert_openai_error(_post(server, path, body), allowed)


@pytest.mark.parametrize("name, body, words", LIMITS, ids=[c[0] for c in LIMITS])
def test_limits(server, name, body, words):
    r = _post(server, "chat", body)
    assert_openai_error(r, {413})
    assert words in r.json()["error"]["message"], r.json()


def test_body_claiming_4gib(server):
    """A Content-Length of 4 GiB is refused from the headers alone: the 413 comes back while the
    client has sent a few bytes of the body and the connection is closed."""
    import socket

    host, port = server["root"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 4294967296\r\n\r\n{"messages": ['
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:500]
    assert json.loads(body)["error"]["code"] == 413


@pytest.mark.parametrize("name", list(UNICODE))
@pytest.mark.parametrize("route", ["text", "audio", "speech"])
def test_unicode_text(server, name, route):
    lit = UNICODE[name] if isinstance(UNICODE[name], bytes) else UNICODE[name].encode()
    if route == "speech":
        raw = (
            b'{"model": "%s", "voice": "Ethan", "max_audio_tokens": 2, "input": %s}'
            % (server["model"].encode(), lit)
        )
    else:
        extra = (
            b'"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"}, '
            if route == "audio"
            else b""
        )
        raw = (
            b'{"model": "%s", %s"max_tokens": 2, "max_audio_tokens": 2, "ignore_eos": true, '
            b'"messages": [{"role": "user", "content": %s}]}'
        ) % (server["model"].encode(), extra, lit)
    assert_openai_error(
        _post(server, "speech" if route == "speech" else "chat", raw), {200, 400, 422}
    )


def test_healthy_after_bad_inputs(server):
    assert all(v == 0 for v in wait_idle(server).values())
    assert_healthy(server)


# --------------------------------------------------------------------------- 3. property-based fuzzer


def _bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    text = st.text(max_size=60)
    part = st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("text"), "text": st.one_of(text, scalars)}
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("input_audio"),
                "input_audio": st.fixed_dictionaries(
                    {
                        "data": st.one_of(
                            text,
                            st.binary(max_size=200).map(
                                lambda b: base64.b64encode(b).decode()
                            ),
                        ),
                        "format": st.sampled_from(
                            ["wav", "mp3", "flac", "ogg", "xyz", ""]
                        ),
                    }
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["image_url", "video_url", "audio_url"]),
                "url": text,
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["image_url", "video_url", "audio_url"]),
                "image_url": st.fixed_dictionaries(
                    {
                        "url": st.one_of(
                            text,
                            st.binary(max_size=100).map(
                                lambda b: (
                                    "data:image/png;base64,"
                                    + base64.b64encode(b).decode()
                                )
                            ),
                        )
                    }
                ),
            }
        ),
        st.dictionaries(st.text(max_size=8), scalars, max_size=3),
    )
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(
                ["user", "system", "assistant", "tool", "developer", "x"]
            )
        },
        optional={
            "content": st.one_of(text, st.lists(part, max_size=4), scalars),
            "audio": st.one_of(
                scalars, st.fixed_dictionaries({"id": st.one_of(text, scalars)})
            ),
        },
    )
    junk = {  # per field: wrong values (type, range, shape)
        "messages": st.one_of(st.lists(message, min_size=0, max_size=4), scalars),
        "max_tokens": st.one_of(
            st.integers(-3, 0), st.sampled_from([10**9, 10**15, "5", 2.5, "x", [], {}])
        ),
        "model": st.one_of(text, scalars),
        "modalities": st.one_of(
            st.sampled_from([["audio"], [], ["text", "video"]]),
            st.lists(text, max_size=3),
            scalars,
        ),
        "audio": st.one_of(
            scalars,
            st.fixed_dictionaries(
                {},
                optional={
                    "voice": st.one_of(
                        st.sampled_from(["alloy", ""]),
                        scalars,
                        st.fixed_dictionaries({"id": text}),
                    ),
                    "format": st.one_of(st.sampled_from(["aac", "ogg", ""]), scalars),
                },
            ),
        ),
        "max_audio_tokens": st.one_of(st.integers(-3, 0), scalars),
        "n": st.one_of(st.integers(-1, 3), scalars),
        "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), scalars),
        "seed": st.one_of(st.integers(-(2**70), 2**70), scalars),
        "stop": st.one_of(st.lists(text, max_size=3), scalars),
        "stream_options": st.one_of(
            st.fixed_dictionaries({"include_usage": st.booleans()}), scalars
        ),
        "top_p": st.one_of(st.floats(-1, 2, allow_nan=False), scalars),
        "extra_junk_field": scalars,
    }
    user_text = st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.text(min_size=1, max_size=60)}
    )
    valid = st.fixed_dictionaries(
        {
            "messages": st.one_of(
                st.lists(user_text, min_size=1, max_size=3),
                st.lists(st.one_of(user_text, message), min_size=1, max_size=3),
            ),
            "max_tokens": st.integers(1, 6),
            "modalities": st.sampled_from(
                [["text"], ["text", "audio"], ["text", "audio"]]
            ),
            "audio": st.fixed_dictionaries(
                {
                    "voice": st.sampled_from(["Chelsie", "ethan", "CHELSIE"]),
                    "format": st.sampled_from(FORMATS),
                }
            ),
            "max_audio_tokens": st.integers(1, 6),
            "stream": st.booleans(),
            "ignore_eos": st.just(True),
        }
    )
    corrupt = st.dictionaries(
        st.sampled_from(sorted(junk)), st.none(), min_size=1, max_size=2
    ).flatmap(lambda keys: st.fixed_dictionaries({k: junk[k] for k in keys}))
    return st.tuples(valid, st.one_of(st.just({}), corrupt, corrupt)).map(
        lambda vc: _merge(*vc)
    )  # 2/3 corrupt


def _merge(body: dict, corrupt: dict) -> dict:
    body = {**body, **corrupt}
    if (
        body.get("stream")
        and isinstance(body.get("audio"), dict)
        and "format" not in corrupt.get("audio", {})
    ):
        body["audio"] = {
            **body["audio"],
            "format": "pcm16",
        }  # a streamed valid body asks for pcm16
    return body


def test_fuzz_chat_bodies(server):
    from hypothesis import HealthCheck, given, settings

    seen: dict[int, int] = {}

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=_bodies())
    def check(body):
        body.setdefault("model", server["model"])
        if not (
            isinstance(body.get("max_tokens"), int) and 0 < body["max_tokens"] < 100
        ):
            body.pop(
                "ignore_eos", None
            )  # random weights never stop: keep every accepted request short
        with httpx.stream(
            "POST", server["base_url"] + "/chat/completions", json=body, timeout=120
        ) as r:
            r.read()
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, r.status_code, r.text[:1000])
        if r.status_code >= 400:
            assert_openai_error(r, {r.status_code})

    check()
    assert seen.get(200, 0) >= 5 and sum(v for k, v in seen.items() if k >= 400) >= 5, (
        seen
    )  # both kinds seen
    print(f"\nfuzz statuses: {seen}")
    assert all(v == 0 for v in wait_idle(server).values())
    assert_healthy(server)
