"""The route of POST /v1/audio/speech."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from vllm.entrypoints.serve.utils.api_utils import (
    validate_json_request,
    with_cancellation,
)

from omni_vllm.api.speech.protocol import SpeechRequest
from omni_vllm.api.speech.serving import OmniServingSpeech

router = APIRouter()


def speech(request: Request) -> OmniServingSpeech:
    return request.app.state.omni_serving_speech


@router.post("/v1/audio/speech", dependencies=[Depends(validate_json_request)])
@with_cancellation
async def create_speech(request: SpeechRequest, raw_request: Request):
    return await speech(raw_request).create_speech(request, raw_request)
