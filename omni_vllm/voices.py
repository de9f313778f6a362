"""The checkpoint's voices: its speaker table (`spk_dict.pt`) is read and voice names resolved here.

The talker (a voice's start token), Token2Wav (its reference mel) and the engines (a request's
voice, checked before any work is done) all go through these two functions, so a missing table
and an unknown voice read the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from omni_vllm.errors import SpeechUnavailable, UnknownVoice

SPEAKERS_FILE = "spk_dict.pt"


def speakers_file(model_dir: str | Path) -> Path:
    """The checkpoint's speaker table file; SpeechUnavailable without one (a text-only export)."""
    path = Path(model_dir) / SPEAKERS_FILE
    if not path.exists():
        raise SpeechUnavailable(f"{model_dir} has no {SPEAKERS_FILE} (speaker table)")
    return path


def load_speakers(model_dir: str | Path) -> dict[str, dict]:
    """The checkpoint's speaker table {voice: its parameters}; SpeechUnavailable without one."""
    return torch.load(speakers_file(model_dir), map_location="cpu", weights_only=True)


def resolve_voice(name: str, voices: Iterable[str]) -> str:
    """The checkpoint's own spelling of voice `name` (case-insensitive: "chelsie" is "Chelsie");
    UnknownVoice (a ValueError) naming the voices there are."""
    voices = list(voices)
    if name in voices:
        return name
    for voice in voices:
        if voice.lower() == str(name).lower():
            return voice
    raise UnknownVoice(f"unknown voice {name!r}; available voices: {', '.join(voices)}")
