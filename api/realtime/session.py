"""State of one realtime session: its configuration, input audio buffer and conversation.

The conversation is the session's memory: each response's prompt is built from its items, in
order. User audio stays audio (an `input_audio` WAV part: Qwen2.5-Omni hears it itself, there is
no transcription step); assistant turns are their transcript (what was sent, or what the client
said was played through `conversation.item.truncate`). When the items no longer fit the model
length, the oldest are dropped first (system messages stay), and the caller says so.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from vllm.logger import init_logger

from omni_vllm.api.realtime.protocol import (
    SAMPLE_RATE,
    ClientError,
    decode_audio,
    new_id,
)
from omni_vllm.api.realtime.vad import VadSettings

logger = init_logger("omni_vllm.api.realtime")

AUDIO_TOKENS_PER_SECOND = 25  # Qwen2.5-Omni's audio encoder: one token per 40 ms
MESSAGE_OVERHEAD_TOKENS = 6  # <|im_start|>role\n ... <|im_end|>\n, and audio bos/eos
VAD_KEYS = (
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
)
# semantic_vad (the default of OpenAI's Agents SDK and of LiveKit) ends a turn when a model judges
# the user done; here Silero VAD ends it after a silence whose length follows `eagerness` (low:
# the user may pause longer), the server_vad default of 500 ms lying between medium and high.
SEMANTIC_SILENCE_MS = {"low": 1200, "medium": 800, "auto": 800, "high": 400}
# Session fields that change no output here: accepted as OpenAI accepts them and shown back in
# session.updated as the client sent them (OpenAI echoes its session configuration whole).
ECHOED = ("tracing", "include", "parallel_tool_calls")
ECHOED_INPUT = ("transcription", "noise_reduction")
ECHOED_OUTPUT = ("speed",)
# tool_choice without tools: what the model does is the same as without the field
TOOL_CHOICES_WITHOUT_TOOLS = ("none", "auto")


def _json(value: Any) -> Any:
    """A field of an SDK model as JSON-ready data (what the client sent of it)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


@dataclass
class SessionConfig:
    """The parts of the GA session configuration this server honours."""

    instructions: str
    voice: str
    output_modalities: tuple[str, ...] = ("audio",)
    # the turn detection's "type" (server_vad or semantic_vad, its "eagerness") and the Silero
    # settings it runs with (VAD_KEYS), or None: the client commits the turns itself
    turn_detection: dict | None = field(
        default_factory=lambda: {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
            "create_response": True,
            "interrupt_response": True,
        }
    )
    max_output_tokens: int | str = "inf"
    # "auto", "disabled" or a retention_ratio object (as sent): how the conversation is cut
    # when it no longer fits (Conversation.messages)
    truncation: Any = "auto"
    tools: list = field(default_factory=list)
    tool_choice: str = "auto"
    # the echoed fields the client set ({name: JSON value}), top level and of audio.input / .output
    echo: dict = field(default_factory=dict)
    echo_input: dict = field(default_factory=dict)
    echo_output: dict = field(default_factory=dict)

    def truncation_limits(self) -> tuple[float | None, int | None]:
        """(the share of the budget kept when cutting, None: never cut; most conversation tokens
        after the instructions, None: the model's limit) of `truncation`."""
        t = self.truncation
        if t == "disabled":
            return None, None
        if isinstance(t, dict):
            limits = t.get("token_limits") or {}
            return t.get("retention_ratio", 1.0), limits.get("post_instructions")
        return 1.0, None

    def vad_settings(self) -> VadSettings | None:
        td = self.turn_detection
        if td is None:
            return None
        return VadSettings(
            td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"]
        )

    def to_openai(self, model: str, session_id: str) -> dict:
        """As `session.created` / `session.updated` show it (RealtimeSessionCreateRequest)."""
        fmt = {"type": "audio/pcm", "rate": SAMPLE_RATE}
        td = self.turn_detection
        if td is not None and td["type"] == "semantic_vad":
            keys = ("type", "eagerness", "create_response", "interrupt_response")
            td = {k: td[k] for k in keys}
        elif td is not None:
            td = {"type": "server_vad", **{k: td[k] for k in VAD_KEYS}}
        return {
            "type": "realtime",
            "id": session_id,
            "object": "realtime.session",
            "model": model,
            "instructions": self.instructions,
            "output_modalities": list(self.output_modalities),
            "max_output_tokens": self.max_output_tokens,
            "tools": list(self.tools),
            "tool_choice": self.tool_choice,
            "truncation": self.truncation,
            **self.echo,
            "audio": {
                "input": {"format": fmt, "turn_detection": td, **self.echo_input},
                "output": {"format": fmt, "voice": self.voice, **self.echo_output},
            },
        }


