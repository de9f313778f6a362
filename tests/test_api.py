"""The OpenAI-compatible server (api/) end to end: `python -m omni_vllm.api.serve` on the tiny checkpoint in a
subprocess, driven with the real `openai` SDK. Random weights never emit EOS, so every request caps
its text (max_tokens) and its speech (`max_audio_tokens`, our extension; the server flag caps it too).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from api_server import ROOT, metric, mp4_data_url, png_data_url, running_server, wav_b64

from omni_vllm.api.app import SPEECH_SYSTEM_PROMPT
from omni_vllm.testing import media

SR = 24000
SAMPLES_PER_CODE = 480  # 2 mel frames per code x 240 samples
CODES = 12  # speech codes per request in most tests (0.24 s)
TTL = 6  # --audio-id-ttl of the test server
MAX_AUDIO_S = 5  # --max-audio-input-seconds
STREAM = '{"first_chunk": 12, "chunk": 24, "left_context": 12, "look_ahead": 12, "num_steps": 4}'
SERVER_ARGS = [
    "--max-audio-tokens",
    "48",
    "--audio-id-ttl",
    str(TTL),
    "--max-media-mb",
    "0.5",
    "--max-audio-input-seconds",
    str(MAX_AUDIO_S),
    "--default-voice",
    "ethan",
    "--speech-stream-config",
    STREAM,
    "--trust-request-mm-kwargs",
]  # use_audio_in_video
USER = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    with running_server(
        tiny_checkpoint_dir, tmp_path_factory.mktemp("api") / "server.log", *SERVER_ARGS
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(
        base_url=server["base_url"], api_key="unused", timeout=120, max_retries=0
    )


def speak(client, server, fmt="wav", voice="Chelsie", messages=USER, codes=CODES, **kw):
    kw.setdefault("max_tokens", 3)
    return client.chat.completions.create(
        model=server["model"],
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": voice, "format": fmt},
        extra_body={
            "max_audio_tokens": codes,
            "ignore_eos": True,
            **kw.pop("extra_body", {}),
        },
        **kw,
    )


def decode(data: bytes, fmt: str) -> np.ndarray:
    """Check the container's magic bytes, decode, check the rate; float32 samples."""
    if fmt in ("pcm16", "pcm"):
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767
    if (
        fmt == "aac"
    ):  # ADTS: every frame starts with a 12-bit sync word; libsndfile has no AAC, PyAV decodes
        import av

        assert data[0] == 0xFF and data[1] & 0xF0 == 0xF0, data[:4]
        with av.open(io.BytesIO(data), format="aac") as c:
            stream = c.streams.audio[0]
            assert (
                stream.codec_context.name == "aac"
                and stream.rate == SR
                and stream.channels == 1
            )
            return np.concatenate(
                [f.to_ndarray().reshape(-1) for f in c.decode(stream)]
            )
    magic = {"wav": b"RIFF", "flac": b"fLaC", "opus": b"OggS"}.get(fmt)
    if fmt == "mp3":
        assert data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0), data[
            :4
        ]
    else:
        assert data[:4] == magic, data[:4]
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SR and audio.ndim == 1
    return audio


def check_length(audio: np.ndarray, codes: int, fmt: str) -> None:
    """SAMPLES_PER_CODE a code; AAC adds the encoder's priming and pads its last 1024-sample frame."""
    n = codes * SAMPLES_PER_CODE
    assert (n <= len(audio) <= n + 2048) if fmt == "aac" else len(audio) == n, (
        len(audio),
        codes,
        fmt,
    )


def api_error(exc_info, status: int, param: str | None = None, words: str = "") -> dict:
    e = exc_info.value
    assert e.status_code == status, (e.status_code, e.body)
    body = e.response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(
        body["error"]
    ), body
    assert body["error"]["code"] == status
    if param is not None:
        assert body["error"]["param"] == param, body
    assert words.lower() in body["error"]["message"].lower(), body
    return body["error"]


# --------------------------------------------------------------------------- vLLM's routes


def test_models_health_metrics(client, server):
    import openai

    assert server["model"] in [m.id for m in client.models.list().data]
    assert httpx.get(server["root"] + "/health").status_code == 200
    text = httpx.get(server["root"] + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "omni_vllm:speaking_requests",
        "omni_vllm:audio_seconds_total",
        "omni_vllm:time_to_first_audio_seconds_bucket",
        "omni_vllm:speech_queued_windows",
    ):
        assert name in text, name
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="nope", messages=USER, max_tokens=2)
    api_error(ei, 404, "model")


