"""Our routes in-process over a fake SpeechEngine and a fake vLLM chat server: the error
vocabulary at the edge (api/errors.py), a failure mid-stream (chat SSE and /v1/audio/speech SSE end
with vLLM's error event, then [DONE], and the request is aborted), the router wiring (WebSocket
routes too) and the vLLM version guard (api/compat.py). No model, no engine: seconds."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from fastapi.routing import APIWebSocketRoute
from fastapi.testclient import TestClient

from omni_vllm.api import compat
from omni_vllm.api.app import OmniEndpoints
from omni_vllm.api.audio_ids import AudioIds
from omni_vllm.api.chat.serving import OmniServingChat
from omni_vllm.api.errors import (
    RequestTooLargeError,
    ServiceBusyError,
    VLLMUnprocessableEntityError,
    VLLMValidationError,
    error_body,
    error_response,
    sse_error,
)
from omni_vllm.api.serving import OmniServing
from omni_vllm.api.settings import Settings
from omni_vllm.api.speech.serving import OmniServingSpeech
from omni_vllm.errors import SpeechBusy
from omni_vllm.speech import SpeechChunk


class _Nop:
    def __getattr__(self, name):
        return lambda *a, **k: None


class FakeSpeech:
    """Speaks one chunk, then fails with `fail` (or finishes when None)."""

    voices = ["Chelsie", "Ethan"]
    talker_max_len = 4096
    has_speech = True

    def __init__(self, fail: BaseException | None):
        self.fail, self.aborted, self.calls = fail, [], []

    async def generate(
        self,
        prompt,
        params,
        request_id,
        *,
        audio=True,
        voice=None,
        max_codes=None,
        **kw,
    ):
        self.calls.append(dict(audio=audio, voice=voice, max_codes=max_codes))
        yield SpeechChunk("Hello", [1], np.full(480, 0.1, np.float32))
        if self.fail is not None:
            raise self.fail
        yield SpeechChunk(
            " there",
            [2],
            np.full(480, 0.1, np.float32),
            finished=True,
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=2,
            audio_tokens=4,
        )

    async def abort(self, request_id):
        self.aborted.append(request_id)


class FakeChat:
    """What OmniServing uses of vLLM's OpenAIServingChat."""

    model_config = SimpleNamespace(max_model_len=2048)
    default_sampling_params: dict = {}
    override_max_tokens = None
    enable_force_include_usage = False
    models = SimpleNamespace(model_name=lambda lora=None: "fake-omni")
    renderer = SimpleNamespace(
        tokenizer=SimpleNamespace(encode=lambda text: text.split())
    )

    async def render_chat_request(self, request):
        return None, [{"prompt_token_ids": [1, 2, 3]}]

    def _extract_prompt_len(self, engine_input):
        return len(engine_input["prompt_token_ids"])

    @staticmethod
    def _base_request_id(raw_request, default=None):
        return raw_request.headers.get("X-Request-Id") or default or "fake"

    async def _check_model(self, request):
        return None


def _core(fail: BaseException | None) -> OmniServing:
    return OmniServing(
        settings=Settings(),
        speech=FakeSpeech(fail),
        speech_error=None,
        audio_ids=AudioIds(60.0),
        metrics=SimpleNamespace(
            queue_time=_Nop(), speaking=_Nop(), ttfa=_Nop(), audio_seconds=_Nop()
        ),
        chat=FakeChat(),
    )


def _client(fail: BaseException | None):
    core = _core(fail)
    speech = core.speech
    app = FastAPI()
    OmniEndpoints().attach_router(app)
    app.state.omni_serving = core
    app.state.omni_serving_chat = OmniServingChat(core)
    app.state.omni_serving_speech = OmniServingSpeech(core)
    return TestClient(app), speech


def _events(text: str) -> list:
    assert text.endswith("\n\n"), text[-200:]
    return [
        json.loads(e.removeprefix("data: ")) if e != "data: [DONE]" else "[DONE]"
        for e in text.strip().split("\n\n")
    ]


