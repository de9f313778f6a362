"""OpenAI's Realtime API on /v1/realtime (issue 13): the `openai` SDK's realtime client against
one real server on the tiny checkpoint (random weights: outputs are capped).

The fast tests (protocol, VAD, memory, the session state machine on a fake core) are in
test_realtime_session.py; they need no server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
from realtime_helpers import RATE, pcm16, silence, spoken_phrase


@pytest.fixture(scope="module")
def phrase() -> np.ndarray:
    return spoken_phrase()


# ------------------------------------------------------------------------------- the real server, the SDK's client

MAX_SESSIONS, MAX_INPUT_S = 2, 10
SERVER_ARGS = [
    "--max-audio-tokens",
    "48",
    "--speech-stream-config",
    '{"first_chunk": 12, "chunk": 24, '
    '"left_context": 12, "look_ahead": 12, "num_steps": 4}',
    "--realtime-max-sessions",
    str(MAX_SESSIONS),
    "--realtime-max-input-audio-seconds",
    str(MAX_INPUT_S),
]
NO_VAD = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    from api_server import assert_no_traceback, running_server

    log = tmp_path_factory.mktemp("realtime") / "server.log"
    with running_server(tiny_checkpoint_dir, log, *SERVER_ARGS) as s:
        yield s
        assert_no_traceback(log)


def connect(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server["base_url"], api_key="-").realtime.connect(
        model=server["model"]
    )


async def recv_until(conn, kind: str, seen: list | None = None, timeout: float = 180.0):
    while True:
        ev = await asyncio.wait_for(conn.recv(), timeout)
        if seen is not None:
            seen.append(ev)
        if ev.type == kind:
            return ev


async def append_audio(conn, clip: bytes, step: int = 4800) -> None:
    for i in range(0, len(clip), step):
        await conn.input_audio_buffer.append(
            audio=base64.b64encode(clip[i : i + step]).decode()
        )


def test_sdk_spoken_turn_ended_by_server_vad(server, phrase):
    async def main():
        async with connect(server) as conn:
            created = await recv_until(conn, "session.created")
            # our handler answers (vLLM's transcription-only one would show no voice and no VAD)
            assert (
                created.session.model == server["model"]
                and created.session.audio.output.voice == "Chelsie"
            )
            assert created.session.audio.input.turn_detection.type == "server_vad"
            await conn.session.update(
                session={
                    "type": "realtime",
                    "max_output_tokens": 8,
                    "audio": {"output": {"voice": "ethan"}},
                }
            )
            assert (
                await recv_until(conn, "session.updated")
            ).session.audio.output.voice == "Ethan"
            await append_audio(
                conn, pcm16(np.concatenate([silence(0.5), phrase, silence(1.0)]))
            )
            seen = []
            done = await recv_until(conn, "response.done", seen)
            return seen, done

    seen, done = asyncio.run(main())
    kinds = [e.type for e in seen]
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.output_item.done",
    ]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), (
        kinds
    )
    audio = b"".join(
        base64.b64decode(e.delta)
        for e in seen
        if e.type == "response.output_audio.delta"
    )
    assert len(audio) > 0 and len(audio) % 2 == 0
    transcript = "".join(
        e.delta for e in seen if e.type == "response.output_audio_transcript.delta"
    )
    assert (
        next(
            e for e in seen if e.type == "response.output_audio_transcript.done"
        ).transcript
        == transcript
    )
    r = done.response
    assert (
        r.status in ("completed", "incomplete")
        and r.output[0].content[0].transcript == transcript
    )
    assert (
        r.usage.input_token_details.audio_tokens >= 25
    )  # the thinker heard the phrase itself (> 1 s)
    assert (
        r.usage.output_token_details.audio_tokens > 0
        and r.usage.output_token_details.text_tokens <= 8
    )
    assert (
        r.usage.output_token_details.audio_tokens <= 48
    )  # the server's --max-audio-tokens caps it
    assert len(audio) // 2 <= 48 * 480  # 480 samples (20 ms at 24 kHz) per speech code


def test_sdk_manual_turns_and_memory(server, phrase):
    async def main():
        async with connect(server) as conn:
            await recv_until(conn, "session.created")
            await conn.session.update(session=NO_VAD)
            await recv_until(conn, "session.updated")
            await append_audio(conn, pcm16(phrase))
            await conn.input_audio_buffer.commit()
            committed = await recv_until(conn, "input_audio_buffer.committed")
            await conn.response.create(response={"max_output_tokens": 4})
            first = (await recv_until(conn, "response.done")).response
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "And then?"}],
                }
            )
            await conn.response.create(response={"max_output_tokens": 4})
            second = (await recv_until(conn, "response.done")).response
            return committed, first, second

    committed, first, second = asyncio.run(main())
    assert committed.item_id and first.status in ("completed", "incomplete")
    # the second prompt holds the first turn: the user's audio (still audio) and the reply's transcript
    assert (
        second.usage.input_token_details.audio_tokens
        == first.usage.input_token_details.audio_tokens
        > 0
    )
    assert second.usage.input_tokens > first.usage.input_tokens


def test_sdk_text_only(server):
    async def main():
        async with connect(server) as conn:
            await recv_until(conn, "session.created")
            await conn.session.update(session={**NO_VAD, "output_modalities": ["text"]})
            await recv_until(conn, "session.updated")
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hello!"}],
                }
            )
            await conn.response.create(response={"max_output_tokens": 6})
            seen = []
            done = await recv_until(conn, "response.done", seen)
            return seen, done.response

    seen, r = asyncio.run(main())
    kinds = {e.type for e in seen}
    assert {"response.output_text.delta", "response.output_text.done"} <= kinds
    assert not kinds & {
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
    }
    text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert (
        r.output_modalities == ["text"] and r.output[0].content[0].text == text and text
    )
    assert r.usage.output_token_details.audio_tokens == 0


def test_sdk_barge_in_cancels_the_reply(server, phrase):
    from api_server import metric

    async def main():
        async with connect(server) as conn:
            await recv_until(conn, "session.created")
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Tell me a very long story."}
                    ],
                }
            )
            await conn.response.create(response={"max_output_tokens": 1500})
            seen = []
            await recv_until(conn, "response.output_audio_transcript.delta", seen)
            await append_audio(
                conn, pcm16(np.concatenate([silence(0.3), phrase, silence(0.2)]))
            )
            started = await recv_until(conn, "input_audio_buffer.speech_started", seen)
            t0 = time.monotonic()
            done = await recv_until(conn, "response.done", seen)
            latency = time.monotonic() - t0
            await conn.conversation.item.retrieve(item_id=done.response.output[0].id)
            item = (await recv_until(conn, "conversation.item.retrieved")).item
            return seen, started, done.response, item, latency

    seen, started, r, item, latency = asyncio.run(main())
    print(f"barge-in: response.done {latency * 1000:.0f} ms after speech_started")
    assert r.status == "cancelled" and r.status_details.reason == "turn_detected"
    sent = "".join(
        e.delta for e in seen if e.type == "response.output_audio_transcript.delta"
    )
    assert (
        item.status == "incomplete"
        and item.content[0].transcript == sent == r.output[0].content[0].transcript
    )
    assert len(sent.split()) < 1500
    deadline = (
        time.monotonic() + 30
    )  # the thinker request and the talker slot are freed
    while (
        metric(server["root"], "omni_vllm:speaking_requests")
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert metric(server["root"], "omni_vllm:speaking_requests") == 0


def test_sdk_two_sessions_at_once_and_the_limit(server):
    from websockets.exceptions import ConnectionClosed

    async def turn(conn, text: str):
        await recv_until(conn, "session.created")
        await conn.session.update(session=NO_VAD)
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }
        )
        await conn.response.create(response={"max_output_tokens": 4})
        seen = []
        done = await recv_until(conn, "response.done", seen)
        return done.response, sum(e.type == "response.output_audio.delta" for e in seen)

    async def main():
        async with connect(server) as a, connect(server) as b:
            results = await asyncio.gather(
                turn(a, "Hi, I am A."), turn(b, "Hi, I am B.")
            )
            async with connect(server) as c:  # one more than --realtime-max-sessions
                with pytest.raises(ConnectionClosed) as e:
                    await recv_until(c, "session.created", timeout=30)
            return results, e.value

    results, closed = asyncio.run(main())
    for r, deltas in results:
        assert r.status in ("completed", "incomplete") and deltas > 0
    assert results[0][0].id != results[1][0].id
    assert closed.rcvd.code == 1013 and "realtime-max-sessions" in closed.rcvd.reason


def test_sdk_bad_events_keep_the_socket(server):
    async def main():
        async with connect(server) as conn:
            await recv_until(conn, "session.created")
            await conn.session.update(session=NO_VAD)
            await recv_until(conn, "session.updated")
            errors = {}
            for event_id, raw in (
                ("unknown", {"type": "response.fly"}),
                (
                    "base64",
                    {"type": "input_audio_buffer.append", "audio": "not base64!"},
                ),
                (
                    "voice",
                    {
                        "type": "session.update",
                        "session": {
                            "type": "realtime",
                            "audio": {"output": {"voice": "nobody"}},
                        },
                    },
                ),
                ("payload", {"type": "conversation.item.truncate", "item_id": "x"}),
                (
                    "buffer",
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(
                            pcm16(silence(MAX_INPUT_S + 1))
                        ).decode(),
                    },
                ),
            ):
                await conn.send_raw(json.dumps({**raw, "event_id": event_id}))
                errors[event_id] = (await recv_until(conn, "error", timeout=60)).error
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hi."}],
                }
            )
            await conn.response.create(response={"max_output_tokens": 30})
            await recv_until(conn, "response.created")
            await conn.send_raw(
                json.dumps({"type": "response.create", "event_id": "busy"})
            )
            seen = []
            errors["busy"] = (await recv_until(conn, "error", seen)).error
            await conn.response.cancel()
            await recv_until(conn, "response.done")
            await conn.session.update(
                session={"type": "realtime", "instructions": "Still here."}
            )
            still = await recv_until(conn, "session.updated")
            return errors, still

    errors, still = asyncio.run(main())
    codes = {k: (e.code, e.event_id) for k, e in errors.items()}
    assert codes == {
        "unknown": ("invalid_event_type", "unknown"),
        "base64": ("invalid_audio", "base64"),
        "voice": ("invalid_value", "voice"),
        "payload": ("invalid_value", "payload"),
        "buffer": ("input_audio_buffer_full", "buffer"),
        "busy": ("conversation_already_has_active_response", "busy"),
    }, codes
    assert (
        "nobody" in errors["voice"].message
        and errors["voice"].param == "session.audio.output.voice"
    )
    assert still.session.instructions == "Still here."


def test_example_realtime_client(server, phrase, tmp_path):
    """examples/realtime_client.py: a spoken WAV (server VAD) and, without --audio, a tone (manual)."""
    import subprocess
    import sys

    import soundfile as sf
    from api_server import ROOT

    question = tmp_path / "question.wav"
    sf.write(question, np.concatenate([silence(0.3), phrase]), RATE, subtype="PCM_16")
    for extra, out in (
        (["--audio", str(question)], tmp_path / "vad.wav"),
        ([], tmp_path / "manual.wav"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "realtime_client.py"),
                "--base-url",
                server["base_url"],
                "--max-tokens",
                "4",
                "--out",
                str(out),
                *extra,
            ],
            cwd=ROOT / "examples",
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        audio, sr = sf.read(out)
        assert sr == RATE and len(audio) > 0 and "speech tokens" in proc.stdout, (
            proc.stdout
        )
        assert ("[server VAD] speech ended" in proc.stdout) == bool(extra), proc.stdout


def test_readme_realtime_snippet(server, phrase):
    """The README's Realtime snippet, run as written against this server."""
    from api_server import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("# Speech to speech: OpenAI's Realtime API")
    code = readme[start : readme.index("```", start)]
    code = code.replace("http://127.0.0.1:8000/v1", server["base_url"])
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    reply = asyncio.run(namespace["talk"](pcm16(phrase)))
    assert len(reply) > 0 and len(reply) % 2 == 0


