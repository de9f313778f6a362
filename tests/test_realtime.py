"""OpenAI's Realtime API on /v1/realtime (issue 13).

Fast tests first: the event schema (the SDK's own types), Silero VAD on an espeak-ng phrase, the
conversation memory, which handler answers /v1/realtime, and the session state machine and its
limits on a fake serving core (no model). Then the real thing: the `openai` SDK's realtime client
against one real server on the tiny checkpoint (random weights: outputs are capped).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from argparse import Namespace
from dataclasses import dataclass

import numpy as np
import pydantic
import pytest

from omni_vllm.api.realtime import protocol as P
from omni_vllm.api.realtime.session import (
    Conversation,
    Item,
    Part,
    SessionConfig,
    apply_session_update,
)
from omni_vllm.api.realtime.vad import ServerVad, VadSettings
from omni_vllm.testing import media

RATE = 24000


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


@pytest.fixture(scope="module")
def phrase() -> np.ndarray:
    audio = media.spoken_phrase("Hello, what can you hear?", sr=RATE)
    assert audio is not None, (
        "espeak-ng is needed (apt-get install espeak-ng; .ci/run installs it)"
    )
    return audio


# ------------------------------------------------------------------------------- protocol


def test_protocol_client_events():
    ev = P.parse_client_event(
        json.dumps(
            {"type": "input_audio_buffer.append", "audio": "AAA=", "event_id": "e1"}
        )
    )
    assert type(ev).__name__ == "InputAudioBufferAppendEvent" and ev.event_id == "e1"
    ev = P.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": None}},
                },
            }
        )
    )
    assert "turn_detection" in ev.session.audio.input.model_fields_set
    with pytest.raises(P.ClientError) as e:
        P.parse_client_event(json.dumps({"type": "bogus.event", "event_id": "e2"}))
    assert e.value.code == "invalid_event_type" and e.value.event_id == "e2"
    with pytest.raises(P.ClientError) as e:
        P.parse_client_event(
            json.dumps(
                {"type": "conversation.item.truncate", "event_id": "e3", "item_id": "x"}
            )
        )
    assert (
        e.value.code == "invalid_value"
        and e.value.event_id == "e3"
        and "audio_end_ms" in str(e.value)
    )
    with pytest.raises(P.ClientError) as e:
        P.parse_client_event("not json")
    assert e.value.code == "invalid_json"
    with pytest.raises(P.ClientError) as e:
        P.decode_audio("@@@", "audio", "e4")
    assert e.value.code == "invalid_audio" and e.value.event_id == "e4"
    err = P.error_event("boom", code="c", param="p", event_id="e5")
    assert err["type"] == "error" and err["error"] == {
        "message": "boom",
        "type": "invalid_request_error",
        "code": "c",
        "param": "p",
        "event_id": "e5",
    }
    with pytest.raises(
        pydantic.ValidationError
    ):  # server events are checked against the SDK's models
        P.server_event("response.output_audio.delta", delta="x")


def test_session_update_applies_fields():
    cfg = SessionConfig("be brief", "Chelsie")

    def voice(v, param):
        if str(v).lower() not in ("chelsie", "ethan"):
            raise ValueError(f"unknown voice {v!r}")
        return str(v).capitalize()

    ev = P.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "output_modalities": ["text"],
                    "max_output_tokens": 20,
                    "audio": {
                        "input": {
                            "turn_detection": {
                                "type": "server_vad",
                                "silence_duration_ms": 200,
                            }
                        },
                        "output": {"voice": "ethan"},
                    },
                },
            }
        )
    )
    new = apply_session_update(cfg, ev.session, voice, None, voice_locked=False)
    assert (
        new.output_modalities == ("text",)
        and new.max_output_tokens == 20
        and new.voice == "Ethan"
    )
    assert (
        new.turn_detection["silence_duration_ms"] == 200
        and new.turn_detection["threshold"] == 0.5
    )
    assert cfg.voice == "Chelsie" and cfg.output_modalities == (
        "audio",
    )  # the old config is untouched
    shown = P.server_event("session.updated", session=new.to_openai("m", "sess_1"))[
        "session"
    ]
    assert (
        shown["audio"]["output"]["voice"] == "Ethan"
        and shown["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    )
    for bad in (
        {"output_modalities": ["text", "audio"]},
        {"audio": {"input": {"format": {"type": "audio/pcmu"}}}},
        {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
    ):
        ev = P.parse_client_event(
            json.dumps(
                {"type": "session.update", "session": {"type": "realtime", **bad}}
            )
        )
        with pytest.raises(P.ClientError):
            apply_session_update(cfg, ev.session, voice, None, voice_locked=False)
    ev = P.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"output": {"voice": "ethan"}},
                },
            }
        )
    )
    with pytest.raises(P.ClientError, match="cannot change"):
        apply_session_update(cfg, ev.session, voice, None, voice_locked=True)


# ------------------------------------------------------------------------------- VAD


def test_vad_on_a_spoken_phrase(phrase):
    """One start and one stop around the phrase (1 s of silence before it), fed in 100 ms appends."""
    clip = pcm16(np.concatenate([silence(1.0), phrase, silence(1.5)]))
    vad = ServerVad(
        VadSettings(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    )
    t0, events = time.perf_counter(), []
    for i in range(0, len(clip), 4800):
        events += vad.feed(clip[i : i + 4800])
    cost = time.perf_counter() - t0
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"], events
    end = 1000 + len(phrase) / RATE * 1000
    assert 600 <= events[0].ms <= 1000  # the start, less the 300 ms prefix padding
    assert (
        end <= events[1].ms <= end + 1000
    )  # the end (espeak-ng trails ~0.25 s of silence) + 500 ms
    assert cost < len(clip) / 2 / RATE / 4, cost  # far faster than real time
    quiet = ServerVad(VadSettings())
    assert quiet.feed(pcm16(silence(2.0))) == [] and not quiet.speaking


# ------------------------------------------------------------------------------- memory


def test_conversation_memory_and_truncate():
    conv = Conversation()
    audio = pcm16(silence(2.0))
    conv.add(Item("u1", "user", [Part("input_audio", audio=audio)]))
    conv.add(
        Item(
            "a1",
            "assistant",
            [Part("output_audio", text="Hello there, friend.", audio_ms=2000)],
        )
    )
    conv.add(Item("u2", "user", [Part("input_text", text="And now?")]))
    conv.add(Item("s0", "system", [Part("input_text", text="Be kind.")]), "root")
    count = lambda text: len(text.split())  # noqa: E731
    msgs, dropped = conv.messages("Be brief.", None, 10_000, count)
    assert [m["role"] for m in msgs] == [
        "system",
        "system",
        "user",
        "assistant",
        "user",
    ] and not dropped
    wav = base64.b64decode(msgs[2]["content"][0]["input_audio"]["data"])
    assert (
        wav[:4] == b"RIFF" and msgs[2]["content"][0]["input_audio"]["format"] == "wav"
    )
    assert msgs[3] == {"role": "assistant", "content": "Hello there, friend."}
    # what the client played: half of the audio keeps about half of the transcript
    conv.truncate("a1", 0, 1000, None)
    assert (
        conv.find("a1", None).parts[0].text == "Hello there"[:10]
        and conv.find("a1", None).status == "incomplete"
    )
    with pytest.raises(P.ClientError):
        conv.truncate("a1", 0, 5000, None)
    with pytest.raises(P.ClientError):
        conv.truncate("u1", 0, 10, None)
    # over the budget: the oldest non-system items go first, the system message and the last stay
    msgs, dropped = conv.messages(
        "Be brief.", None, 35, count
    )  # 91 tokens, 59 of them u1's 2 s of audio
    assert [i.id for i in dropped] == ["u1"] and [i.id for i in conv.items] == [
        "s0",
        "a1",
        "u2",
    ]
    conv.delete("a1", None)
    with pytest.raises(P.ClientError) as e:
        conv.delete("a1", None)
    assert e.value.code == "item_not_found"


def test_our_route_answers_v1_realtime():
    """vLLM mounts its transcription-only /v1/realtime when a model reports the realtime task; ours
    replaces it (attach_router used to read `r.methods`, which WebSocket routes lack)."""
    from fastapi import FastAPI
    from fastapi.routing import APIWebSocketRoute
    from vllm.entrypoints.speech_to_text.realtime.api_router import (
        router as vllm_realtime,
    )

    from omni_vllm.api.app import OmniEndpoints
    from omni_vllm.api.realtime import router as ours

    app = FastAPI()
    app.include_router(vllm_realtime)
    app.state.args = Namespace()
    OmniEndpoints().attach_router(app)
    sockets = [
        r
        for r in app.router.routes
        if isinstance(r, APIWebSocketRoute) and r.path == "/v1/realtime"
    ]
    assert [r.endpoint for r in sockets] == [ours.realtime]


# ------------------------------------------------------------------------------- state machine (fake core)


@dataclass
class FakeChunk:
    text: str
    audio: np.ndarray | None
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_tokens: int = 0


@dataclass
class Started:
    request_id: str
    mm_counts: dict
    stream: object
    first: object


class FakeCore:
    """OmniServing's interface: a reply of `words` words, one per `delay` s, 40 ms of audio each."""

    def __init__(
        self, words: int = 5, delay: float = 0.0, refuse: Exception | None = None
    ):
        self.words, self.delay, self.requests, self.aborted, self.refuse = (
            words,
            delay,
            [],
            [],
            refuse,
        )

    def voice(self, name, param):
        name = name or "Chelsie"
        if str(name).lower() not in ("chelsie", "ethan"):
            raise ValueError(f"unknown voice {name!r}; this model has Chelsie, Ethan")
        return str(name).capitalize()

    def need_speech(self, param):
        pass

    def check_media(self, messages):
        pass

    def max_codes(self, value, param):
        return 48

    async def start(
        self,
        request,
        *,
        request_id,
        voice,
        max_codes,
        audio=True,
        respond_while_queued=False,
    ):
        self.requests.append((request, audio))
        if self.refuse is not None:
            raise self.refuse
        return Started(request_id, {}, None, None)

    async def chunks(self, started, t0):
        done = False
        try:
            for i in range(self.words):
                await asyncio.sleep(self.delay)
                yield FakeChunk(f"w{i} ", np.full(960, 0.1, np.float32))
            done = True
            yield FakeChunk("", None, True, "stop", 10, self.words, 2 * self.words)
        finally:
            if not done:
                self.aborted.append(started.request_id)

    def usage(self, final, mm_counts):
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        return UsageInfo(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens + final.audio_tokens,
            total_tokens=final.prompt_tokens
            + final.completion_tokens
            + final.audio_tokens,
        )