def check_modalities(
    value: list[str] | None, param: str, event_id: str | None
) -> tuple[str, ...] | None:
    if value is None:
        return None
    if list(value) not in (["audio"], ["text"]):
        raise ClientError(
            f'{param} is ["audio"] (speech and its transcript) or ["text"], got {value!r}',
            code="invalid_value",
            param=param,
            event_id=event_id,
        )
    return tuple(value)


def check_format(fmt: Any, param: str, event_id: str | None) -> None:
    if fmt is None:
        return
    if getattr(fmt, "type", None) not in (None, "audio/pcm") or getattr(
        fmt, "rate", None
    ) not in (None, SAMPLE_RATE):
        raise ClientError(
            f"{param}: this server takes and sends audio/pcm at {SAMPLE_RATE} Hz only",
            code="invalid_value",
            param=param,
            event_id=event_id,
        )


def apply_session_update(
    config: SessionConfig,
    session,
    voice: Callable[[Any, str], str],
    event_id: str | None,
    voice_locked: bool,
) -> SessionConfig:
    """A new config with the fields that `session` (a RealtimeSessionCreateRequest) sets; the old
    one stays if any of them is refused (ClientError)."""
    if getattr(session, "type", None) != "realtime":
        raise ClientError(
            "this server has realtime (speech to speech) sessions only, not transcription ones",
            code="invalid_value",
            param="session.type",
            event_id=event_id,
        )
    new, sent = replace(config), session.model_fields_set
    new.echo = dict(config.echo)
    new.echo_input, new.echo_output = dict(config.echo_input), dict(config.echo_output)
    check_no_tools(session, "session", event_id)
    if "tools" in sent:
        new.tools = []
    if "tool_choice" in sent and session.tool_choice is not None:
        new.tool_choice = session.tool_choice
    for name in ECHOED:
        if name in sent:
            new.echo[name] = _json(getattr(session, name))
    if "truncation" in sent:
        new.truncation = check_truncation(session.truncation, event_id)
    if "instructions" in sent:
        new.instructions = session.instructions or ""
    if "output_modalities" in sent:
        new.output_modalities = (
            check_modalities(
                session.output_modalities, "session.output_modalities", event_id
            )
            or config.output_modalities
        )
    if "max_output_tokens" in sent:
        new.max_output_tokens = check_max_tokens(
            session.max_output_tokens, "session.max_output_tokens", event_id
        )
    audio = session.audio
    if audio is not None and audio.input is not None:
        check_format(audio.input.format, "session.audio.input.format", event_id)
        for name in ECHOED_INPUT:
            if name in audio.input.model_fields_set:
                new.echo_input[name] = _json(getattr(audio.input, name))
        if "turn_detection" in audio.input.model_fields_set:
            td = audio.input.turn_detection
            if td is None:
                new.turn_detection = None
            elif td.type not in ("server_vad", "semantic_vad"):
                raise ClientError(
                    f"turn_detection {td.type!r} is not supported; use server_vad, "
                    "semantic_vad or null",
                    code="unsupported_value",
                    param="session.audio.input.turn_detection.type",
                    event_id=event_id,
                )
            else:
                new.turn_detection = vad_dict(td, config.turn_detection, event_id)
    if audio is not None and audio.output is not None:
        check_format(audio.output.format, "session.audio.output.format", event_id)
        for name in ECHOED_OUTPUT:
            if name in audio.output.model_fields_set:
                new.echo_output[name] = _json(getattr(audio.output, name))
        if audio.output.voice is not None:
            name = voice(audio.output.voice, "session.audio.output.voice")
            if voice_locked and name != config.voice:
                raise ClientError(
                    "the voice cannot change once the session has spoken",
                    code="invalid_value",
                    param="session.audio.output.voice",
                    event_id=event_id,
                )
            new.voice = name
    return new