# ------------------------------------------------------------------------------- agent frameworks
# /v1/realtime driven by two agent frameworks nobody here wrote, with their defaults (issue 22):
# - the OpenAI Agents SDK (`openai-agents`): a `RealtimeAgent` run by `RealtimeRunner`, its model
#   pointed at our socket through the `url` model option; its session.update carries
#   `tracing: "auto"`, `tools: []`, voice "ash", input transcription and `semantic_vad`;
# - LiveKit Agents' OpenAI plugin (`livekit-plugins-openai`): `RealtimeModel(base_url=...)` used
#   standalone (`model.session()`); its session.update carries `tool_choice: "auto"`, voice
#   "marin", `semantic_vad`; `generate_reply()` waits for its response.create's
#   `metadata.client_event_id` in `response.created`.
# Each does a typed turn and a spoken turn (the espeak-ng phrase, ended by the server's VAD), gets
# audio back and sees no `error` event. Beyond the connection (URL, key, our model name) the only
# setting given is a cap on output tokens: random weights never stop by themselves.

AGENT_MAX_TOKENS = 8
AGENT_TIMEOUT = 240.0


def spoken_turn(phrase: np.ndarray) -> bytes:
    """The phrase between silences long enough for any VAD eagerness to end the turn."""
    return pcm16(np.concatenate([silence(0.5), phrase, silence(2.0)]))


