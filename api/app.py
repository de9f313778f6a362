"""Our routes on vLLM's OpenAI app: chat completions that speak, and /v1/audio/speech.

`OmniEndpoints` has the shape of a vLLM endpoint plugin (`attach_router` + `init_state`, see
`vllm.plugins.endpoint_plugins.interface`): `omni_vllm.api.server` builds vLLM's own app, lets this replace
`POST /v1/chat/completions` and add `POST /v1/audio/speech` and the `/v1/realtime` WebSocket, and serves it. Everything else
(`/v1/models`, `/health`, `/metrics`, `/tokenize`, completions, ...) is vLLM's, unchanged.

This module is wiring only, laid out as vLLM's `entrypoints/openai/<feature>/`: each feature has
a router (api/chat/router.py, api/speech/router.py, api/realtime/router.py) whose handlers find their serving object on
`app.state`, and all share one core, `omni_vllm.api.serving.OmniServing` (`app.state.omni_serving`).
Details and limits: api/README.md.
"""

from __future__ import annotations

import os
from argparse import Namespace
from dataclasses import replace

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from vllm.logger import init_logger

from omni_vllm.api import limits as L
from omni_vllm.api.audio_ids import ENV_KEY, AudioIds
from omni_vllm.api.chat.serving import OmniServingChat
from omni_vllm.api.metrics import Metrics
from omni_vllm.api.realtime.serving import RealtimeServing
from omni_vllm.api.serving import SPEECH_SYSTEM_PROMPT, OmniServing
from omni_vllm.api.settings import Settings, check_scale_out
from omni_vllm.api.speech.protocol import MAX_SPEECH_INPUT_CHARS, SpeechRequest
from omni_vllm.api.speech.serving import TTS_USER_PROMPT, OmniServingSpeech
from omni_vllm.checkpoint import engine_checkpoint
from omni_vllm.memory import DEFAULT_MAX_SPEAKING, current_plan, disabled_reason
from omni_vllm.speech import SpeechEngine, SpeechLoadError, UnknownVoice

__all__ = [
    "MAX_SPEECH_INPUT_CHARS",
    "SPEECH_SYSTEM_PROMPT",
    "TTS_USER_PROMPT",
    "OmniEndpoints",
    "Settings",
    "SpeechRequest",
    "check_scale_out",
    "routers",
]

logger = init_logger("omni_vllm.api")


def routers() -> list[APIRouter]:
    """Our feature routers; `OmniEndpoints.attach_router` includes them all."""
    from omni_vllm.api.chat.router import router as chat
    from omni_vllm.api.realtime.playground import router as playground
    from omni_vllm.api.realtime.router import router as realtime
    from omni_vllm.api.speech.router import router as speech

    return [chat, speech, realtime, playground]


def _route_keys(route) -> set[tuple[str, str]]:
    """(path, method) of an HTTP route; (path, "WEBSOCKET") of a WebSocket route (it has no methods)."""
    if isinstance(route, APIWebSocketRoute):
        return {(route.path, "WEBSOCKET")}
    return {(route.path, m) for m in getattr(route, "methods", None) or ()}


class OmniEndpoints:
    """Endpoint-plugin-shaped: `attach_router(app)` then `await init_state(engine, app.state, args)`."""

    name = "omni_vllm"
    required_tasks = ("generate",)

    def __init__(self):
        self.routers = routers()
        self.speech = None
        self.speech_error: str | None = None
        self.serving: OmniServing | None = None

    def attach_router(self, app: FastAPI) -> None:
        """Add our routes; they replace vLLM's for the same path and method (or WebSocket path)."""
        ours = set().union(
            *(_route_keys(r) for router in self.routers for r in router.routes)
        )
        for route in list(app.router.routes):
            if (
                isinstance(route, (APIRoute, APIWebSocketRoute))
                and _route_keys(route) & ours
            ):
                app.router.routes.remove(route)
        for router in self.routers:
            app.include_router(router)
        app.openapi_schema = None
        built, app.middleware_stack = (
            app.middleware_stack is not None,
            None,
        )  # built already by vLLM's
        # SageMaker bootstrap: rebuilt below, with ours in it (Starlette adds none to a built stack)
        settings = Settings.from_args(getattr(app.state, "args", Namespace()))
        app.add_middleware(
            L.BodySizeLimit, max_bytes=int(settings.max_request_mb * 2**20)
        )
        # A body FastAPI cannot parse (e.g. invalid UTF-8) raises Starlette's HTTPException; vLLM's handler is
        # registered for FastAPI's subclass only, so that 400 came back as {"detail": ...}: make it OpenAI-shaped.
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from vllm.entrypoints.serve.exception_handling.handlers.http import (
            http_exception_handler,
        )

        app.add_exception_handler(StarletteHTTPException, http_exception_handler)
        if built:
            app.middleware_stack = app.build_middleware_stack()

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        check_scale_out(
            args
        )  # again here: `vllm serve` with our endpoint plugin comes this way only
        self.settings = Settings.from_args(args)
        self.audio_ids = AudioIds(
            self.settings.audio_id_ttl,
            self.settings.audio_id_key or os.environ.get(ENV_KEY),
        )
        self.metrics = Metrics(state.openai_serving_models.base_model_paths[0].name)
        s, model_config = self.settings.speech, engine_client.model_config
        max_len = min(
            s.talker_max_len or model_config.max_model_len + s.max_codes,
            model_config.max_model_len + s.max_codes,
        )  # longer is never reached
        # the memory plan made before vLLM's engine (omni_vllm.api.server.plan_speech, or
        # under stock `vllm serve` omni_vllm.patches.speech_memory_plan) sizes the KV pool
        plan = current_plan()
        max_speaking = s.max_speaking or (
            plan.max_speaking if plan is not None else DEFAULT_MAX_SPEAKING
        )
        try:
            self.speech = SpeechEngine(
                engine_client,
                engine_checkpoint(engine_client.vllm_config),
                config=replace(
                    s,
                    max_speaking=max_speaking,
                    talker_max_len=max_len,
                    kv_cache_tokens=None if plan is None else plan.kv_cache_tokens,
                ),
                text_only_reason=getattr(args, "speech_disabled", None)
                or disabled_reason(),
            )
        except UnknownVoice as e:
            # "default voice: ..." or "voice aliases: ...": the flag named by its setting
            raise ValueError(f"--default-voice / --voice-aliases: {e}") from None
        except (
            SpeechLoadError
        ) as e:  # a start-up error that says what to change, not a traceback
            logger.error("the speech path did not load: %s", e)
            raise SystemExit(f"omni-vllm: the speech path did not load: {e}") from None
        self.settings.speech = (
            self.speech.config
        )  # the default voice as the checkpoint spells it
        if self.speech.has_speech:
            self.metrics.attach(self.speech)
        else:
            self.speech_error = (
                self.speech.unavailable_reason or "no talker / token2wav weights"
            )
            logger.warning(
                "no speech output (%s); text requests are served as usual",
                self.speech_error,
            )
        self.serving = OmniServing(
            settings=self.settings,
            speech=self.speech,
            speech_error=self.speech_error,
            audio_ids=self.audio_ids,
            metrics=self.metrics,
            chat=state.openai_serving_chat,
        )
        state.omni_serving = self.serving
        state.omni_serving_chat = OmniServingChat(
            self.serving, float(getattr(args, "sse_keep_alive_interval", 0) or 0)
        )
        state.omni_serving_speech = OmniServingSpeech(self.serving)
        state.omni_realtime = RealtimeServing.create(self.serving, state, model_config)

    async def shutdown(self) -> None:
        if self.speech is not None:
            await self.speech.shutdown()
