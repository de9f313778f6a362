"""SpeechConfig: one documented field per setting, and the speech flags generated from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from omni_vllm.speech import SpeechConfig
from omni_vllm.streaming import StreamConfig


def parser() -> argparse.ArgumentParser:
    return SpeechConfig.add_cli_args(argparse.ArgumentParser())


def test_every_field_has_a_docstring():
    from vllm.config.utils import get_attr_docs

    docs = get_attr_docs(SpeechConfig)
    assert {f.name for f in dataclasses.fields(SpeechConfig)} <= {
        k for k, v in docs.items() if v.strip()
    }


def test_flags_default_to_the_config_defaults():
    assert SpeechConfig.from_cli_args(parser().parse_args([])) == SpeechConfig()
    assert (
        SpeechConfig.from_cli_args(argparse.Namespace()) == SpeechConfig()
    )  # no flags at all (vllm serve)


def test_flags_keep_their_names_and_set_their_fields():
    args = parser().parse_args(
        [
            "--speech-device",
            "cpu",
            "--max-speaking",
            "3",
            "--max-queued-windows",
            "9",
            "--speech-stream-config",
            '{"first_chunk": 12}',
            "--default-voice",
            "ethan",
            "--max-wait-seconds",
            "2.5",
            "--max-waiting",
            "7",
            "--max-audio-tokens",
            "12",
            "--max-audio-tokens-per-text-token",
            "0",
            "--talker-max-len",
            "100",
            "--window-delay",
            "0.1",
            "--speech-log-interval",
            "5",
            "--speech-dtype",
            "bfloat16",
            "--speech-gpu-memory-gb",
            "1.5",
            "--allow-text-only",
            "--speech-enforce-eager",
        ]
    )
    assert (
        args.speech_stream_config == {"first_chunk": 12} and args.max_audio_tokens == 12
    )  # as before
    assert SpeechConfig.from_cli_args(args) == SpeechConfig(
        device="cpu",
        max_speaking=3,
        max_queued_windows=9,
        stream_config=StreamConfig(first_chunk=12),
        default_voice="ethan",
        queue_timeout=2.5,
        max_waiting=7,
        max_codes=12,
        max_codes_per_text_token=0.0,
        talker_max_len=100,
        window_delay=0.1,
        log_interval=5.0,
        speech_dtype="bfloat16",
        gpu_memory_gb=1.5,
        allow_text_only=True,
        enforce_eager=True,
    )
    with pytest.raises(SystemExit):
        parser().parse_args(["--speech-dtype", "float64"])
    assert (
        "--kv-cache-tokens" not in parser().format_help()
    )  # derived by the server, no flag


def test_config_checks_its_limits():
    with pytest.raises(ValueError, match="max_speaking"):
        SpeechConfig(max_speaking=0)
    assert SpeechConfig(stream_config={"chunk": 24}).stream_config == StreamConfig(
        chunk=24
    )


def test_voice_aliases_flag_and_environment(monkeypatch):
    """--voice-aliases (JSON) replaces the default table of OpenAI's voice names; under
    `vllm serve` OMNI_VLLM_VOICE_ALIASES does the same; '{}' turns aliases off."""
    from omni_vllm.api.settings import Settings
    from omni_vllm.voices import DEFAULT_VOICE_ALIASES

    assert SpeechConfig().voice_aliases == DEFAULT_VOICE_ALIASES
    assert set(DEFAULT_VOICE_ALIASES) == {
        "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx",
        "nova", "sage", "shimmer", "verse", "marin", "cedar",
    }  # fmt: skip
    args = parser().parse_args(["--voice-aliases", '{"narrator": "Ethan"}'])
    assert SpeechConfig.from_cli_args(args).voice_aliases == {"narrator": "Ethan"}
    assert "--voice-aliases" in parser().format_help()
    monkeypatch.setenv("OMNI_VLLM_VOICE_ALIASES", '{"alloy": "Ethan"}')
    assert Settings.from_args(argparse.Namespace()).speech.voice_aliases == {
        "alloy": "Ethan"
    }
    monkeypatch.setenv("OMNI_VLLM_VOICE_ALIASES", "{}")
    assert Settings.from_args(argparse.Namespace()).speech.voice_aliases == {}


def test_resolve_voice_with_aliases():
    from omni_vllm.errors import UnknownVoice
    from omni_vllm.voices import (
        DEFAULT_VOICE_ALIASES,
        aliases_of,
        check_aliases,
        resolve_voice,
    )

    voices = ["Chelsie", "Ethan"]
    table = check_aliases(DEFAULT_VOICE_ALIASES, voices)
    assert resolve_voice("alloy", voices, table) == "Chelsie"
    assert resolve_voice("Marin", voices, table) == "Chelsie"
    assert resolve_voice("ash", voices, table) == "Ethan"
    assert resolve_voice("ethan", voices, table) == "Ethan"
    assert aliases_of("Ethan", table) == [
        "ash", "ballad", "cedar", "echo", "fable", "onyx", "verse",
    ]  # fmt: skip
    with pytest.raises(UnknownVoice, match="unknown voice 'alloy'"):
        resolve_voice("alloy", voices)
    with pytest.raises(UnknownVoice, match="Chelsie, Ethan .*alloy"):
        resolve_voice("nobody", voices, table)
    # the operator's table must name real voices; the default one is trimmed to them
    with pytest.raises(UnknownVoice, match="'narrator' names 'Bob'"):
        check_aliases({"narrator": "Bob"}, voices)
    assert check_aliases(DEFAULT_VOICE_ALIASES, ["Ethan"], strict=False) == {
        a: "Ethan" for a, v in DEFAULT_VOICE_ALIASES.items() if v == "Ethan"
    }
    # a voice's own name is never an alias of another
    assert check_aliases({"chelsie": "Ethan", "x": "ethan"}, voices) == {"x": "Ethan"}