def fake_app(core, max_model_len: int = 2048, **limits):
    from fastapi import FastAPI

    from omni_vllm.api.realtime.router import router
    from omni_vllm.api.realtime.serving import RealtimeLimits, RealtimeServing

    app = FastAPI()
    app.include_router(router)
    app.state.omni_realtime = RealtimeServing(
        core,
        RealtimeLimits(**limits),
        model_name="tiny",
        instructions="Be brief.",
        default_voice="Chelsie",
        max_model_len=max_model_len,
        talker_max_len=2048,
        count_text=lambda t: len(t.split()),
    )
    return app


def until(ws, kind: str, seen: list | None = None) -> dict:
    while True:
        ev = ws.receive_json()
        if seen is not None:
            seen.append(ev)
        if ev["type"] == kind:
            return ev


def test_fake_core_turns_cancel_and_errors():
    from fastapi.testclient import TestClient

    core = FakeCore(words=5)
    with (
        TestClient(fake_app(core)) as client,
        client.websocket_connect("/v1/realtime?model=tiny") as ws,
    ):
        created = ws.receive_json()
        assert (
            created["type"] == "session.created"
            and created["session"]["instructions"] == "Be brief."
        )
        ws.send_json(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": None}},
                },
            }
        )
        assert (
            until(ws, "session.updated")["session"]["audio"]["input"]["turn_detection"]
            is None
        )
        ws.send_json({"type": "input_audio_buffer.commit", "event_id": "c0"})
        err = until(ws, "error")["error"]
        assert (
            err["code"] == "input_audio_buffer_commit_empty" and err["event_id"] == "c0"
        )
        ws.send_json(
            {
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(pcm16(silence(0.5))).decode(),
            }
        )
        ws.send_json({"type": "input_audio_buffer.commit"})
        user = until(ws, "input_audio_buffer.committed")["item_id"]
        assert until(ws, "conversation.item.done")["item"]["id"] == user
        ws.send_json({"type": "response.create"})
        seen = []
        done = until(ws, "response.done", seen)["response"]
        kinds = [e["type"] for e in seen]
        assert kinds[:4] == [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
        ], kinds
        assert (
            kinds.count("response.output_audio.delta") == 5
            and "response.output_audio_transcript.done" in kinds
        )
        assert done["status"] == "completed" and done["usage"]["output_tokens"] == 15
        request, audio = core.requests[-1]
        assert audio and request.messages[0] == {
            "role": "system",
            "content": "Be brief.",
        }
        assert request.messages[1]["content"][0]["type"] == "input_audio"
        # text only, per response; the memory holds the earlier reply as its transcript
        ws.send_json(
            {
                "type": "response.create",
                "response": {"output_modalities": ["text"], "instructions": "Hi."},
            }
        )
        seen = []
        until(ws, "response.done", seen)
        assert {"response.output_text.delta", "response.output_text.done"} <= {
            e["type"] for e in seen
        }
        assert not any(e["type"] == "response.output_audio.delta" for e in seen)
        request, audio = core.requests[-1]
        assert not audio and request.messages[-1] == {
            "role": "assistant",
            "content": "w0 w1 w2 w3 w4 ",
        }
        # bad events: each an error event with its event_id, the socket stays open
        for bad, code in (
            ({"type": "nope", "event_id": "b1"}, "invalid_event_type"),
            (
                {"type": "input_audio_buffer.append", "audio": "%%", "event_id": "b2"},
                "invalid_audio",
            ),
            (
                {
                    "type": "session.update",
                    "event_id": "b3",
                    "session": {
                        "type": "realtime",
                        "audio": {"output": {"voice": "nobody"}},
                    },
                },
                "invalid_value",
            ),
            (
                {"type": "conversation.item.delete", "item_id": "zz", "event_id": "b4"},
                "item_not_found",
            ),
            (
                {"type": "response.cancel", "event_id": "b5"},
                "response_cancel_not_active",
            ),
        ):
            ws.send_json(bad)
            err = until(ws, "error")["error"]
            assert (err["code"], err["event_id"]) == (code, bad["event_id"]), err
        ws.send_json({"type": "conversation.item.retrieve", "item_id": user})
        assert until(ws, "conversation.item.retrieved")["item"]["content"][0]["audio"]

    slow = FakeCore(words=50, delay=0.05)
    with (
        TestClient(fake_app(slow)) as client,
        client.websocket_connect("/v1/realtime") as ws,
    ):
        until(ws, "session.created")
        ws.send_json(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Talk."}],
                },
            }
        )
        ws.send_json({"type": "response.create"})
        seen = []
        until(ws, "response.output_audio.delta", seen)
        ws.send_json({"type": "response.create", "event_id": "r2"})
        err = until(ws, "error", seen)["error"]
        assert (err["code"], err["event_id"]) == (
            "conversation_already_has_active_response",
            "r2",
        )
        ws.send_json({"type": "response.cancel"})
        done = until(ws, "response.done", seen)["response"]
        assert (
            done["status"] == "cancelled"
            and done["status_details"]["reason"] == "client_cancelled"
        )
        sent = "".join(
            e["delta"]
            for e in seen
            if e["type"] == "response.output_audio_transcript.delta"
        )
        assert len(slow.aborted) == 1
        ws.send_json(
            {"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]}
        )
        item = until(ws, "conversation.item.retrieved")["item"]
        assert (
            item["status"] == "incomplete"
            and item["content"][0]["transcript"]
            == done["output"][0]["content"][0]["transcript"]
        )
        assert sent.startswith("w0") and done["output"][0]["content"][0][
            "transcript"
        ].startswith(sent)


def test_fake_core_limits(phrase):
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    app = fake_app(FakeCore(), max_sessions=1, max_input_audio_seconds=1.0)
    with TestClient(app) as client:
        with client.websocket_connect("/v1/realtime") as ws:
            until(ws, "session.created")
            with (
                client.websocket_connect("/v1/realtime") as other,
                pytest.raises(WebSocketDisconnect) as e,
            ):
                other.receive_json()
            assert e.value.code == 1013 and "realtime-max-sessions" in e.value.reason
            ws.send_json(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "audio": {"input": {"turn_detection": None}},
                    },
                }
            )
            until(ws, "session.updated")
            ws.send_json(
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(pcm16(silence(1.5))).decode(),
                    "event_id": "big",
                }
            )
            err = until(ws, "error")["error"]
            assert (err["code"], err["event_id"]) == ("input_audio_buffer_full", "big")
        with client.websocket_connect("/v1/realtime?model=other") as ws:
            assert until(ws, "error")["error"]["code"] == "model_not_found"
    app = fake_app(FakeCore(), idle_seconds=0.5)
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        until(ws, "session.created")
        with pytest.raises(WebSocketDisconnect) as e:
            until(ws, "never")
        assert e.value.code == 1008 and "idle" in e.value.reason
    app = fake_app(FakeCore(), max_session_seconds=0.5)
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        with pytest.raises(WebSocketDisconnect) as e:
            until(ws, "never")
        assert e.value.code == 1008 and "session length" in e.value.reason


