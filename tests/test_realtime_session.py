"""OpenAI's Realtime API on /v1/realtime (issue 13), without a model: seconds.

The event schema (the SDK's own types), Silero VAD on an espeak-ng phrase, the conversation
memory, which handler answers /v1/realtime, and the session state machine on a fake serving core
for what the SDK tests against the real server (test_realtime.py) cannot show: exact events and
usage, what the core is asked, timers, injected refusals and the --api-key guard.
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
from realtime_helpers import RATE, pcm16, silence, spoken_phrase

from omni_vllm.api.realtime import protocol as P
from omni_vllm.api.realtime.session import (
    Conversation,
    Item,
    Part,
    SessionConfig,
    apply_session_update,
)
from omni_vllm.api.realtime.vad import ServerVad, VadSettings


@pytest.fixture(scope="module")
def phrase() -> np.ndarray:
    return spoken_phrase()


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
        {"tools": [{"type": "function", "name": "f"}]},
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "name": "f"}},
        {"prompt": {"id": "pmpt_1"}},
        {"truncation": {"type": "retention_ratio", "retention_ratio": 1.5}},
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


def test_session_fields_that_change_nothing_are_accepted_and_echoed():
    """What the OpenAI Agents SDK and LiveKit send with their defaults (tracing "auto",
    tools [], tool_choice "auto", transcription, noise reduction, speed, semantic_vad) is
    accepted and shown back in session.updated as sent, as OpenAI does (issue 22)."""
    cfg = SessionConfig("be brief", "Chelsie")
    ev = P.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "event_id": "e1",
                "session": {
                    "type": "realtime",
                    "model": "gpt-realtime",
                    "tracing": "auto",
                    "include": ["item.input_audio_transcription.logprobs"],
                    "prompt": None,
                    "truncation": {"type": "retention_ratio", "retention_ratio": 0.5},
                    "tools": [],
                    "tool_choice": "none",
                    "parallel_tool_calls": False,
                    "audio": {
                        "input": {
                            "transcription": {"model": "gpt-4o-mini-transcribe"},
                            "noise_reduction": {"type": "near_field"},
                            "turn_detection": {
                                "type": "semantic_vad",
                                "eagerness": "high",
                                "interrupt_response": True,
                            },
                        },
                        "output": {"voice": "marin", "speed": 1.0},
                    },
                },
            }
        )
    )
    new = apply_session_update(cfg, ev.session, lambda v, p: "Chelsie", "e1", False)
    shown = P.server_event("session.updated", session=new.to_openai("m", "sess_1"))
    session = shown["session"]
    assert session["tracing"] == "auto" and session["tools"] == []
    assert session["tool_choice"] == "none" and session["parallel_tool_calls"] is False
    assert session["include"] == ["item.input_audio_transcription.logprobs"]
    assert session["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.5}
    audio_in, audio_out = session["audio"]["input"], session["audio"]["output"]
    assert audio_in["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert audio_in["noise_reduction"] == {"type": "near_field"}
    assert audio_in["turn_detection"] == {
        "type": "semantic_vad",
        "eagerness": "high",
        "create_response": True,
        "interrupt_response": True,
    }
    assert audio_out == {
        "format": {"type": "audio/pcm", "rate": RATE},
        "voice": "Chelsie",
        "speed": 1.0,
    }
    # semantic_vad runs Silero with a silence that follows its eagerness
    assert new.vad_settings() == VadSettings(0.5, 300, 400)
    assert new.truncation_limits() == (0.5, None)
    # a later update keeps what the earlier one set; a change of VAD type starts from defaults
    ev = P.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "tracing": None,
                    "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
                },
            }
        )
    )
    newer = apply_session_update(new, ev.session, lambda v, p: "Chelsie", None, False)
    session = newer.to_openai("m", "sess_1")
    assert session["tracing"] is None and session["include"] == new.echo["include"]
    assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    assert "eagerness" not in session["audio"]["input"]["turn_detection"]
    # the defaults show as OpenAI shows them
    plain = SessionConfig("x", "Chelsie").to_openai("m", "s")
    assert (plain["tools"], plain["tool_choice"], plain["truncation"]) == (
        [],
        "auto",
        "auto",
    )


def test_truncation_disabled_and_retention_ratio():
    """truncation "disabled" drops nothing (the core then refuses a prompt too long);
    retention_ratio drops down to that share of the budget; token_limits caps it."""
    count = lambda text: len(text.split())  # noqa: E731

    def conv():
        c = Conversation()
        for i in range(6):
            c.add(
                Item(f"u{i}", "user", [Part("input_text", text="one two three four")])
            )
        return c

    # instructions: 2 + 6 overhead; each item 4 + 6 = 10 tokens: 68 in all
    _, dropped = conv().messages("Be brief.", None, 50, count)
    assert [i.id for i in dropped] == ["u0", "u1"]  # auto: down to 48 <= 50
    _, dropped = conv().messages("Be brief.", None, 50, count, keep=None)
    assert dropped == []
    _, dropped = conv().messages("Be brief.", None, 50, count, keep=0.5)
    assert len(dropped) == 4  # down to 8 + 0.5 * 42 = 29 tokens: 2 items stay
    _, dropped = conv().messages("Be brief.", None, 500, count, post_instructions=30)
    assert len(dropped) == 3


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
    """Manual turns, text-only memory, bad events, double response and client cancel.

    Fake because the SDK tests (manual turns, text only, bad events) cannot pin the exact
    event sequence, usage and messages the core is asked for, nor that a cancel aborts it.
    """
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
    """Session limit, full input buffer, unknown model, idle and session-length timers.

    Fake for the timers (a real server would need its own flags and a 25 s start-up); the
    session limit is also shown by test_sdk_two_sessions_at_once_and_the_limit.
    """
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


def test_fake_core_refusal_and_memory_bound():
    """A reply the core refuses is an error event and response.done "failed"; a conversation over
    the model length loses its oldest items, each with conversation.item.deleted.

    Fake for the injected refusal and a 256-token model length a real server does not have.
    """
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
    opens /v1/realtime, no key does not.

    Fake because the real server runs without --api-key; a second one would cost ~25 s.
    """
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