# ------------------------------------------------------------------------------- OpenAI Agents SDK


async def _agents_turn(session, send) -> tuple[bytes, list]:
    """Run one turn (`send` starts it); the agent's audio and every event until its turn ends."""
    await send()
    audio, events = b"", []
    iterator = session.__aiter__()
    while True:
        event = await asyncio.wait_for(iterator.__anext__(), AGENT_TIMEOUT)
        events.append(event)
        if event.type == "audio":
            audio += event.audio.data
        if event.type == "agent_end":
            return audio, events


def test_openai_agents_sdk_realtime_runner(server, phrase):
    from agents.realtime import RealtimeAgent, RealtimeRunner

    url = server["base_url"].replace("http://", "ws://") + "/realtime"

    async def main():
        agent = RealtimeAgent(name="Assistant", instructions="Answer in a few words.")
        runner = RealtimeRunner(
            agent, config={"model_settings": {"max_output_tokens": AGENT_MAX_TOKENS}}
        )
        session = await runner.run(model_config={"url": url, "api_key": "-"})
        async with session:
            typed = await _agents_turn(
                session, lambda: session.send_message("Hello, who are you?")
            )
            clip = spoken_turn(phrase)

            async def speak():
                for i in range(0, len(clip), 4800):
                    await session.send_audio(clip[i : i + 4800])

            spoken = await _agents_turn(session, speak)
        return typed, spoken

    typed, spoken = asyncio.run(main())
    for audio, events in (typed, spoken):
        raw = [e.data for e in events if e.type == "raw_model_event"]
        errors = [e for e in events if e.type == "error"]
        errors += [r for r in raw if r.type == "error"]
        errors += [
            r
            for r in raw
            if r.type == "raw_server_event" and r.data.get("type") == "error"
        ]
        assert not errors, errors
        assert len(audio) > 0 and len(audio) % 2 == 0
    server_events = [
        e.data.data
        for e in typed[1] + spoken[1]
        if e.type == "raw_model_event" and e.data.type == "raw_server_event"
    ]
    kinds = [ev.get("type") for ev in server_events]
    # the SDK's session.update was taken whole: its voice "ash" is Ethan, its tracing shown back
    updated = [ev["session"] for ev in server_events if ev["type"] == "session.updated"]
    assert updated and updated[-1]["audio"]["output"]["voice"] == "Ethan"
    assert updated[-1]["tracing"] == "auto"
    assert updated[-1]["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    # the spoken turn was heard and ended by the server's VAD (semantic_vad: the SDK's default)
    assert "input_audio_buffer.speech_stopped" in kinds, kinds


# ------------------------------------------------------------------------------- LiveKit Agents


def test_livekit_realtime_model_standalone(server, phrase):
    from livekit import rtc
    from livekit.agents import llm
    from livekit.plugins.openai.realtime import RealtimeModel

    async def collect(gen) -> tuple[list, str]:
        frames, text = [], ""

        async def read_message(msg):
            nonlocal text

            async def read_text():
                nonlocal text
                async for piece in msg.text_stream:
                    text += piece

            async def read_audio():
                async for frame in msg.audio_stream:
                    frames.append(frame)

            await asyncio.gather(read_text(), read_audio())

        async def read_all():
            async for msg in gen.message_stream:
                await read_message(msg)

        await asyncio.wait_for(read_all(), AGENT_TIMEOUT)
        return frames, text

    async def main():
        model = RealtimeModel(
            base_url=server["base_url"], api_key="-", model=server["model"]
        )
        session = model.session()
        errors, generations = [], asyncio.Queue()
        session.on("error", errors.append)
        session.on("generation_created", generations.put_nowait)
        session.update_options(max_response_output_tokens=AGENT_MAX_TOKENS)
        try:
            # typed: a user message, then generate_reply(), which must return (not time out)
            ctx = llm.ChatContext.empty()
            ctx.add_message(role="user", content="Hello, who are you?")
            await session.update_chat_ctx(ctx)
            gen = await asyncio.wait_for(session.generate_reply(), AGENT_TIMEOUT)
            assert gen.user_initiated and (await generations.get()) is gen
            typed = await collect(gen)
            # spoken: 24 kHz frames of 100 ms; the server's VAD ends the turn and replies
            clip = np.frombuffer(spoken_turn(phrase), "<i2")
            for i in range(0, len(clip), RATE // 10):
                chunk = clip[i : i + RATE // 10]
                session.push_audio(rtc.AudioFrame(chunk.tobytes(), RATE, 1, len(chunk)))
                await asyncio.sleep(0)
            spoken_gen = await asyncio.wait_for(generations.get(), AGENT_TIMEOUT)
            assert not spoken_gen.user_initiated
            spoken = await collect(spoken_gen)
        finally:
            await session.aclose()
            await model.aclose()
        return typed, spoken, errors

    typed, spoken, errors = asyncio.run(main())
    assert not errors, errors
    for frames, _text in (typed, spoken):
        assert frames and sum(f.samples_per_channel for f in frames) > 0
        assert {f.sample_rate for f in frames} == {RATE}
