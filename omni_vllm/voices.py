"""The checkpoint's voices: its speaker table (`spk_dict.pt`) is read and voice names resolved here.

The talker (a voice's start token), Token2Wav (its reference mel) and the engines (a request's
voice, checked before any work is done) all go through these functions, so a missing table
and an unknown voice read the same everywhere.

OpenAI's built-in voice names are aliases of the checkpoint's voices (`DEFAULT_VOICE_ALIASES`,
replaced by `--voice-aliases` / `OMNI_VLLM_VOICE_ALIASES`): apps written for gpt-4o send
`"alloy"` (the SDK examples' default) or `"marin"` (LiveKit's), and changing `base_url` should be
all they need to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from omni_vllm.errors import SpeechUnavailable, UnknownVoice

SPEAKERS_FILE = "spk_dict.pt"

# OpenAI's built-in voices (those its SDK types name, audio.speech and Realtime) -> Qwen2.5-Omni's
# two: a voice OpenAI describes as female or neutral-bright speaks as Chelsie, one it describes as
# male as Ethan, so that an app keeps a voice of the same kind.
DEFAULT_VOICE_ALIASES: dict[str, str] = {
    "alloy": "Chelsie",
    "ash": "Ethan",
    "ballad": "Ethan",
    "coral": "Chelsie",
    "echo": "Ethan",
    "fable": "Ethan",
    "onyx": "Ethan",
    "nova": "Chelsie",
    "sage": "Chelsie",
    "shimmer": "Chelsie",
    "verse": "Ethan",
    "marin": "Chelsie",
    "cedar": "Ethan",
}


def speakers_file(model_dir: str | Path) -> Path:
    """The checkpoint's speaker table file; SpeechUnavailable without one (a text-only export)."""
    path = Path(model_dir) / SPEAKERS_FILE
    if not path.exists():
        raise SpeechUnavailable(f"{model_dir} has no {SPEAKERS_FILE} (speaker table)")
    return path


def load_speakers(model_dir: str | Path) -> dict[str, dict]:
    """The checkpoint's speaker table {voice: its parameters}; SpeechUnavailable without one."""
    return torch.load(speakers_file(model_dir), map_location="cpu", weights_only=True)


def _own_voice(name: str, voices: list[str]) -> str | None:
    if name in voices:
        return name
    return next((v for v in voices if v.lower() == name.lower()), None)


def resolve_voice(
    name: str, voices: Iterable[str], aliases: Mapping[str, str] | None = None
) -> str:
    """The checkpoint's own spelling of voice `name` (case-insensitive: "chelsie" is "Chelsie"),
    or of the voice that alias `name` stands for ("alloy" is "Chelsie" by default; the
    checkpoint's own names come first); UnknownVoice (a ValueError) naming the voices there are."""
    voices, name = list(voices), str(name)
    if (voice := _own_voice(name, voices)) is not None:
        return voice
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}
    if (target := aliases.get(name.lower())) is not None and (
        voice := _own_voice(target, voices)
    ) is not None:
        return voice
    known = ", ".join(voices)
    if aliases:
        known += f" (or one of their aliases: {', '.join(sorted(aliases))})"
    raise UnknownVoice(f"unknown voice {name!r}; available voices: {known}")


def check_aliases(
    aliases: Mapping[str, str], voices: Iterable[str], *, strict: bool = True
) -> dict[str, str]:
    """The alias table {alias (lower case): the checkpoint's spelling of its voice}.

    An alias of a voice the checkpoint lacks raises UnknownVoice with `strict` (a table the
    operator gave: a typo must not pass) and is left out without (the default table on a
    checkpoint with other voices). An alias that is also a voice's name is left out: the voice
    wins."""
    voices = list(voices)
    table = {}
    for alias, target in aliases.items():
        if not isinstance(alias, str) or not isinstance(target, str):
            raise UnknownVoice(
                f"voice aliases map names to voice names, got {alias!r}: {target!r}"
            )
        voice = _own_voice(target, voices)
        if voice is None:
            if strict:
                raise UnknownVoice(
                    f"voice alias {alias!r} names {target!r}, which this checkpoint does not "
                    f"have; its voices: {', '.join(voices)}"
                )
            continue
        if _own_voice(alias, voices) is None:
            table[alias.lower()] = voice
    return table


def aliases_of(voice: str, aliases: Mapping[str, str]) -> list[str]:
    """The aliases that stand for `voice` (a checked table), sorted."""
    return sorted(a for a, v in aliases.items() if v == voice)