CHAT = {
    "model": "fake-omni",
    "messages": [{"role": "user", "content": "Hi"}],
    "modalities": ["text", "audio"],
    "audio": {"voice": "ethan", "format": "pcm16"},
    "stream": True,
}
SPEECH = {
    "input": "Hello there",
    "voice": "Chelsie",
    "response_format": "pcm",
    "stream_format": "sse",
}
FAILURES = {
    "engine_error": (
        RuntimeError("talker blew up"),
        500,
        "InternalServerError",
        500,
        "talker blew up",
    ),
    "wait_limit": (
        SpeechBusy(
            "speech engine busy: no speaking slot within 5 s",
            code=SpeechBusy.WAIT_TIMEOUT,
            retry_after=1.5,
        ),
        503,
        "ServiceUnavailableError",
        "speech_wait_timeout",
        "retry after 2 s",
    ),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_chat_stream_failure_mid_stream(name):
    """A failure after the SSE response started: the audio so far, vLLM's error event, [DONE];
    the request is aborted in the engine.

    Fake because a real engine cannot be made to fail mid-stream on cue (injected failure).
    """
    fail, _, err_type, code, words = FAILURES[name]
    client, speech = _client(fail)
    r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "mid"})
    assert r.status_code == 200 and r.headers["content-type"].startswith(
        "text/event-stream"
    )
    events = _events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[1]["choices"][0]["delta"]["audio"]["transcript"] == "Hello"
    assert events[1]["choices"][0]["delta"]["audio"]["data"]
    assert set(events[2]) == {"error"}, events
    err = events[2]["error"]
    assert (
        err["type"] == err_type and err["code"] == code and words in err["message"]
    ), err
    assert events[3:] == ["[DONE]"]
    assert speech.aborted == ["chatcmpl-mid"]


@pytest.mark.parametrize("name", list(FAILURES))
def test_speech_sse_failure_mid_stream(name):
    """/v1/audio/speech SSE: the same injected mid-stream failures, the same ending.

    Fake because a real engine cannot be made to fail mid-stream on cue (injected failure).
    """
    fail, _, err_type, code, words = FAILURES[name]
    client, speech = _client(fail)
    r = client.post("/v1/audio/speech", json=SPEECH, headers={"X-Request-Id": "tts"})
    assert r.status_code == 200
    events = _events(r.text)
    assert [e["type"] for e in events[:-2]] == ["speech.audio.delta"] * (
        len(events) - 2
    ), events
    err = events[-2]["error"]
    assert (
        err["type"] == err_type and err["code"] == code and words in err["message"]
    ), err
    assert events[-1] == "[DONE]"
    assert speech.aborted == ["chatcmpl-tts"]


def test_streams_without_failure():
    """The same fakes, no failure: the streams end as before (no error event).

    The control for the two tests above (their error event comes from the injected failure, not
    the fakes); clean streams on the real server are test_api.py's.
    """
    client, speech = _client(None)
    events = _events(client.post("/v1/chat/completions", json=CHAT).text)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    events = _events(client.post("/v1/audio/speech", json=SPEECH).text + "\n\n")
    assert (
        events[-1]["type"] == "speech.audio.done"
        and events[-1]["usage"]["output_tokens"] == 4
    )
    assert speech.aborted == []


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        (
            {**CHAT, "audio": {"voice": "Nobody"}},
            400,
            "audio.voice",
            "unknown voice 'Nobody'",
        ),
        (
            {**CHAT, "modalities": ["audio", "video"]},
            400,
            "modalities",
            "modalities must be",
        ),
        (
            {**CHAT, "audio": {"format": "wav"}},
            400,
            "audio.format",
            "streamed audio is sent as pcm16",
        ),
        ({**CHAT, "max_audio_tokens": 0}, 400, "max_audio_tokens", "positive integer"),
        (
            {**CHAT, "messages": [{"role": "assistant", "audio": {"id": "audio_x"}}]},
            400,
            "messages[0].audio.id",
            "audio id is unknown or expired",
        ),
    ],
)
def test_refusals_before_the_response(body, status, param, words):
    """Each body is also refused by the real server (test_api.py: test_chat_errors,
    test_multi_turn_audio_id); kept for the check they lack: our message as raised, without
    VLLMValidationError's "(parameter=...)"."""
    client, speech = _client(None)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (
        err["param"] == param and err["code"] == status and words in err["message"]
    ), err
    assert (
        "(parameter=" not in err["message"]
    )  # our messages as raised, not VLLMValidationError's str()


