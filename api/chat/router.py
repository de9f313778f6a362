"""The route of chat completions (it replaces vLLM's POST /v1/chat/completions)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.utils.api_utils import (
    load_aware_call,
    validate_json_request,
    with_cancellation,
)

from omni_vllm.api.chat.serving import OmniServingChat

router = APIRouter()


def chat(request: Request) -> OmniServingChat:
    return request.app.state.omni_serving_chat


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
@with_cancellation
@load_aware_call
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    return await chat(raw_request).create_chat_completion(request, raw_request)