def test_text_only_is_vllms(client, server):
    """No "audio" modality: vLLM's own handler, every plain feature (here n=2 and logprobs)."""
    resp = client.chat.completions.create(
        model=server["model"], messages=USER, max_tokens=4, n=2, logprobs=True
    )
    assert len(resp.choices) == 2 and all(c.message.audio is None for c in resp.choices)
    assert (
        isinstance(resp.choices[0].message.content, str)
        and resp.choices[0].logprobs.content
    )
    resp = client.chat.completions.create(
        model=server["model"], messages=USER, max_tokens=4, modalities=["text"]
    )
    assert resp.choices[0].message.content and resp.choices[0].message.audio is None


# --------------------------------------------------------------------------- chat with audio


@pytest.mark.parametrize(
    "fmt, voice",
    [
        ("wav", "Chelsie"),
        ("mp3", "ethan"),
        ("flac", "CHELSIE"),
        ("opus", "Ethan"),
        ("aac", "Chelsie"),
        ("pcm16", "chelsie"),
    ],
)
def test_chat_audio_formats(client, server, fmt, voice):
    resp = speak(client, server, fmt, voice)
    msg, usage = resp.choices[0].message, resp.usage
    assert msg.role == "assistant" and msg.content is None
    assert msg.audio.id.startswith("audio_") and msg.audio.transcript
    assert msg.audio.expires_at > time.time() + TTL - 30
    audio = decode(base64.b64decode(msg.audio.data), fmt)
    codes = usage.completion_tokens_details.audio_tokens
    assert 0 < codes <= CODES
    check_length(audio, codes, fmt)
    assert np.abs(audio).max() > 1e-3  # not silence
    text_tokens = usage.completion_tokens_details.text_tokens
    assert 0 < text_tokens <= 3 and usage.completion_tokens == text_tokens + codes
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.audio_tokens == 0
    assert resp.choices[0].finish_reason == "length"


def test_voices_seed_and_default_voice(client, server):
    """Same seed, same voice -> same audio; the other voice differs; no voice = --default-voice (Ethan)."""

    def wave(voice):
        kw = {} if voice is None else {"audio": {"voice": voice, "format": "pcm16"}}
        resp = client.chat.completions.create(
            model=server["model"],
            messages=USER,
            max_tokens=3,
            seed=7,
            temperature=0,
            modalities=["text", "audio"],
            extra_body={"max_audio_tokens": CODES},
            **(kw or {"audio": {"format": "pcm16"}}),
        )
        return base64.b64decode(resp.choices[0].message.audio.data)

    ethan, chelsie, default = wave("Ethan"), wave("Chelsie"), wave(None)
    assert ethan == default and ethan != chelsie
    # OpenAI's voice names speak as the checkpoint voice of the default table
    assert wave("alloy") == chelsie and wave({"id": "Ash"}) == ethan


def test_openai_voice_names_on_every_route(client, server):
    """GET /v1/audio/voices lists the voices and their aliases; an alias is accepted by
    /v1/audio/speech as by chat (above) and Realtime (test_realtime.py)."""
    listed = httpx.get(server["base_url"] + "/audio/voices", timeout=30).json()
    assert [v["id"] for v in listed["data"]] == ["Chelsie", "Ethan"]
    assert listed["default_voice"] == "Ethan"  # --default-voice ethan
    by_id = {v["id"]: v for v in listed["data"]}
    assert "alloy" in by_id["Chelsie"]["aliases"] and "ash" in by_id["Ethan"]["aliases"]
    assert by_id["Ethan"]["default"] and not by_id["Chelsie"]["default"]
    assert listed["aliases"]["marin"] == "Chelsie" and len(listed["aliases"]) == 13
    args = {"model": server["model"], "input": "Hi.", "response_format": "pcm"}
    args["extra_body"] = {"max_audio_tokens": CODES, "seed": 3}
    marin = client.audio.speech.create(voice="marin", **args).content
    assert marin == client.audio.speech.create(voice="Chelsie", **args).content
    with pytest.raises(Exception, match="unknown voice 'nobody'.*alloy"):
        client.audio.speech.create(voice="nobody", **args)


