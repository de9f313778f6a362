"""Request limits of the HTTP API: body size, and inline media size, length and resolution.

Checked before vLLM parses or decodes anything, from headers only where a format has them (PyAV's
reader, PIL's lazy open), so that an oversized request costs a few milliseconds and a 413 rather
than the decoded media in memory. Media that vLLM fetches from
http(s) URLs gets the same limits through vLLM's own settings (`omni_vllm.api.server` sets them).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

from omni_vllm.api.errors import (
    RequestTooLargeError,
    VLLMUnprocessableEntityError,
    VLLMValidationError,
    error_body,
)


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int  # one inline item, decoded
    max_audio_seconds: float
    max_video_seconds: float
    max_image_pixels: int  # width x height of an image or of a video frame


def _b64decode(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VLLMValidationError(
            f"{param}: invalid base64 data ({e})", parameter=param
        ) from None


def _too_long(
    param: str, what: str, seconds: float, limit: float
) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"{param}: {what} is {seconds:.1f} s long, the limit is {limit:g} s",
        parameter=param,
    )


def _too_large(
    param: str, what: str, w: int, h: int, limit: int
) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"{param}: {what} is {w}x{h} ({w * h} pixels), the limit is {limit} pixels",
        parameter=param,
    )


# What browsers, phones and files send: FFmpeg (PyAV) opens them all here; vLLM's audio loader then
# decodes them with libsndfile or, for what libsndfile does not read, FFmpeg.
AUDIO_FORMATS = "WAV, FLAC, MP3, OGG (Opus, Vorbis), WebM (Opus), M4A/MP4 (AAC) or AAC"


def _ffmpeg_reason(e: Exception) -> str:
    """FFmpeg's own words for an error ("Invalid data found when processing input"), without errno or path."""
    return getattr(e, "strerror", None) or type(e).__name__


def _audio_seconds(container, stream) -> float | None:
    """Length from the headers (for raw AAC, FFmpeg's estimate from the bit rate); where they have
    none (a WebM from MediaRecorder), from the packets' timestamps (demuxed, nothing decoded)."""
    import av

    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base:
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
    return end


def _check_audio(raw: bytes, param: str, limits: MediaLimits) -> None:
    """An audio file FFmpeg can open, with an audio stream, no longer than the limit (headers only;
    vLLM's decoder enforces the same limit again while decoding)."""
    import av

    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            stream = container.streams.audio[0] if container.streams.audio else None
            seconds = None if stream is None else _audio_seconds(container, stream)
    except Exception as e:  # noqa: BLE001 - FFmpeg's errors are many; we report its reason
        raise VLLMUnprocessableEntityError(
            f"{param}: the audio could not be decoded ({_ffmpeg_reason(e)}); send {AUDIO_FORMATS}",
            parameter=param,
        ) from None
    if stream is None:
        raise VLLMUnprocessableEntityError(
            f"{param}: the file has no audio stream; send {AUDIO_FORMATS}",
            parameter=param,
        )
    if seconds is not None and seconds > limits.max_audio_seconds:
        raise _too_long(param, "audio", seconds, limits.max_audio_seconds)


def _check_image(raw: bytes, param: str, limits: MediaLimits) -> None:
    """Pixels from the header (PIL decodes lazily); undecodable bytes are left to vLLM's 400."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
    except (
        Image.DecompressionBombError
    ) as e:  # PIL's own limit, far above any sane setting of ours
        raise RequestTooLargeError(
            f"{param}: the image has too many pixels ({e})", parameter=param
        ) from None
    except Exception:  # noqa: BLE001 - any other reader error: vLLM reports it
        return
    if w * h > limits.max_image_pixels:
        raise _too_large(param, "the image", w, h, limits.max_image_pixels)


def _check_video(raw: bytes, param: str, limits: MediaLimits) -> None:
    """Duration and frame size from the container (PyAV reads headers, decodes nothing)."""
    import av

    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            video = container.streams.video[0] if container.streams.video else None
            seconds = container.duration / av.time_base if container.duration else None
            if (
                video is not None
                and seconds is None
                and video.duration
                and video.time_base
            ):
                seconds = float(video.duration * video.time_base)
    except Exception:  # noqa: BLE001 - FFmpeg's errors are many; none is ours to distinguish
        raise VLLMUnprocessableEntityError(
            f"{param}: the video could not be decoded (send MP4, WebM, MKV or AVI)",
            parameter=param,
        ) from None
    if video is None:
        raise VLLMUnprocessableEntityError(
            f"{param}: the file has no video stream", parameter=param
        )
    if seconds is not None and seconds > limits.max_video_seconds:
        raise _too_long(param, "the video", seconds, limits.max_video_seconds)
    w, h = video.codec_context.width, video.codec_context.height
    if w * h > limits.max_image_pixels:
        raise _too_large(param, "a video frame", w, h, limits.max_image_pixels)


_CHECKS = {
    "input_audio": _check_audio,
    "audio_url": _check_audio,
    "image_url": _check_image,
    "video_url": _check_video,
}


def check_message_media(messages: list, limits: MediaLimits) -> None:
    """Raise VLLMValidationError (400), RequestTooLargeError (413) or VLLMUnprocessableEntityError (422) for inline media (data URLs, `input_audio`) that is malformed or too big."""
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _CHECKS:
                continue
            param = f"messages[{i}].content[{j}]"
            if kind == "input_audio":
                data = (part.get("input_audio") or {}).get("data") or ""
            else:
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or url[:5].lower() != "data:":
                    continue
                head, _, data = url.partition(",")
                if not head.endswith(";base64"):
                    continue  # vLLM answers non-base64 data URLs itself
            if not isinstance(data, str):
                continue  # a wrong type: vLLM's request model rejects it
            if len(data) * 3 // 4 > limits.max_bytes:
                raise RequestTooLargeError(
                    f"{param}: media is larger than the server's limit of "
                    f"{limits.max_bytes / 2**20:g} MiB",
                    parameter=param,
                )
            _CHECKS[kind](_b64decode(data, param), param, limits)


class BodySizeLimit:
    """ASGI middleware: request bodies over `max_bytes` are answered 413 before any route reads
    them (by Content-Length at once; a chunked body as soon as it passes the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        if (
            length is not None
            or b"chunked" not in headers.get(b"transfer-encoding", b"").lower()
        ):
            return await self.app(
                scope, receive, send
            )  # sized, or no body (GET /health, /metrics, ...)
        # Chunked: buffer up to the limit, then replay it to the app.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        err = RequestTooLargeError(
            f"the request body is larger than the server's limit of {self.max_bytes / 2**20:g} MiB"
        )
        body = json.dumps({"error": error_body(err)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
