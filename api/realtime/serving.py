"""OpenAI's Realtime API (GA) on a WebSocket: speech to speech with Qwen2.5-Omni.

`RealtimeServing` is app-wide (the limits, the sessions at once); `RealtimeConnection`
(connection.py) is one session, and `RealtimeResponse` (response.py) one of its replies.
Each response is a chat completion request built from the session's conversation and run
through the shared serving core (`OmniServing.start` / `chunks`: the same SpeechEngine as every
other request, batched with them). Client mistakes are `error` events; the socket closes only for
the limits (1008 with the reason; 1013 when the server has too many sessions).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import WebSocket

from omni_vllm.api.realtime import protocol as P
from omni_vllm.api.realtime.connection import (
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    RealtimeConnection,
)
from omni_vllm.api.serving import SPEECH_SYSTEM_PROMPT


@dataclass
class RealtimeLimits:
    """`--realtime-*` flags (omni_vllm.api.server)."""

    max_sessions: int = 32
    max_session_seconds: float = 1800.0
    max_input_audio_seconds: float = 120.0
    idle_seconds: float = 300.0


class RealtimeServing:
    """The sessions of one server, on the serving core `core` (OmniServing's interface)."""

    def __init__(
        self,
        core,
        limits: RealtimeLimits,
        *,
        model_name: str,
        instructions: str,
        default_voice: str,
        max_model_len: int,
        talker_max_len: int | None,
        count_text,
    ):
        self.core, self.limits = core, limits
        self.model_name, self.instructions, self.default_voice = (
            model_name,
            instructions,
            default_voice,
        )
        self.max_model_len, self.talker_max_len, self.count_text = (
            max_model_len,
            talker_max_len,
            count_text,
        )
        self.sessions: set[RealtimeConnection] = set()

    @classmethod
    def create(cls, core, state, model_config) -> RealtimeServing:
        """On the serving core (`app.state.omni_serving`), with the server's settings."""
        s, speech = core.settings, core.speech
        tokenizer = core.chat.renderer.tokenizer
        limits = RealtimeLimits(
            s.realtime_max_sessions,
            s.realtime_max_session_seconds,
            s.realtime_max_input_audio_seconds,
            s.realtime_idle_seconds,
        )
        return cls(
            core,
            limits,
            model_name=state.openai_serving_models.base_model_paths[0].name,
            instructions=SPEECH_SYSTEM_PROMPT,
            default_voice=s.speech.default_voice,
            max_model_len=model_config.max_model_len,
            talker_max_len=speech.talker_max_len
            if speech is not None and speech.has_speech
            else None,
            count_text=lambda text: (
                len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
            ),
        )

    async def handle(self, ws: WebSocket) -> None:
        await ws.accept()
        model = ws.query_params.get("model")
        if model and model != self.model_name:
            await ws.send_json(
                P.error_event(
                    f"the model {model!r} does not exist; this server has "
                    f"{self.model_name!r}",
                    code="model_not_found",
                    param="model",
                )
            )
            await ws.close(CLOSE_POLICY, f"unknown model {model!r}"[:120])
            return
        if len(self.sessions) >= self.limits.max_sessions:
            await ws.close(
                CLOSE_TRY_AGAIN,
                f"server has {self.limits.max_sessions} realtime sessions "
                "(--realtime-max-sessions); try again later",
            )
            return
        conn = RealtimeConnection(self, ws)
        self.sessions.add(conn)
        try:
            await conn.run()
        finally:
            self.sessions.discard(conn)