def test_speech_system_prompt(client, server):
    """Audio asked, no system message: Qwen's speech system prompt is added (more prompt tokens);
    a given system message is kept as is."""
    plain = client.chat.completions.create(
        model=server["model"], messages=USER, max_tokens=1
    )
    spoken = speak(client, server, "pcm16", codes=1, max_tokens=1)
    assert spoken.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    own = [{"role": "system", "content": "You are a helpful assistant."}, *USER]
    assert (
        speak(
            client, server, "pcm16", messages=own, codes=1, max_tokens=1
        ).usage.prompt_tokens
        == plain.usage.prompt_tokens
    )


def test_chat_audio_stream(client, server):
    """pcm16 deltas with transcript pieces, the id (which carries the transcript) and expires_at at the
    end, usage chunk; the first audio arrives before the text is finished."""
    stream = client.chat.completions.create(
        model=server["model"],
        messages=USER,
        max_tokens=300,
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "pcm16"},
        stream=True,
        stream_options={"include_usage": True},
        seed=11,
        extra_body={"max_audio_tokens": 48, "ignore_eos": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[0].content is None
    ids = [d.audio.id for d in deltas if d.audio and d.audio.id]
    assert (
        len(ids) == 1 and ids[0].startswith("audio_") and deltas[-1].audio.id == ids[0]
    )
    pcm = b"".join(
        base64.b64decode(d.audio.data) for d in deltas if d.audio and d.audio.data
    )
    transcript = "".join(d.audio.transcript or "" for d in deltas if d.audio)
    assert chunks[-1].usage is not None and not chunks[-1].choices
    usage = chunks[-1].usage
    assert (
        len(pcm) == 2 * SAMPLES_PER_CODE * usage.completion_tokens_details.audio_tokens
    )
    assert (
        24 <= usage.completion_tokens_details.audio_tokens <= 48
    )  # seeded: 48 unless a stop code is drawn
    assert usage.completion_tokens_details.text_tokens == 300
    assert transcript and all(d.content is None for d in deltas)
    last = deltas[-1]
    assert (
        last.audio.expires_at
        and [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    )
    kinds = [
        "data" if d.audio.data else "text"
        for d in deltas
        if d.audio and (d.audio.data or d.audio.transcript)
    ]
    assert kinds.index("data") < len(kinds) - 1 - kinds[::-1].index("text"), (
        kinds
    )  # audio before text ends
    assert sum(k == "data" for k in kinds) >= 2  # in pieces


def test_input_audio_image_video(client, server):
    tone = wav_b64(media.tone(1.0))
    cases = {
        "input_audio": {
            "type": "input_audio",
            "input_audio": {"data": tone, "format": "wav"},
        },
        "audio_url": {
            "type": "audio_url",
            "audio_url": {"url": "data:audio/wav;base64," + tone},
        },
        "image_url": {
            "type": "image_url",
            "image_url": {"url": png_data_url(media.image())},
        },
        "video_url": {
            "type": "video_url",
            "video_url": {"url": mp4_data_url(media.video(frames=4))},
        },
    }
    for name, part in cases.items():
        msgs = [
            {
                "role": "user",
                "content": [part, {"type": "text", "text": "What is this?"}],
            }
        ]
        resp = speak(client, server, "wav", messages=msgs, codes=2, max_tokens=1)
        details = resp.usage.prompt_tokens_details
        assert (
            decode(base64.b64decode(resp.choices[0].message.audio.data), "wav").size > 0
        )
        if "audio" in name:
            assert details.audio_tokens == 25, details  # 1 s at one token per 40 ms
        else:
            kind = name.split("_")[0]
            assert details.model_extra["multimodal_tokens"][kind] > 0, details
            assert details.audio_tokens == 0
        # the same content through vLLM's own handler (text out) renders to the same prompt
        text = client.chat.completions.create(
            model=server["model"],
            max_tokens=1,
            messages=[{"role": "system", "content": SPEECH_SYSTEM_PROMPT}, *msgs],
        )
        assert text.usage.prompt_tokens == resp.usage.prompt_tokens


def test_video_with_its_audio(client, server):
    """`video_url` + `mm_processor_kwargs.use_audio_in_video`: vLLM reads the clip's own sound track
    (PyAV) and Qwen2.5-Omni's processor interleaves it with the frames in 2-second chunks (video chunk,
    then its audio), inside one <|vision_bos|><|audio_bos|> ... <|audio_eos|><|vision_eos|> block."""
    from omni_vllm.testing.tiny import TOKEN_ID

    seconds = 4.0  # 8 frames at 2 fps: two 2-second chunks
    url = mp4_data_url(media.video(frames=8), fps=2, audio=media.tone(seconds))
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url}},
                {"type": "text", "text": "What do you see and hear?"},
            ],
        }
    ]
    mm = {"mm_processor_kwargs": {"use_audio_in_video": True}}
    resp = speak(
        client, server, "wav", messages=msgs, codes=2, max_tokens=1, extra_body=mm
    )
    assert decode(base64.b64decode(resp.choices[0].message.audio.data), "wav").size > 0
    details = resp.usage.prompt_tokens_details
    assert 100 <= details.audio_tokens <= 104, (
        details
    )  # 25 a second (+ the AAC track's padding)
    video_tokens = details.model_extra["multimodal_tokens"]["video"]
    assert video_tokens > 0, details
    # the same request through vLLM's text handler: same prompt, its ids show the interleaving
    text = client.chat.completions.create(
        model=server["model"],
        max_tokens=1,
        messages=[{"role": "system", "content": SPEECH_SYSTEM_PROMPT}, *msgs],
        extra_body={**mm, "return_token_ids": True},
    )
    ids = text.prompt_token_ids
    assert text.usage.prompt_tokens == resp.usage.prompt_tokens == len(ids)
    kinds = {
        TOKEN_ID["<|VIDEO|>"]: "V",
        TOKEN_ID["<|AUDIO|>"]: "A",
        TOKEN_ID["<|vision_bos|>"]: "<v",
        TOKEN_ID["<|vision_eos|>"]: "v>",
        TOKEN_ID["<|audio_bos|>"]: "<a",
        TOKEN_ID["<|audio_eos|>"]: "a>",
    }
    runs = []
    for t in ids:
        if (k := kinds.get(t)) is not None and not (runs and runs[-1] == k in "VA"):
            runs.append(k)
    assert runs == ["<v", "<a", "V", "A", "V", "A", "a>", "v>"], runs
    assert ids.count(TOKEN_ID["<|AUDIO|>"]) == details.audio_tokens
    assert ids.count(TOKEN_ID["<|VIDEO|>"]) == video_tokens
    # without use_audio_in_video the track is not read: fewer prompt tokens, no audio ones
    plain = speak(client, server, "pcm16", messages=msgs, codes=1, max_tokens=1)
    assert plain.usage.prompt_tokens_details.audio_tokens == 0
    assert plain.usage.prompt_tokens < resp.usage.prompt_tokens - 100


