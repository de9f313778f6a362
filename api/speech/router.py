"""The routes of POST /v1/audio/speech and GET /v1/audio/voices."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
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


@router.get("/v1/audio/voices")
async def list_voices(raw_request: Request):
    """The voices this server speaks with, each with its aliases (OpenAI's voice names)."""
    return JSONResponse(raw_request.app.state.omni_serving.voices())
