"""One realtime session on its WebSocket: its event loop and the client events.

`RealtimeServing` (serving.py) is app-wide and makes one `RealtimeConnection` per socket.
The connection reads client events (a bad one is an `error` event, and the session goes on),
keeps the session's config, input audio buffer, server VAD and conversation, and closes the
socket for the session limits; the response it is running is a `RealtimeResponse`
(response.py), a task, so that events (a barge-in above all) are read while it speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket, WebSocketDisconnect
from vllm.logger import init_logger

from omni_vllm.api.realtime import protocol as P
from omni_vllm.api.realtime.response import RealtimeResponse
from omni_vllm.api.realtime.session import (
    Conversation,
    InputAudioBuffer,
    Item,
    Part,
    SessionConfig,
    apply_session_update,
    item_from_event,
)
from omni_vllm.api.realtime.vad import ServerVad

if TYPE_CHECKING:
    from omni_vllm.api.realtime.serving import RealtimeServing

logger = init_logger("omni_vllm.api.realtime")

CLOSE_POLICY, CLOSE_TRY_AGAIN = 1008, 1013


class RealtimeConnection:
    """One realtime session on its socket."""

    def __init__(self, serving: RealtimeServing, ws: WebSocket):
        self.serving, self.ws = serving, ws
        self.id = P.new_id("sess")
        self.config = SessionConfig(serving.instructions, serving.default_voice)
        self.buffer = InputAudioBuffer(serving.limits.max_input_audio_seconds)
        self.conversation = Conversation()
        self.vad: ServerVad | None = None
        self.response: RealtimeResponse | None = None
        self.spoken = False  # the voice is fixed once audio went out
        self._speech_item = ""  # the item the speech VAD heard will be committed as
        self._send_lock = asyncio.Lock()
        self._closed = False
        self.last_active = time.monotonic()

    # ------------------------------------------------------------------ socket

    async def send(self, event: dict) -> None:
        if self._closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_json(event)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True

    async def close(self, code: int, reason: str) -> None:
        logger.info("realtime session %s closed: %s", self.id, reason)
        await self._cancel_response("client_cancelled")
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason[:120])

    async def run(self) -> None:
        limits, t_end = (
            self.serving.limits,
            time.monotonic() + self.serving.limits.max_session_seconds,
        )
        await self._make_vad()
        await self.send(P.server_event("session.created", session=self._session()))
        try:
            while not self._closed:
                now = time.monotonic()
                if self.response is not None:
                    self.last_active = now  # a session listening to a reply is not idle
                idle_left = self.last_active + limits.idle_seconds - now
                if t_end <= now:
                    return await self.close(
                        CLOSE_POLICY,
                        f"session length limit of {limits.max_session_seconds:g} s "
                        "reached (--realtime-max-session-seconds)",
                    )
                if idle_left <= 0:
                    return await self.close(
                        CLOSE_POLICY,
                        f"idle for {limits.idle_seconds:g} s (--realtime-idle-seconds)",
                    )
                try:
                    msg = await asyncio.wait_for(
                        self.ws.receive(), timeout=min(idle_left, t_end - now, 5.0)
                    )
                except TimeoutError:
                    continue
                if msg["type"] == "websocket.disconnect":
                    self._closed = True
                    return
                self.last_active = time.monotonic()
                raw = (
                    msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                )
                try:
                    await self.on_event(P.parse_client_event(raw))
                except P.ClientError as e:
                    await self.send(P.client_error_event(e))
                except (
                    Exception
                ) as e:  # a bug of ours: said, logged, and the session goes on
                    logger.exception("realtime session %s: event failed", self.id)
                    await self.send(
                        P.error_event(
                            f"the server failed on this event: {e}",
                            err_type="server_error",
                            code="server_error",
                        )
                    )
        except WebSocketDisconnect:
            self._closed = True
        finally:
            await self._cancel_response("client_cancelled")

    def _session(self) -> dict:
        return self.config.to_openai(self.serving.model_name, self.id)

    async def _make_vad(self) -> None:
        settings = self.config.vad_settings()
        self.vad = (
            None if settings is None else await asyncio.to_thread(ServerVad, settings)
        )  # ~30 ms: a jit load

    def check_voice(self, name: Any, param: str, event_id: str | None) -> str:
        try:
            return self.serving.core.voice(name, param)
        except Exception as e:  # the core's 400 for an unknown voice
            raise P.ClientError(
                str(e), code="invalid_value", param=param, event_id=event_id
            ) from None

    # ------------------------------------------------------------------ client events

    async def on_event(self, ev) -> None:
        handler = getattr(self, "on_" + ev.type.replace(".", "_"))
        await handler(ev)

    async def on_session_update(self, ev) -> None:
        old_td = self.config.turn_detection
        self.config = apply_session_update(
            self.config,
            ev.session,
            lambda v, p: self.check_voice(v, p, ev.event_id),
            ev.event_id,
            voice_locked=self.spoken,
        )
        if self.config.turn_detection != old_td:
            await self._make_vad()
        await self.send(P.server_event("session.updated", session=self._session()))

    async def on_input_audio_buffer_append(self, ev) -> None:
        pcm = P.decode_audio(ev.audio, "audio", ev.event_id)
        self.buffer.append(pcm, ev.event_id)
        if self.vad is None:
            return
        events = await asyncio.to_thread(self.vad.feed, pcm)
        td = self.config.turn_detection
        for vad_event in events:
            if vad_event.kind == "speech_started":
                self._speech_item = P.new_id("item")
                await self.send(
                    P.server_event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=vad_event.ms,
                        item_id=self._speech_item,
                    )
                )
                if self.response is not None and td.get("interrupt_response", True):
                    await self._cancel_response("turn_detected")  # barge-in: at once
            else:
                await self.send(
                    P.server_event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=vad_event.ms,
                        item_id=self._speech_item,
                    )
                )
                await self._commit(None, self._speech_item)
                if td.get("create_response", True) and self.response is None:
                    self.response = RealtimeResponse.start(self, None, None)
        if not self.vad.speaking:
            self.buffer.keep_last(td["prefix_padding_ms"])

    async def on_input_audio_buffer_commit(self, ev) -> None:
        if not self.buffer.data:
            raise P.ClientError(
                "the input audio buffer is empty: append audio before committing",
                code="input_audio_buffer_commit_empty",
                event_id=ev.event_id,
            )
        await self._commit(ev.event_id, P.new_id("item"))

    async def on_input_audio_buffer_clear(self, ev) -> None:
        self.buffer.take()
        if self.vad is not None:
            self.vad.reset()
        await self.send(P.server_event("input_audio_buffer.cleared"))

    async def on_output_audio_buffer_clear(self, ev) -> None:
        raise P.ClientError(
            "output_audio_buffer.clear is for WebRTC and SIP connections; on a WebSocket, "
            "send response.cancel and conversation.item.truncate",
            code="unsupported_event",
            event_id=ev.event_id,
        )

    async def on_conversation_item_create(self, ev) -> None:
        item = item_from_event(ev.item, ev.event_id, self.buffer.max_bytes)
        previous = self.conversation.add(item, ev.previous_item_id, ev.event_id)
        await self._item_added(item, previous)

    async def on_conversation_item_retrieve(self, ev) -> None:
        item = self.conversation.find(ev.item_id, ev.event_id)
        await self.send(
            P.server_event(
                "conversation.item.retrieved", item=item.to_openai(with_audio=True)
            )
        )

    async def on_conversation_item_delete(self, ev) -> None:
        self.conversation.delete(ev.item_id, ev.event_id)
        await self.send(P.server_event("conversation.item.deleted", item_id=ev.item_id))

    async def on_conversation_item_truncate(self, ev) -> None:
        if self.response is not None and self.response.item.id == ev.item_id:
            await self._cancel_response(
                "client_cancelled"
            )  # truncating the reply being made: stop it first
        self.conversation.truncate(
            ev.item_id, ev.content_index, ev.audio_end_ms, ev.event_id
        )
        await self.send(
            P.server_event(
                "conversation.item.truncated",
                item_id=ev.item_id,
                content_index=ev.content_index,
                audio_end_ms=ev.audio_end_ms,
            )
        )

    async def on_response_create(self, ev) -> None:
        if self.response is not None:
            raise P.ClientError(
                f"conversation already has an active response in progress: {self.response.id}; "
                "cancel it or wait for its response.done",
                code="conversation_already_has_active_response",
                event_id=ev.event_id,
            )
        self.response = RealtimeResponse.start(self, ev.response, ev.event_id)

    async def on_response_cancel(self, ev) -> None:
        if self.response is None or (
            ev.response_id and ev.response_id != self.response.id
        ):
            raise P.ClientError(
                "no response in progress to cancel"
                if self.response is None
                else f"response {ev.response_id!r} is not in progress",
                code="response_cancel_not_active",
                param="response_id",
                event_id=ev.event_id,
            )
        await self._cancel_response("client_cancelled")

    # ------------------------------------------------------------------ turns

    async def _commit(self, event_id: str | None, item_id: str) -> None:
        pcm = self.buffer.take()
        if self.vad is not None:
            self.vad.reset()
        item = Item(item_id, "user", [Part("input_audio", audio=pcm)])
        previous = self.conversation.add(item, None, event_id)
        await self.send(
            P.server_event(
                "input_audio_buffer.committed",
                item_id=item.id,
                previous_item_id=previous,
            )
        )
        await self._item_added(item, previous)

    async def _item_added(self, item: Item, previous: str | None) -> None:
        await self.send(
            P.server_event(
                "conversation.item.added",
                item=item.to_openai(),
                previous_item_id=previous,
            )
        )
        await self.send(
            P.server_event(
                "conversation.item.done",
                item=item.to_openai(),
                previous_item_id=previous,
            )
        )

    async def _cancel_response(self, reason: str) -> None:
        """Stop the running response, if any, now."""
        if self.response is not None:
            await self.response.cancel(reason)
