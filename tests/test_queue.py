"""Under load the server queues audio requests as vLLM's scheduler queues text: `python -m omni_vllm.api.serve`
on the tiny checkpoint with 2 speaking slots, driven by the `openai` SDK with `max_retries=0` (no
client-side retries, so a refusal would show).

* 24 concurrent audio requests (half streamed): all answered 200, in turn; the waiting time is in
  `omni_vllm:speech_queue_time_seconds`.
* With both slots held: a waiting streamed request gets its first event (the role) while it waits;
  waiting clients that go away (a closed stream, a non-streamed request given up by its timeout)
  leave the queue at once (`omni_vllm:speech_waiting` back down) and their thinker requests never
  start (`vllm:prompt_tokens_total` unchanged); past `--max-waiting` waiters: 503 with Retry-After
  and `code` "speech_queue_full".
* The shapes of a refusal: response and stream error event (the wait limit itself is exercised on
  the SpeechEngine in test_speech_engine.py).
"""

from __future__ import annotations

import asyncio
import base64
import time

import openai
import pytest
from api_server import metric, running_server

SLOTS, WAITING, N = 2, 22, 24
STREAM = '{"first_chunk": 12, "chunk": 24, "left_context": 12, "look_ahead": 12, "num_steps": 4}'
SERVER_ARGS = [
    "--max-speaking",
    str(SLOTS),
    "--max-waiting",
    str(WAITING),
    "--speech-stream-config",
    STREAM,
]
USER = [{"role": "user", "content": "Hello, how are you today?"}]
CODES = 12  # speech codes per request of the load (0.24 s)
SAMPLES_PER_CODE = 480
QUEUE_TIME = "omni_vllm:speech_queue_time_seconds"


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    with running_server(
        tiny_checkpoint_dir,
        tmp_path_factory.mktemp("queue") / "server.log",
        *SERVER_ARGS,
    ) as s:
        yield s


def client(server, **kw):
    return openai.AsyncOpenAI(
        base_url=server["base_url"],
        api_key="unused",
        max_retries=0,
        **{"timeout": 300, **kw},
    )


def audio_request(
    server, stream: bool, max_tokens: int = 3, codes: int = CODES, **kw
) -> dict:
    return dict(
        model=server["model"],
        messages=USER,
        max_tokens=max_tokens,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16" if stream else "wav"},
        stream=stream,
        extra_body={"max_audio_tokens": codes, "ignore_eos": True},
        **kw,
    )


async def poll(root: str, name: str, want: float, seconds: float = 30) -> None:
    """Wait (bounded) until the metric reads `want`: /metrics is another request on the server."""
    deadline = time.monotonic() + seconds
    while (got := await asyncio.to_thread(metric, root, name)) != want:
        assert time.monotonic() < deadline, f"{name} is {got}, expected {want}"
        await asyncio.sleep(0.1)


def test_more_requests_than_slots_are_all_answered(server):
    count0 = metric(server["root"], f"{QUEUE_TIME}_count") or 0
    sum0 = metric(server["root"], f"{QUEUE_TIME}_sum") or 0

    async def one(c, i: int) -> int:
        if i % 2:
            stream = await c.chat.completions.create(**audio_request(server, True))
            deltas = [ch.choices[0].delta async for ch in stream if ch.choices]
            pcm = b"".join(
                base64.b64decode(d.audio.data)
                for d in deltas
                if d.audio and d.audio.data
            )
            return len(pcm) // 2
        resp = await c.chat.completions.create(**audio_request(server, False))
        return (
            len(base64.b64decode(resp.choices[0].message.audio.data)) - 44
        ) // 2  # a 44-byte WAV header

    async def load():
        c = client(server)
        t0 = time.monotonic()
        samples = await asyncio.gather(*(one(c, i) for i in range(N)))
        return samples, time.monotonic() - t0

    samples, seconds = asyncio.run(load())  # any refusal or failure raises here
    assert samples == [CODES * SAMPLES_PER_CODE] * N
    count = metric(server["root"], f"{QUEUE_TIME}_count") - count0
    waited = metric(server["root"], f"{QUEUE_TIME}_sum") - sum0
    print(
        f"{N} requests on {SLOTS} slots in {seconds:.1f} s; {waited:.1f} s waited in all"
    )
    assert count == N and waited > 0
    assert metric(server["root"], "omni_vllm:speech_waiting") == 0