def check_no_tools(params, where: str, event_id: str | None) -> None:
    """Refuse what would change the answer and cannot be honoured: function tools, a stored
    prompt, reasoning settings, a tool_choice that asks for a tool. An empty tool list and
    tool_choice "none" / "auto" are what this server does anyway: accepted."""
    if params.tools:
        raise ClientError(
            f"{where}.tools: this server has no function or MCP tools (the model answers in "
            "text and speech only); send tools: [] or leave it out",
            code="unsupported_value",
            param=f"{where}.tools",
            event_id=event_id,
        )
    choice = params.tool_choice
    if choice is not None and choice not in TOOL_CHOICES_WITHOUT_TOOLS:
        raise ClientError(
            f"{where}.tool_choice {_json(choice)!r} asks for a tool, and this server has none; "
            'use "auto" or "none"',
            code="unsupported_value",
            param=f"{where}.tool_choice",
            event_id=event_id,
        )
    if params.prompt is not None:
        raise ClientError(
            f"{where}.prompt refers to a prompt stored with OpenAI, which this server cannot "
            "read; send its text as instructions",
            code="unsupported_value",
            param=f"{where}.prompt",
            event_id=event_id,
        )
    if getattr(params, "reasoning", None) is not None:
        raise ClientError(
            f"{where}.reasoning is not supported by this model (it does not reason "
            "separately before it answers)",
            code="unsupported_value",
            param=f"{where}.reasoning",
            event_id=event_id,
        )


def check_truncation(value: Any, event_id: str | None) -> Any:
    """session.truncation as sent ("auto", "disabled" or a retention_ratio object), checked."""
    if value is None or isinstance(value, str):
        return value or "auto"
    data = _json(value)
    if not 0.0 <= data.get("retention_ratio", 1.0) <= 1.0:
        raise ClientError(
            "truncation.retention_ratio is between 0.0 and 1.0",
            code="invalid_value",
            param="session.truncation.retention_ratio",
            event_id=event_id,
        )
    return data


def vad_dict(td, old: dict | None, event_id: str | None) -> dict:
    """The turn detection `td` (server_vad or semantic_vad) over the session's `old` one (the
    defaults when its type changes), with the Silero settings it runs with."""
    base = dict(SessionConfig("", "").turn_detection)
    if old is not None and old["type"] == td.type:
        base = dict(old)
    base["type"] = td.type
    if td.type == "semantic_vad":
        base["eagerness"] = td.eagerness or base.get("eagerness") or "auto"
        base["silence_duration_ms"] = SEMANTIC_SILENCE_MS[base["eagerness"]]
        keys = ("create_response", "interrupt_response")
    else:
        base.pop("eagerness", None)
        keys = VAD_KEYS
    for key in keys:
        if (value := getattr(td, key, None)) is not None:
            base[key] = value
    if not 0.0 <= base["threshold"] <= 1.0:
        raise ClientError(
            "turn_detection.threshold is between 0.0 and 1.0",
            code="invalid_value",
            param="session.audio.input.turn_detection.threshold",
            event_id=event_id,
        )
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        if base[key] < 0:
            raise ClientError(
                f"turn_detection.{key} is not negative",
                code="invalid_value",
                param=f"session.audio.input.turn_detection.{key}",
                event_id=event_id,
            )
    return base


def check_max_tokens(value: Any, param: str, event_id: str | None) -> int | str:
    if value is None or value == "inf":
        return "inf"
    if not isinstance(value, int) or not 1 <= value <= 4096:
        raise ClientError(
            f'{param} is an integer from 1 to 4096, or "inf"',
            code="invalid_value",
            param=param,
            event_id=event_id,
        )
    return value


# ------------------------------------------------------------------------------- audio buffer


class InputAudioBuffer:
    """pcm16 24 kHz input not yet committed, at most `max_seconds` of it."""

    def __init__(self, max_seconds: float):
        self.max_bytes = int(max_seconds * SAMPLE_RATE) * 2
        self.data = bytearray()
        self.start_ms = 0  # session time of the buffer's first sample
        self.total_ms = 0.0  # session time of its end (every sample ever appended)

    def append(self, pcm: bytes, event_id: str | None) -> None:
        if len(self.data) + len(pcm) > self.max_bytes:
            raise ClientError(
                f"the input audio buffer holds at most {self.max_bytes / 2 / SAMPLE_RATE:g} s; "
                "commit or clear it (this append was dropped)",
                code="input_audio_buffer_full",
                param="audio",
                event_id=event_id,
            )
        self.data += pcm
        self.total_ms += len(pcm) / 2 / SAMPLE_RATE * 1000

    def keep_last(self, ms: float) -> None:
        """Drop all but the last `ms` (the prefix padding kept while no one speaks)."""
        keep = int(ms * SAMPLE_RATE / 1000) * 2
        if len(self.data) > keep:
            del self.data[: len(self.data) - keep]
        self.start_ms = int(self.total_ms - len(self.data) / 2 / SAMPLE_RATE * 1000)

    def take(self) -> bytes:
        data, self.data = bytes(self.data), bytearray()
        self.start_ms = int(self.total_ms)
        return data

    def seconds(self) -> float:
        return len(self.data) / 2 / SAMPLE_RATE