def test_fake_core_echoes_metadata_and_event_ids():
    """response.create's `metadata` comes back in response.created and response.done (LiveKit's
    generate_reply() waits for its client_event_id there); a refused response.create names its
    event_id in the error; tools and a tool-forcing tool_choice are refused, "auto" is not."""
    from fastapi.testclient import TestClient

    core = FakeCore(words=2)
    with (
        TestClient(fake_app(core)) as client,
        client.websocket_connect("/v1/realtime") as ws,
    ):
        until(ws, "session.created")
        ws.send_json(
            {
                "type": "session.update",
                "event_id": "su1",
                "session": {"type": "realtime", "tools": [], "tool_choice": "auto"},
            }
        )
        assert until(ws, "session.updated")["session"]["tool_choice"] == "auto"
        meta = {"client_event_id": "response_create_abc"}
        ws.send_json(
            {
                "type": "response.create",
                "event_id": "response_create_abc",
                "response": {"metadata": meta, "tool_choice": "auto", "tools": []},
            }
        )
        assert until(ws, "response.created")["response"]["metadata"] == meta
        done = until(ws, "response.done")["response"]
        assert done["metadata"] == meta and done["status"] == "completed"
        ws.send_json({"type": "response.create"})
        assert until(ws, "response.created")["response"]["metadata"] is None
        until(ws, "response.done")
        for bad, param in (
            ({"tools": [{"type": "function", "name": "f"}]}, "response.tools"),
            ({"tool_choice": "required"}, "response.tool_choice"),
        ):
            ws.send_json({"type": "response.create", "event_id": "r9", "response": bad})
            err = until(ws, "error")["error"]
            assert err["event_id"] == "r9" and err["param"] == param, err
            assert err["code"] == "unsupported_value"

    refused = FakeCore(refuse=ValueError("no room"))
    with (
        TestClient(fake_app(refused)) as client,
        client.websocket_connect("/v1/realtime") as ws,
    ):
        until(ws, "session.created")
        ws.send_json(
            {
                "type": "response.create",
                "event_id": "r2",
                "response": {"metadata": {"k": "v"}},
            }
        )
        assert until(ws, "error")["error"]["event_id"] == "r2"
        done = until(ws, "response.done")["response"]
        assert done["status"] == "failed" and done["metadata"] == {"k": "v"}