def test_multi_turn_audio_id(client, server):
    import openai

    first = speak(client, server, "pcm16", max_tokens=4)
    audio = first.choices[0].message.audio
    turn2 = [
        *USER,
        {"role": "assistant", "audio": {"id": audio.id}},
        {"role": "user", "content": "And then?"},
    ]
    as_text = [
        *USER,
        {"role": "assistant", "content": audio.transcript},
        {"role": "user", "content": "And then?"},
    ]
    again = speak(client, server, "pcm16", messages=turn2, codes=2, max_tokens=1)
    ref = speak(client, server, "pcm16", messages=as_text, codes=2, max_tokens=1)
    assert (
        again.usage.prompt_tokens == ref.usage.prompt_tokens
    )  # the id became the transcript
    text = client.chat.completions.create(
        model=server["model"], messages=turn2, max_tokens=1
    )  # text path too
    assert text.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=server["model"],
            max_tokens=1,
            messages=[
                *USER,
                {"role": "assistant", "audio": {"id": "audio_unknown"}},
                {"role": "user", "content": "?"},
            ],
        )
    api_error(ei, 400, "messages[1].audio.id", "unknown or expired")
    time.sleep(max(0.0, audio.expires_at - time.time()) + 1.1)
    with pytest.raises(openai.BadRequestError) as ei:
        speak(client, server, "pcm16", messages=turn2, codes=2, max_tokens=1)
    api_error(ei, 400, "messages[1].audio.id", "expired")