# ------------------------------------------------------------------------------- conversation


@dataclass
class Part:
    type: str  # input_text, input_audio (user); output_text, output_audio (assistant); system: input_text
    text: str = ""  # the text, or an audio part's transcript
    audio: bytes | None = None  # user audio: pcm16 24 kHz
    audio_ms: float = 0.0  # assistant audio sent
    wav: str | None = field(
        default=None, repr=False
    )  # `audio` as base64 WAV, made once for every later prompt


@dataclass
class Item:
    id: str
    role: str
    parts: list[Part]
    status: str = "completed"

    def to_openai(self, with_audio: bool = False) -> dict:
        content = []
        for p in self.parts:
            if p.type in ("input_text", "output_text"):
                content.append({"type": p.type, "text": p.text})
            elif p.type == "input_audio":
                c = {"type": "input_audio", "transcript": None}
                if with_audio:
                    c["audio"] = base64.b64encode(p.audio or b"").decode()
                content.append(c)
            else:
                content.append({"type": "output_audio", "transcript": p.text})
        return {
            "id": self.id,
            "type": "message",
            "object": "realtime.item",
            "role": self.role,
            "status": self.status,
            "content": content,
        }

    def to_message(self) -> dict | None:
        """The chat message for the thinker (None: nothing to say, e.g. a reply cut before its first word)."""
        if self.role != "user":
            text = "".join(p.text for p in self.parts)
            return {"role": self.role, "content": text} if text else None
        content = []
        for p in self.parts:
            if p.type == "input_audio":
                if p.wav is None:
                    p.wav = wav_b64(p.audio or b"")
                content.append(
                    {
                        "type": "input_audio",
                        "input_audio": {"data": p.wav, "format": "wav"},
                    }
                )
            elif p.text:
                content.append({"type": "text", "text": p.text})
        return {"role": "user", "content": content} if content else None

    def tokens(self, count_text: Callable[[str], int]) -> int:
        """An upper estimate of the item's prompt tokens."""
        n = MESSAGE_OVERHEAD_TOKENS
        for p in self.parts:
            if p.type == "input_audio":
                n += (
                    int(len(p.audio or b"") / 2 / SAMPLE_RATE * AUDIO_TOKENS_PER_SECOND)
                    + 3
                )
            else:
                n += count_text(p.text)
        return n


def wav_b64(pcm16: bytes) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf, np.frombuffer(pcm16, "<i2"), SAMPLE_RATE, format="WAV", subtype="PCM_16"
    )
    return base64.b64encode(buf.getvalue()).decode()


def item_from_event(item, event_id: str | None, max_audio_bytes: int) -> Item:
    """An Item from the `item` of `conversation.item.create` (or `response.create`'s `input`)."""
    if getattr(item, "type", None) != "message":
        raise ClientError(
            f"item type {getattr(item, 'type', None)!r} is not supported (messages only: this "
            "server has no tools)",
            code="unsupported_value",
            param="item.type",
            event_id=event_id,
        )
    parts = []
    for i, c in enumerate(item.content):
        kind = c.type or ("input_text" if item.role != "assistant" else "output_text")
        param = f"item.content[{i}]"
        if item.role == "user" and kind == "input_audio":
            pcm = decode_audio(c.audio or "", f"{param}.audio", event_id)
            if len(pcm) > max_audio_bytes:
                raise ClientError(
                    f"{param}.audio is longer than {max_audio_bytes / 2 / SAMPLE_RATE:g} s",
                    code="input_audio_too_long",
                    param=f"{param}.audio",
                    event_id=event_id,
                )
            if not pcm:
                raise ClientError(
                    f"{param}.audio is empty",
                    code="invalid_value",
                    param=f"{param}.audio",
                    event_id=event_id,
                )
            parts.append(Part("input_audio", text=c.transcript or "", audio=pcm))
        elif kind in ("input_text", "output_text", "text"):
            parts.append(
                Part(
                    "input_text" if item.role != "assistant" else "output_text",
                    text=c.text or "",
                )
            )
        elif item.role == "assistant" and kind == "output_audio":
            parts.append(
                Part("output_audio", text=c.transcript or "")
            )  # its transcript is what it said
        else:
            raise ClientError(
                f"{param}: content type {kind!r} is not supported for a {item.role} message",
                code="unsupported_value",
                param=f"{param}.type",
                event_id=event_id,
            )
    if not parts:
        raise ClientError(
            "item.content is empty",
            code="invalid_value",
            param="item.content",
            event_id=event_id,
        )
    return Item(item.id or new_id("item"), item.role, parts)