def test_waiting_clients_and_the_bound(server):
    root = server["root"]

    async def scenario():
        c = client(server)
        # Two long requests hold both slots for the whole scenario.
        holders = [
            await c.chat.completions.create(
                **audio_request(server, True, max_tokens=1900, codes=2000)
            )
            for _ in range(SLOTS)
        ]
        for h in holders:
            await anext(h.__aiter__())
        await poll(root, "omni_vllm:speaking_requests", SLOTS)
        await asyncio.sleep(0.5)  # their prompts are in the thinker
        prompt_tokens = metric(root, "vllm:prompt_tokens_total")

        # A non-streamed request given up by its client (timeout) leaves the queue.
        with pytest.raises(openai.APITimeoutError):
            await client(server, timeout=3).chat.completions.create(
                **audio_request(server, False)
            )
        await poll(root, "omni_vllm:speech_waiting", 0, seconds=10)

        # Streamed waiters get their first event (the role) while they wait, up to the bound.
        waiters = []
        for _ in range(WAITING):
            w = await c.chat.completions.create(**audio_request(server, True))
            first = await anext(w.__aiter__())
            assert (
                first.choices[0].delta.role == "assistant"
                and not first.choices[0].delta.audio.data
            )
            waiters.append(w)
        await poll(root, "omni_vllm:speech_waiting", WAITING, seconds=5)

        # Past the bound: 503 at once, with Retry-After and a code saying why.
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as ei:
                await c.chat.completions.create(**audio_request(server, stream))
            e = ei.value
            assert e.status_code == 503, e
            assert int(e.response.headers["retry-after"]) >= 1
            err = e.response.json()["error"]
            assert (
                err["code"] == "speech_queue_full"
                and err["type"] == "ServiceUnavailableError"
            ), err
            assert "retry after" in err["message"]
        with pytest.raises(openai.InternalServerError) as ei:  # /v1/audio/speech alike
            await c.audio.speech.create(
                model=server["model"], input="Hello there", voice="Ethan"
            )
        assert (
            ei.value.status_code == 503
            and int(ei.value.response.headers["retry-after"]) >= 1
        )

        # Waiting clients that go away leave the queue; their thinker requests never started.
        for w in waiters:
            await w.close()
        await poll(root, "omni_vllm:speech_waiting", 0, seconds=10)
        assert (
            metric(root, "omni_vllm:speaking_requests") == SLOTS
        )  # the holders still speak
        assert metric(root, "vllm:prompt_tokens_total") == prompt_tokens
        for h in holders:
            await h.close()
        await poll(root, "omni_vllm:speaking_requests", 0)
        await poll(root, "vllm:num_requests_running", 0)

    asyncio.run(scenario())
    # The server serves on normally afterwards.
    resp = asyncio.run(
        client(server).chat.completions.create(**audio_request(server, False))
    )
    assert resp.choices[0].message.audio.data


def test_refusal_shapes():
    """A refusal for load as a response (503, Retry-After rounded up, OpenAI's error shape with a
    string `code`) and, once a stream has started (the wait limit passed), as its error event."""
    import json

    from omni_vllm.api.errors import SSE_DONE, error_response, sse_error
    from omni_vllm.errors import SpeechBusy

    e = SpeechBusy(
        "speech engine busy: no speaking slot within 5 s",
        code=SpeechBusy.WAIT_TIMEOUT,
        retry_after=2.2,
    )
    r = error_response(e)
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    body = json.loads(r.body)
    assert body == {
        "error": {
            "message": "speech engine busy: no speaking slot within 5 s; retry after 3 s",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": "speech_wait_timeout",
        }
    }
    event, done, rest = (sse_error(e) + SSE_DONE).split("\n\n")
    assert (
        json.loads(event.removeprefix("data: ")) == body
        and done == "data: [DONE]"
        and rest == ""
    )
    shutdown = error_response(
        SpeechBusy("speech engine shut down", code=SpeechBusy.SHUTDOWN)
    )
    assert shutdown.status_code == 503 and "retry-after" not in shutdown.headers