@pytest.mark.parametrize(
    "case",
    [
        "voice",
        "format",
        "stream_wav",
        "modalities",
        "n",
        "b64",
        "undecodable",
        "too_long",
        "too_big",
        "model",
        "max_audio_tokens",
        "no_messages",
    ],
)
def test_chat_errors(client, server, case):
    import openai

    audio = lambda data: [
        {
            "role": "user",
            "content": [  # noqa: E731
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
            ],
        }
    ]
    big_image = media.image(
        width=700, height=700
    )  # ~1.4 MiB of noisy PNG > --max-media-mb 0.5
    kw, status, param, words = {
        "voice": (
            dict(audio={"voice": "Nobody", "format": "wav"}),
            400,
            "audio.voice",
            "unknown voice",
        ),
        "format": (
            dict(audio={"voice": "Ethan", "format": "ogg"}),
            400,
            "audio.format",
            "unknown audio format",
        ),
        "stream_wav": (
            dict(audio={"voice": "Ethan", "format": "wav"}, stream=True),
            400,
            "audio.format",
            "pcm16",
        ),
        "modalities": (dict(modalities=["video"]), 400, "modalities", "modalities"),
        "n": (dict(n=2), 400, "n", "n=1"),
        "b64": (
            dict(messages=audio("not base64 !!")),
            400,
            "messages[0].content[0]",
            "base64",
        ),
        "undecodable": (
            dict(messages=audio(base64.b64encode(b"not audio at all" * 64).decode())),
            422,
            "messages[0].content[0]",
            "could not be decoded",
        ),
        "too_long": (
            dict(
                messages=audio(wav_b64(media.tone(MAX_AUDIO_S + 1.0, sr=8000), sr=8000))
            ),
            413,
            "messages[0].content[0]",
            "limit",
        ),
        "too_big": (
            dict(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": png_data_url(big_image)},
                            }
                        ],
                    }
                ]
            ),
            413,
            "messages[0].content[0]",
            "larger than",
        ),
        "model": (dict(model="nope"), 404, "model", "does not exist"),
        "max_audio_tokens": (
            dict(extra_body={"max_audio_tokens": 0}),
            400,
            "max_audio_tokens",
            "positive",
        ),
        "no_messages": (
            dict(messages=[]),
            400,
            "messages",
            "at least one message",
        ),  # as OpenAI answers
    }[case]
    args = dict(
        model=server["model"],
        messages=USER,
        max_tokens=2,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
    )
    args.update(kw)
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(**args)
    api_error(ei, status, param, words)


def test_media_urls_stay_outside(client, server, tmp_path):
    """A media URL on the server's own host is a 400 and is never connected to, on our audio route and on
    vLLM's text route; so is a file:// URL (vLLM answers those with a 500)."""
    import openai
    from test_media_fetch import listening

    (tmp_path / "a.wav").write_bytes(
        base64.b64decode(wav_b64(np.zeros(1600, np.float32)))
    )
    with listening() as local:
        for url, words in (
            (local.url(), "public addresses only"),
            (local.url(name="localhost"), "public"),
            (f"{server['root']}/metrics", "public"),
            (f"file://{tmp_path}/a.wav", "file://"),
        ):
            msgs = [
                {
                    "role": "user",
                    "content": [{"type": "audio_url", "audio_url": {"url": url}}],
                }
            ]
            for audio in (True, False):
                with pytest.raises(openai.BadRequestError) as ei:
                    if audio:
                        speak(client, server, "wav", messages=msgs)
                    else:
                        client.chat.completions.create(
                            model=server["model"], messages=msgs, max_tokens=1
                        )
                assert words in ei.value.response.json()["error"]["message"], (
                    ei.value.body
                )
        assert local.connections == 0