class Conversation:
    """The session's items in order."""

    def __init__(self):
        self.items: list[Item] = []

    def find(self, item_id: str, event_id: str | None, param: str = "item_id") -> Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise ClientError(
            f"no item with id {item_id!r} in the conversation",
            code="item_not_found",
            param=param,
            event_id=event_id,
        )

    def add(
        self,
        item: Item,
        previous_item_id: str | None = None,
        event_id: str | None = None,
    ) -> str | None:
        """Insert `item` after `previous_item_id` ("root": first; None: last); returns the id before it."""
        if any(i.id == item.id for i in self.items):
            raise ClientError(
                f"an item with id {item.id!r} is in the conversation already",
                code="invalid_value",
                param="item.id",
                event_id=event_id,
            )
        if previous_item_id is None:
            at = len(self.items)
        elif previous_item_id == "root":
            at = 0
        else:
            at = (
                self.items.index(
                    self.find(previous_item_id, event_id, "previous_item_id")
                )
                + 1
            )
        self.items.insert(at, item)
        return self.items[at - 1].id if at else None

    def delete(self, item_id: str, event_id: str | None) -> None:
        self.items.remove(self.find(item_id, event_id))

    def truncate(
        self, item_id: str, content_index: int, audio_end_ms: int, event_id: str | None
    ) -> None:
        """The client played only `audio_end_ms` of an assistant reply: keep that much of its
        transcript (in proportion to the audio played; text leads audio, so this is the best
        estimate without word timings)."""
        item = self.find(item_id, event_id)
        if item.role != "assistant":
            raise ClientError(
                "only assistant items can be truncated",
                code="invalid_value",
                param="item_id",
                event_id=event_id,
            )
        if (
            not 0 <= content_index < len(item.parts)
            or item.parts[content_index].type != "output_audio"
        ):
            raise ClientError(
                f"content_index {content_index} is not an audio part of {item_id}",
                code="invalid_value",
                param="content_index",
                event_id=event_id,
            )
        part = item.parts[content_index]
        if audio_end_ms < 0 or audio_end_ms > part.audio_ms + 1:
            raise ClientError(
                f"audio_end_ms {audio_end_ms} is beyond the item's audio ({part.audio_ms:.0f} ms)",
                code="invalid_value",
                param="audio_end_ms",
                event_id=event_id,
            )
        keep = audio_end_ms / part.audio_ms if part.audio_ms else 0.0
        part.text, part.audio_ms = (
            part.text[: int(round(len(part.text) * keep))],
            float(audio_end_ms),
        )
        item.status = "incomplete"

    def messages(
        self,
        instructions: str,
        items: list[Item] | None,
        budget: int,
        count_text: Callable[[str], int],
        keep: float | None = 1.0,
        post_instructions: int | None = None,
    ) -> tuple[list[dict], list[Item]]:
        """The prompt's messages (instructions first) and the items dropped to fit `budget` tokens:
        the oldest non-system items go first; the last item always stays.

        As the session's `truncation` says (SessionConfig.truncation_limits): `keep` None never
        drops (a conversation too long then fails its response, "disabled"); else, once over,
        items are dropped until `keep` of the budget is used ("retention_ratio"; 1.0: "auto");
        `post_instructions` caps the tokens after the instructions as well."""
        own = items is None
        items = list(self.items if own else items)
        cost = {i.id: i.tokens(count_text) for i in items}
        head = count_text(instructions) + MESSAGE_OVERHEAD_TOKENS
        total = head + sum(cost.values())
        if post_instructions is not None:
            budget = min(budget, head + post_instructions)
        dropped = []
        over = keep is not None and total > budget
        while over and total > head + int((budget - head) * keep):
            victim = next((i for i in items[:-1] if i.role != "system"), None)
            if victim is None:
                break
            items.remove(victim)
            dropped.append(victim)
            total -= cost[victim.id]
        if own:
            for item in dropped:
                self.items.remove(item)
        if dropped:
            logger.info(
                "realtime conversation over %d tokens: dropped its %d oldest item(s)",
                budget,
                len(dropped),
            )
        msgs = [{"role": "system", "content": instructions}] if instructions else []
        msgs += [m for i in items if (m := i.to_message()) is not None]
        return msgs, dropped