def test_fake_core_vad_turn_and_barge_in(phrase):
    """A spoken turn ends by server VAD and starts a reply; speech during the reply cancels it."""
    from fastapi.testclient import TestClient

    core = FakeCore(words=200, delay=0.05)
    with (
        TestClient(fake_app(core)) as client,
        client.websocket_connect("/v1/realtime") as ws,
    ):
        until(ws, "session.created")
        clip = pcm16(np.concatenate([silence(0.5), phrase, silence(1.0)]))
        for i in range(0, len(clip), 9600):
            ws.send_json(
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(clip[i : i + 9600]).decode(),
                }
            )
        seen = []
        until(ws, "response.output_audio.delta", seen)
        kinds = [e["type"] for e in seen]
        assert (
            kinds.index("input_audio_buffer.speech_started")
            < kinds.index("input_audio_buffer.speech_stopped")
            < kinds.index("input_audio_buffer.committed")
            < kinds.index("response.created")
        )
        for i in range(0, len(clip), 9600):  # the user speaks again: barge-in
            ws.send_json(
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(clip[i : i + 9600]).decode(),
                }
            )
        done = until(ws, "response.done")["response"]
        assert (
            done["status"] == "cancelled"
            and done["status_details"]["reason"] == "turn_detected"
        )
        assert core.aborted == [done["id"]]


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