def test_disconnect_aborts(client, server):
    """A client that goes away mid-stream: the request is aborted (engine and speech slots freed)."""
    stream = client.chat.completions.create(
        model=server["model"],
        messages=USER,
        max_tokens=1500,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"},
        stream=True,
        extra_body={"max_audio_tokens": 48, "ignore_eos": True},
    )
    it = iter(stream)
    for _ in range(3):
        next(it)
    deadline = time.monotonic() + 10  # /metrics is another request: poll it, bounded
    while (
        metric(server["root"], "omni_vllm:speaking_requests") != 1
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert metric(server["root"], "omni_vllm:speaking_requests") == 1
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (
            metric(server["root"], "omni_vllm:speaking_requests") == 0
            and metric(server["root"], "vllm:num_requests_running") == 0
            and metric(server["root"], "omni_vllm:speech_talker_slots_used") == 0
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail("request not aborted after the client went away")
    assert "client went away" in server["log"].read_text(errors="replace")


# --------------------------------------------------------------------------- /v1/audio/speech


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_formats(client, server, fmt):
    with client.audio.speech.with_streaming_response.create(
        model=server["model"],
        input="Hello there.",
        voice="Chelsie",
        response_format=fmt,
        extra_body={"max_audio_tokens": CODES},
    ) as resp:
        data = resp.read()
        ctype = resp.headers["content-type"]
    assert (
        ctype
        == {
            "mp3": "audio/mpeg",
            "opus": "audio/ogg",
            "aac": "audio/aac",
            "flac": "audio/flac",
            "wav": "audio/wav",
            "pcm": "audio/pcm",
        }[fmt]
    )
    audio = decode(data, fmt)
    # unseeded talker sampling may draw a stop code early: whole codes, at most CODES
    if fmt == "aac":
        assert SAMPLES_PER_CODE <= len(audio) <= CODES * SAMPLES_PER_CODE + 2048
    else:
        assert (
            0 < len(audio) <= CODES * SAMPLES_PER_CODE
            and len(audio) % SAMPLES_PER_CODE == 0
        )


def test_speech_sse_speed_instructions(client, server):
    args = dict(
        model=server["model"],
        input="Hi.",
        voice="ethan",
        response_format="pcm",
        seed=3,
        max_audio_tokens=24,
    )
    plain = httpx.post(server["base_url"] + "/audio/speech", json=args, timeout=120)
    assert plain.status_code == 200 and len(plain.content) == 2 * 24 * SAMPLES_PER_CODE
    sse = httpx.post(
        server["base_url"] + "/audio/speech",
        json={**args, "stream_format": "sse", "instructions": "Speak cheerfully."},
        timeout=120,
    )
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[6:])
        for line in sse.text.splitlines()
        if line.startswith("data: ")
    ]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (
        len(events) - 1
    )
    assert events[-1]["type"] == "speech.audio.done"
    assert (
        events[-1]["usage"]["output_tokens"] == 24
        and events[-1]["usage"]["input_tokens"] > 0
    )
    assert (
        b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == plain.content
    )  # seeded: same audio
    fast = httpx.post(
        server["base_url"] + "/audio/speech", json={**args, "speed": 2.0}, timeout=120
    )
    assert abs(len(fast.content) // 2 - 12 * SAMPLES_PER_CODE) <= 1  # half the samples


@pytest.mark.parametrize(
    "kw, status, param",
    [
        (dict(voice="nobody"), 400, "voice"),
        (dict(response_format="ogg"), 400, "response_format"),
        (dict(speed=5.0), 400, "speed"),
        (dict(input=""), 400, "input"),
        (dict(input="x" * 4097), 400, "input"),
        (dict(model="nope"), 404, "model"),
    ],
)
def test_speech_errors(client, server, kw, status, param):
    import openai

    args = dict(
        model=server["model"], input="Hello", voice="Ethan", response_format="wav"
    )
    args.update(kw)
    with pytest.raises(openai.APIStatusError) as ei:
        client.audio.speech.create(**args)
    api_error(ei, status, param)


# --------------------------------------------------------------------------- examples


def test_examples(server, tmp_path):
    """Every example script, against this server, with short outputs."""
    common = [
        "--base-url",
        server["base_url"],
        "--max-tokens",
        "2",
        "--max-audio-tokens",
        "12",
    ]
    runs = {
        "chat_speak.py": ["--out", str(tmp_path / "chat.wav")],
        "stream_to_file.py": ["--out", str(tmp_path / "stream.wav")],
        "audio_question.py": ["--out", str(tmp_path / "answer.wav")],
        "image_question.py": ["--out", str(tmp_path / "image.wav")],
        "video_question.py": ["--out", str(tmp_path / "video.wav")],
        "tts.py": ["--out", str(tmp_path / "tts.mp3"), "--text", "Hello there."],
    }
    procs = {
        script: subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / script), *common, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, args in runs.items()
    }
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (script, out, err)
        audio, sr = sf.read(runs[script][1])
        assert sr == SR and len(audio) > 0, script


# --------------------------------------------------------------------------- a text-only checkpoint


@pytest.mark.slow
def test_text_only_checkpoint(tmp_path):
    """A checkpoint without talker/token2wav: text as usual, audio a clear 400."""
    import openai
    from openai import OpenAI

    from omni_vllm.testing.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "text-only", seed=0, speech=False)
    with running_server(ckpt, tmp_path / "server.log") as s:
        client = OpenAI(
            base_url=s["base_url"], api_key="unused", timeout=120, max_retries=0
        )
        assert (
            client.chat.completions.create(
                model=s["model"], messages=USER, max_tokens=2
            )
            .choices[0]
            .message.content
        )
        with pytest.raises(openai.BadRequestError) as ei:
            speak(client, s, "wav")
        api_error(ei, 400, "modalities", "cannot produce audio")
        with pytest.raises(openai.BadRequestError) as ei:
            client.audio.speech.create(model=s["model"], input="Hi", voice="Ethan")
        api_error(ei, 400, "modalities", "cannot produce audio")
