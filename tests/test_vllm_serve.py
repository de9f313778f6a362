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

ENV = {"VLLM_PLUGINS": "omni_vllm", "OMNI_VLLM_MAX_AUDIO_TOKENS": "12", "OMNI_VLLM_DEFAULT_VOICE": "ethan"}


def test_stock_vllm_server_speaks(tiny_checkpoint_dir, tmp_path):
    from openai import OpenAI

    with running_server(tiny_checkpoint_dir, tmp_path / "server.log", env=ENV,
                        module="vllm.entrypoints.openai.api_server") as server:
        log = server["log"].read_text(errors="replace")
        assert "Loaded endpoint plugin omni_vllm" in log
        client = OpenAI(base_url=server["base_url"], api_key="-", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model=server["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "wav"},
            extra_body={"ignore_eos": True, "max_audio_tokens": 48})
        audio = resp.choices[0].message.audio
        wave, sr = sf.read(io.BytesIO(base64.b64decode(audio.data)))
        assert sr == 24000 and 0 < len(wave) <= 12 * 480  # OMNI_VLLM_MAX_AUDIO_TOKENS caps the request's 48
        speech = httpx.post(f"{server['base_url']}/audio/speech", timeout=120, json={
            "model": server["model"], "input": "Hello", "response_format": "wav"})
        assert speech.status_code == 200 and speech.headers["content-type"].startswith("audio/wav")
        text = client.chat.completions.create(model=server["model"], max_tokens=2,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert text.choices[0].message.content is not None and text.choices[0].message.audio is None
        assert "omni_vllm:speaking_requests" in httpx.get(f"{server['root']}/metrics").text