def test_fake_core_refusal_and_memory_bound():
    """A reply the core refuses is an error event and response.done "failed"; a conversation over
    the model length loses its oldest items, each with conversation.item.deleted."""
    from fastapi.testclient import TestClient
    from vllm.exceptions import VLLMValidationError

    core = FakeCore(
        refuse=VLLMValidationError("the prompt has 9000 tokens", parameter="messages")
    )
    with (
        TestClient(fake_app(core)) as client,
        client.websocket_connect("/v1/realtime") as ws,
    ):
        until(ws, "session.created")
        ws.send_json({"type": "response.create", "event_id": "r1"})
        err = until(ws, "error")["error"]
        assert "9000 tokens" in err["message"] and err["param"] == "messages"
        done = until(ws, "response.done")["response"]
        assert (
            done["status"] == "failed"
            and done["output"] == []
            and "9000" in done["status_details"]["error"]["message"]
        )

    core = FakeCore(words=2)
    # 256 tokens of model, 64 kept for the reply: 192 for the prompt; each 4 s of user audio is ~109
    with (
        TestClient(fake_app(core, max_model_len=256)) as client,
        client.websocket_connect("/v1/realtime") as ws,
    ):
        until(ws, "session.created")
        ws.send_json(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "max_output_tokens": 64,
                    "audio": {"input": {"turn_detection": None}},
                },
            }
        )
        until(ws, "session.updated")
        ids, deleted = [], []
        for turn in range(3):
            ws.send_json(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "audio": base64.b64encode(pcm16(silence(4.0))).decode(),
                            }
                        ],
                    },
                }
            )
            ids.append(until(ws, "conversation.item.done")["item"]["id"])
            ws.send_json({"type": "response.create"})
            seen = []
            until(ws, "response.done", seen)
            deleted.append(
                [e["item_id"] for e in seen if e["type"] == "conversation.item.deleted"]
            )
        # turn 2: its first user audio goes; turn 3: the first reply (older) and the second user audio
        assert (
            deleted[0] == []
            and deleted[1] == [ids[0]]
            and len(deleted[2]) == 2
            and deleted[2][1] == ids[1]
        )
        request, _ = core.requests[-1]
        audio_parts = [
            p for m in request.messages if m["role"] == "user" for p in m["content"]
        ]
        assert len(audio_parts) == 1  # only the last turn's audio fits


def test_api_key_guards_the_socket():
    """vLLM's --api-key middleware guards WebSocket routes under /v1 too: the SDK's Bearer header
    opens /v1/realtime, no key does not."""
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    app = fake_app(FakeCore())
    app.add_middleware(AuthenticationMiddleware, tokens=["sekret"])
    with TestClient(app) as client:
        with client.websocket_connect(
            "/v1/realtime", headers={"Authorization": "Bearer sekret"}
        ) as ws:
            assert until(ws, "session.created")["session"]["model"] == "tiny"
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect("/v1/realtime") as ws,
        ):
            ws.receive_json()
