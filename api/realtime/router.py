"""The WebSocket route `/v1/realtime?model=...` (what `client.realtime.connect()` opens)."""

from fastapi import APIRouter, WebSocket

router = APIRouter()


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    """OpenAI's Realtime API (GA events): speech to speech, server VAD, barge-in (api/README.md)."""
    await websocket.app.state.omni_realtime.handle(websocket)
