"""Interim: the serving-core interface (issue 14's `api.serving.OmniServing`) over OmniEndpoints'
own helpers, until that core is merged; then `app.state.omni_serving` is used and this goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api import app as A


@dataclass
class Started:
    request_id: str
    mm_counts: dict
    stream: Any
    first: Any


class EndpointsCore:
    def __init__(self, endpoints):
        self.ep = endpoints

    def voice(self, name, param: str) -> str:
        return self.ep._voice(name, param)

    def need_speech(self, param: str = "modalities") -> None:
        self.ep._need_speech()

    def check_media(self, messages) -> None:
        class _R:  # _check_media reads .messages only
            pass

        r = _R()
        r.messages = messages
        self.ep._check_media(r)

    def max_codes(self, value, param: str) -> int:
        return self.ep._max_codes(value, param)

    async def start(self, request, *, request_id: str, voice: str, max_codes: int, audio: bool = True,
                    respond_while_queued: bool = False) -> Started:
        import asyncio

        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        ep = self.ep
        if audio:
            request.request_id = request_id
            rid, mm, stream, first = await ep._start(request, None, voice, max_codes, respond_while_queued)
            return Started(rid, mm, stream, first)
        rendered = await ep.chat.render_chat_request(request)
        if isinstance(rendered, ErrorResponse):
            raise A._Rendered(rendered)
        _, (engine_input,) = rendered
        prompt_len = ep.chat._extract_prompt_len(engine_input)
        max_tokens = get_max_tokens(ep.chat.model_config.max_model_len, request.max_completion_tokens, prompt_len,
                                    ep.chat.default_sampling_params, ep.chat.override_max_tokens)
        params = request.to_sampling_params(max_tokens, ep.chat.default_sampling_params)
        stream = ep.speech.generate(engine_input, params, request_id, audio=False)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.wait([first])
        first.result()
        return Started(request_id, A._mm_token_counts(engine_input), stream, first)

    def chunks(self, started: Started, t0: float):
        return self.ep._run(started.stream, started.first, started.request_id, t0)

    def usage(self, final, mm_counts):
        return self.ep._usage(final, mm_counts)

    async def abort(self, request_id: str) -> None:
        await self.ep.speech.abort(request_id)


def error_body(e: Exception) -> dict:
    """The OpenAI error object of a refusal (as api.errors.error_body will give it)."""
    if isinstance(e, A._Rendered):
        return e.err.model_dump()
    if isinstance(e, A.L.MediaError):
        return A.APIError(str(e), e.status, e.param).body()
    if isinstance(e, A.APIError):
        return e.body()
    if isinstance(e, A.SpeechBusy):
        return A.APIError.busy(e).body()
    return {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
