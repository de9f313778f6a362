"""GET /playground: a static page that talks to /v1/realtime from the browser (no build step).

The page (static/playground.html) is read once, at import: it has no templating, and the model name
and the WebSocket URL are found by the page itself (GET /v1/models, the page's own host).
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = (Path(__file__).parent / "static" / "playground.html").read_text(
    encoding="utf-8"
)

router = APIRouter()


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """The realtime playground: microphone in, the spoken reply out, the transcript shown."""
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})
