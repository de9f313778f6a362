"""`python -m omni_vllm.api.serve` end to end: a real server process driven with the `openai` SDK. With no model
named it serves the tiny random-weight demo, which must answer in seconds (short replies)."""

from __future__ import annotations

import os

import pytest
from api_server import running_server, tail

from omni_vllm.api.serve import (
    DEMO_AUDIO_TOKENS,
    DEMO_MODEL_NAME,
    DEMO_TEXT_TOKENS,
    vllm_args,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(
        None, log, name=DEMO_MODEL_NAME
    ) as srv:  # the demo: no model named
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base_url"], api_key="unused", timeout=120)


MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


def test_models_list(client, server):
    assert [m.id for m in client.models.list().data] == ["qwen2.5-omni-demo"]


def test_demo_answers_briefly(client, server):
    """Random weights never stop: the demo caps its replies, and prints a request to copy once ready."""
    resp = client.chat.completions.create(
        model=server["model"],
        messages=[{"role": "user", "content": "Say hello."}],
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "wav"},
    )
    usage = resp.usage
    assert 0 < usage.completion_tokens_details.text_tokens <= DEMO_TEXT_TOKENS
    assert 0 < usage.completion_tokens_details.audio_tokens <= DEMO_AUDIO_TOKENS
    log = server["log"].read_text(errors="replace")
    assert (
        "omni-vllm is ready at http://127.0.0.1:" in log
        and "curl http://127.0.0.1:" in log
    )
    assert (
        f"'model': '{DEMO_MODEL_NAME}'" in log or f'"model": "{DEMO_MODEL_NAME}"' in log
    )


def test_chat_completion(client, server):
    resp = client.chat.completions.create(
        model=server["model"], messages=MESSAGES, max_tokens=8, temperature=0
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 8
    assert (
        resp.usage.total_tokens
        == resp.usage.prompt_tokens + resp.usage.completion_tokens
    )


def test_chat_completion_stream(client, server):
    stream = client.chat.completions.create(
        model=server["model"],
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 2 and text
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_our_model_class_served(server):
    log = server["log"].read_text(errors="replace")
    assert "omni-vllm thinker:" in log, tail(server["log"])
    assert "vLLM API server args:" in log  # the request went through our wrapper


def test_args_defaults_and_overrides(tmp_path):
    """Defaults are added only where the user gave no flag; the demo gets its extra defaults."""
    env_kv = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        assert vllm_args(["Qwen/Qwen2.5-Omni-7B"], cpu=True) == [
            "--model",
            "Qwen/Qwen2.5-Omni-7B",
            "--host",
            "127.0.0.1",
            "--port",
            "8000",
            "--kv-cache-memory-bytes",
            str(4 * 2**30),
        ]
        assert vllm_args(
            ["m", "--port=9000", "--host", "0.0.0.0", "--kv_cache_memory_bytes", "5"],
            cpu=True,
        ) == [
            "--model",
            "m",
            "--port=9000",
            "--host",
            "0.0.0.0",
            "--kv_cache_memory_bytes",
            "5",
        ]
        assert vllm_args(["m"], cpu=False) == [
            "--model",
            "m",
            "--host",
            "127.0.0.1",
            "--port",
            "8000",
        ]
        demo = vllm_args(
            ["--port", "1234", "--no-enforce-eager"], cpu=True, demo_dir=tmp_path
        )
        assert demo == [
            "--model",
            str(tmp_path),
            "--port",
            "1234",
            "--no-enforce-eager",
            "--host",
            "127.0.0.1",
            "--kv-cache-memory-bytes",
            str(2**28),
            "--max-model-len",
            "2048",
            "--dtype",
            "float32",
            "--served-model-name",
            "qwen2.5-omni-demo",
            "--max-audio-tokens",
            "100",
            "--override-generation-config",
            '{"max_new_tokens": 32}',
        ]
        assert vllm_args([], cpu=True, demo_dir=tmp_path)[-1] == "--enforce-eager"
        assert vllm_args(["--model", "m"], cpu=False)[:2] == ["--model", "m"]
    finally:
        if env_kv is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = env_kv


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--api-server-count", "2"], "--api-server-count > 1"),
        (["--data-parallel-size", "2"], "--data-parallel-size > 1"),
        (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size > 1"),
        (["--distributed-executor-backend", "ray"], "ray has never run with speech"),
    ],
)
def test_unsupported_scale_out_refused(flags, words, capsys, monkeypatch):
    """vLLM scale-out flags that speech does not support are refused at start-up, saying why and what to
    do instead; with --allow-text-only the server starts and serves text only, saying why."""
    import huggingface_hub.constants

    from omni_vllm.api.server import parse_args

    # The model's config cannot be fetched here: fail at once rather than after the hub's retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(SystemExit):
        parse_args(["--model", "Qwen/Qwen2.5-Omni-7B", *flags])
    err = capsys.readouterr().err
    assert words in err and "--allow-text-only" in err, err
    args = parse_args(["--model", "Qwen/Qwen2.5-Omni-7B", "--allow-text-only", *flags])
    assert words in args.speech_disabled