def test_start_text_only():
    """`audio=False` (the Realtime API's text mode): no speech system prompt, the SpeechEngine asked
    for text only, the chunks and usage as for audio.

    Fake to see what the core asks the SpeechEngine; test_sdk_text_only shows the socket's side.
    """
    import asyncio

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    core = _core(None)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}])

    async def run():
        started = await core.start(
            request, request_id="rt-1", voice=None, max_codes=None, audio=False
        )
        return started, [c async for c in core.chunks(started, 0.0)]

    started, chunks = asyncio.run(run())
    assert started.request_id == "rt-1" and not started.audio
    assert [m["role"] for m in request.messages] == ["user"]
    assert core.speech.calls == [dict(audio=False, voice=None, max_codes=None)]
    assert "".join(c.text for c in chunks) == "Hello there" and chunks[-1].finished
    assert core.usage(chunks[-1], started.mm_counts).completion_tokens == 2 + 4
    assert core.speech.aborted == []


def test_error_vocabulary():
    assert error_body(VLLMValidationError("bad", parameter="x")) == {
        "message": "bad",
        "type": "BadRequestError",
        "param": "x",
        "code": 400,
    }
    assert (
        error_body(RequestTooLargeError("big", parameter="m"))["type"]
        == "RequestTooLargeError"
    )
    assert error_response(RequestTooLargeError("big")).status_code == 413
    assert (
        error_response(
            VLLMUnprocessableEntityError("no audio", parameter="p")
        ).status_code
        == 422
    )
    busy = error_response(
        ServiceBusyError("busy", code="speech_queue_full", retry_after=0.2)
    )
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert json.loads(busy.body)["error"]["message"] == "busy; retry after 1 s"
    assert (
        json.loads(sse_error(ValueError("nope")).removeprefix("data: "))["error"][
            "code"
        ]
        == 400
    )  # as vLLM


def test_attach_router_websocket_routes():
    """Feature routers may hold WebSocket routes (no `methods`); ours replace one on the same path."""
    app = FastAPI()

    @app.websocket("/v1/realtime")
    async def theirs(ws: WebSocket):
        await ws.close()

    realtime = APIRouter()

    @realtime.websocket("/v1/realtime")
    async def ours(ws: WebSocket):
        await ws.accept()
        await ws.send_text("ours")
        await ws.close()

    endpoints = OmniEndpoints()  # its own /v1/realtime router makes way for this test's
    endpoints.routers = [
        r
        for r in endpoints.routers
        if not any(isinstance(x, APIWebSocketRoute) for x in r.routes)
    ] + [realtime]
    endpoints.attach_router(app)
    ws_routes = [r for r in app.router.routes if isinstance(r, APIWebSocketRoute)]
    assert [r.endpoint for r in ws_routes] == [ours]
    with TestClient(app).websocket_connect("/v1/realtime") as ws:
        assert ws.receive_text() == "ours"


def test_compat_version_guard():
    assert compat.check_version("0.32.0+cpu")  # a local build of the supported release
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not compat.check_version("0.32.1")
    assert "api/compat.py" in str(caught[0].message)
    with pytest.raises(compat.VLLMCompatError, match="_extract_prompt_len"):
        compat.prompt_len(object(), {})
