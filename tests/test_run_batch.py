"""vLLM's batch runner speaks: `python -m vllm.entrypoints.openai.run_batch` (what `vllm run-batch`
runs) with our plugins named in VLLM_PLUGINS answers a chat completion line that asks for audio
with the `message.audio` that the server's chat completion gives for the same body (stock `vllm
serve` with our endpoint plugin); text lines stay vLLM's; what a batch line cannot do is a per-line
error, never a text-only 200 (omni_vllm.patches.run_batch)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import soundfile as sf
from api_server import ROOT, SERVER_FLAGS, running_server, tail

MODEL = "tiny-omni"
ENV = {"VLLM_PLUGINS": "omni_vllm"}
SPEAK = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "modalities": ["text", "audio"],
    "audio": {"voice": "Chelsie", "format": "wav"},
    "max_tokens": 3,
    "ignore_eos": True,
    "max_audio_tokens": 24,
    "temperature": 0.0,
    "seed": 7,  # the talker's sampling and Token2Wav's noise
}
TEXT = {k: SPEAK[k] for k in ("model", "messages", "max_tokens", "ignore_eos")}


def line(custom_id: str, body: dict) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
    )


def wave(audio: dict) -> np.ndarray:
    samples, sr = sf.read(io.BytesIO(base64.b64decode(audio["data"])), dtype="int16")
    assert sr == 24000
    return samples.astype(np.int32)


@pytest.mark.slow
def test_run_batch_speaks_as_the_server_does(tiny_checkpoint_dir, tmp_path):
    batch, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "b.log"
    lines = {
        "speak": SPEAK,
        "text": TEXT,
        "stream": {**SPEAK, "stream": True},
        "voice": {**SPEAK, "audio": {"voice": "nobody", "format": "wav"}},
    }
    batch.write_text("\n".join(line(k, v) for k, v in lines.items()) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(batch),
        "-o",
        str(out),
        "--model",
        str(tiny_checkpoint_dir),
        "--served-model-name",
        MODEL,
        *SERVER_FLAGS,
    ]
    # As a user runs it: its engine in its own process (conftest makes test engines in-process).
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "wb") as f:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**env, **ENV},
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    assert proc.returncode == 0, tail(log)
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(got) == set(lines)

    speak = got["speak"]
    assert speak["error"] is None and speak["response"]["status_code"] == 200
    message = speak["response"]["body"]["choices"][0]["message"]
    assert message["audio"] is not None and message["audio"]["transcript"]
    assert 0 < len(wave(message["audio"])) <= 24 * 480
    text = got["text"]["response"]["body"]["choices"][0]["message"]
    assert text["content"] and text.get("audio") is None
    for custom_id, param in (("stream", "stream"), ("voice", "audio.voice")):
        r = got[custom_id]
        assert r["response"]["status_code"] == 400 and r["response"]["body"] is None
        assert r["error"]["error"]["param"] == param, r

    # The same body on the server: the same speech and transcript.
    with running_server(
        tiny_checkpoint_dir,
        tmp_path / "server.log",
        env=ENV,
        module="vllm.entrypoints.openai.api_server",
        name=MODEL,
    ) as server:
        resp = httpx.post(
            f"{server['base_url']}/chat/completions", json=SPEAK, timeout=300
        )
    assert resp.status_code == 200, resp.text
    served = resp.json()["choices"][0]["message"]["audio"]
    assert served["transcript"] == message["audio"]["transcript"]
    a, b = wave(served), wave(message["audio"])
    # One batched float path on both sides: equal up to pcm16 rounding.
    assert len(a) == len(b) and np.abs(a - b).max() <= 1


def test_without_our_endpoint_plugin_an_audio_line_is_refused():
    """VLLM_PLUGINS unset: vLLM loads our general plugin (this patch) but no endpoint plugin,
    so nothing could speak: the audio line gets a 400 naming the fix, text lines vLLM's answer."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    from omni_vllm.patches.run_batch import _RefuseAudio

    class VllmChat:
        async def create_chat_completion(self, request, raw_request=None):
            return "vLLM's answer"

    chat = _RefuseAudio(VllmChat())
    refused = asyncio.run(
        chat.create_chat_completion(ChatCompletionRequest.model_validate(SPEAK))
    )
    assert isinstance(refused, ErrorResponse) and refused.error.code == 400
    assert refused.error.param == "modalities"
    assert "VLLM_PLUGINS=omni_vllm" in refused.error.message
    text = ChatCompletionRequest.model_validate(TEXT)
    assert asyncio.run(chat.create_chat_completion(text)) == "vLLM's answer"
