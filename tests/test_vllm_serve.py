"""Stock `vllm serve` speaks: vLLM's own OpenAI server entry point with our endpoint plugin named in
VLLM_PLUGINS serves chat completions with audio and /v1/audio/speech, our settings coming from
OMNI_VLLM_* environment variables (vLLM's command line has no flags of ours)."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import soundfile as sf
from api_server import running_server

pytestmark = pytest.mark.slow

ENV = {
    "VLLM_PLUGINS": "omni_vllm",
    "OMNI_VLLM_MAX_AUDIO_TOKENS": "12",
    "OMNI_VLLM_DEFAULT_VOICE": "ethan",
    "OMNI_VLLM_REALTIME_MAX_SESSIONS": "1",
}


def test_stock_vllm_server_speaks(tiny_checkpoint_dir, tmp_path):
    from openai import OpenAI

    with running_server(
        tiny_checkpoint_dir,
        tmp_path / "server.log",
        env=ENV,
        module="vllm.entrypoints.openai.api_server",
    ) as server:
        log = server["log"].read_text(errors="replace")
        assert "Loaded endpoint plugin omni_vllm" in log
        # the speech memory plan ran before vLLM built its engine (patches/speech_memory_plan)
        assert "speech path memory on cpu" in log and "talker KV pool" in log
        client = OpenAI(
            base_url=server["base_url"], api_key="-", max_retries=0, timeout=120
        )
        resp = client.chat.completions.create(
            model=server["model"],
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            modalities=["text", "audio"],
            audio={"voice": "Chelsie", "format": "wav"},
            extra_body={"ignore_eos": True, "max_audio_tokens": 48},
        )
        audio = resp.choices[0].message.audio
        wave, sr = sf.read(io.BytesIO(base64.b64decode(audio.data)))
        assert (
            sr == 24000 and 0 < len(wave) <= 12 * 480
        )  # OMNI_VLLM_MAX_AUDIO_TOKENS caps the request's 48
        speech = httpx.post(
            f"{server['base_url']}/audio/speech",
            timeout=120,
            json={"model": server["model"], "input": "Hello", "response_format": "wav"},
        )
        assert speech.status_code == 200 and speech.headers["content-type"].startswith(
            "audio/wav"
        )
        text = client.chat.completions.create(
            model=server["model"],
            max_tokens=2,
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert (
            text.choices[0].message.content is not None
            and text.choices[0].message.audio is None
        )
        assert (
            "omni_vllm:speaking_requests" in httpx.get(f"{server['root']}/metrics").text
        )
        check_realtime(server)


def check_realtime(server) -> None:
    """/v1/realtime is ours under `vllm serve` too: a spoken reply (capped by OMNI_VLLM_MAX_AUDIO_TOKENS),
    and OMNI_VLLM_REALTIME_MAX_SESSIONS=1 closes a second session with 1013."""
    import asyncio

    from openai import AsyncOpenAI
    from websockets.exceptions import ConnectionClosed

    async def main():
        client = AsyncOpenAI(base_url=server["base_url"], api_key="-")
        async with client.realtime.connect(model=server["model"]) as conn:
            created = await conn.recv()
            assert (
                created.type == "session.created"
                and created.session.audio.output.voice == "Ethan"
            )
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hi"}],
                }
            )
            await conn.response.create(response={"max_output_tokens": 2})
            audio = 0
            async for event in conn:
                if event.type == "response.output_audio.delta":
                    audio += len(base64.b64decode(event.delta)) // 2
                if event.type == "response.done":
                    break
            assert (
                event.response.status in ("completed", "incomplete")
                and 0 < audio <= 12 * 480
            )
            async with client.realtime.connect(model=server["model"]) as other:
                with pytest.raises(ConnectionClosed) as e:
                    await asyncio.wait_for(other.recv(), 30)
            assert e.value.rcvd.code == 1013

    asyncio.run(main())
