"""OpenAI's Realtime API (GA) on a WebSocket: speech to speech with Qwen2.5-Omni.

`RealtimeServing` is app-wide (the limits, the sessions at once); `RealtimeConnection` is one
session. Each response is a chat completion request built from the session's conversation and run
through the shared serving core (`OmniServing.start` / `chunks`: the same SpeechEngine as every
other request, batched with them). Client mistakes are `error` events; the socket closes only for
the limits (1008 with the reason; 1013 when the server has too many sessions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.logger import init_logger

from omni_vllm.api.errors import error_body
from omni_vllm.api.realtime import protocol as P
from omni_vllm.api.realtime.session import (
    Conversation,
    InputAudioBuffer,
    Item,
    Part,
    SessionConfig,
    apply_session_update,
    check_max_tokens,
    check_modalities,
    item_from_event,
)
from omni_vllm.api.realtime.vad import ServerVad
from omni_vllm.api.serving import SPEECH_SYSTEM_PROMPT

logger = init_logger("omni_vllm.api.realtime")

CLOSE_POLICY, CLOSE_TRY_AGAIN = 1008, 1013


@dataclass
class RealtimeLimits:
    """`--realtime-*` flags (omni_vllm.api.server)."""

    max_sessions: int = 32
    max_session_seconds: float = 1800.0
    max_input_audio_seconds: float = 120.0
    idle_seconds: float = 300.0


class RealtimeServing:
    """The sessions of one server, on the serving core `core` (OmniServing's interface)."""

    def __init__(
        self,
        core,
        limits: RealtimeLimits,
        *,
        model_name: str,
        instructions: str,
        default_voice: str,
        max_model_len: int,
        talker_max_len: int | None,
        count_text,
    ):
        self.core, self.limits = core, limits
        self.model_name, self.instructions, self.default_voice = (
            model_name,
            instructions,
            default_voice,
        )
        self.max_model_len, self.talker_max_len, self.count_text = (
            max_model_len,
            talker_max_len,
            count_text,
        )
        self.sessions: set[RealtimeConnection] = set()

    @classmethod
    def create(cls, core, state, model_config) -> RealtimeServing:
        """On the serving core (`app.state.omni_serving`), with the server's settings."""
        s, speech = core.settings, core.speech
        tokenizer = core.chat.renderer.tokenizer
        limits = RealtimeLimits(
            s.realtime_max_sessions,
            s.realtime_max_session_seconds,
            s.realtime_max_input_audio_seconds,
            s.realtime_idle_seconds,
        )
        return cls(
            core,
            limits,
            model_name=state.openai_serving_models.base_model_paths[0].name,
            instructions=SPEECH_SYSTEM_PROMPT,
            default_voice=s.speech.default_voice,
            max_model_len=model_config.max_model_len,
            talker_max_len=speech.talker_max_len
            if speech is not None and speech.has_speech
            else None,
            count_text=lambda text: (
                len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
            ),
        )

    async def handle(self, ws: WebSocket) -> None:
        await ws.accept()
        model = ws.query_params.get("model")
        if model and model != self.model_name:
            await ws.send_json(
                P.error_event(
                    f"the model {model!r} does not exist; this server has "
                    f"{self.model_name!r}",
                    code="model_not_found",
                    param="model",
                )
            )
            await ws.close(CLOSE_POLICY, f"unknown model {model!r}"[:120])
            return
        if len(self.sessions) >= self.limits.max_sessions:
            await ws.close(
                CLOSE_TRY_AGAIN,
                f"server has {self.limits.max_sessions} realtime sessions "
                "(--realtime-max-sessions); try again later",
            )
            return
        conn = RealtimeConnection(self, ws)
        self.sessions.add(conn)
        try:
            await conn.run()
        finally:
            self.sessions.discard(conn)


@dataclass
class _Response:
    id: str
    item: Item
    modalities: tuple[str, ...]
    voice: str
    max_output_tokens: int | str
    to_conversation: bool
    task: asyncio.Task | None = None
    cancel_reason: str | None = None


class RealtimeConnection:
    """One realtime session on its socket."""

    def __init__(self, serving: RealtimeServing, ws: WebSocket):
        self.serving, self.ws = serving, ws
        self.id = P.new_id("sess")
        self.config = SessionConfig(serving.instructions, serving.default_voice)
        self.buffer = InputAudioBuffer(serving.limits.max_input_audio_seconds)
        self.conversation = Conversation()
        self.vad: ServerVad | None = None
        self.response: _Response | None = None
        self.spoken = False  # the voice is fixed once audio went out
        self._speech_item = ""  # the item the speech VAD heard will be committed as
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._last_active = time.monotonic()

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
                    self._last_active = (
                        now  # a session listening to a reply is not idle
                    )
                idle_left = self._last_active + limits.idle_seconds - now
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
                self._last_active = time.monotonic()
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

    def _voice(self, name: Any, param: str, event_id: str | None) -> str:
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
            lambda v, p: self._voice(v, p, ev.event_id),
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
                    await self._start_response(None, None)
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
        await self._start_response(ev.response, ev.event_id)

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

    async def _start_response(self, params, event_id: str | None) -> None:
        """Check a response.create's overrides, then run it as a task (so that new client events,
        a barge-in above all, are read while it speaks)."""
        cfg = self.config
        modalities, voice, max_out, instructions = (
            cfg.output_modalities,
            cfg.voice,
            cfg.max_output_tokens,
            None,
        )
        items, to_conversation = None, True
        if params is not None:
            modalities = (
                check_modalities(
                    params.output_modalities, "response.output_modalities", event_id
                )
                or modalities
            )
            if (
                params.audio is not None
                and params.audio.output is not None
                and params.audio.output.voice
            ):
                voice = self._voice(
                    params.audio.output.voice, "response.audio.output.voice", event_id
                )
            if "max_output_tokens" in params.model_fields_set:
                max_out = check_max_tokens(
                    params.max_output_tokens, "response.max_output_tokens", event_id
                )
            instructions = params.instructions
            to_conversation = params.conversation != "none"
            if params.tools:
                raise P.ClientError(
                    "tools are not supported by this server",
                    code="unsupported_value",
                    param="response.tools",
                    event_id=event_id,
                )
            if params.input is not None:
                items = [
                    item_from_event(i, event_id, self.buffer.max_bytes)
                    for i in params.input
                ]
        if "audio" in modalities:
            try:
                self.serving.core.need_speech("response.output_modalities")
            except Exception as e:
                raise P.ClientError(
                    str(e),
                    code="invalid_value",
                    param="output_modalities",
                    event_id=event_id,
                ) from None
        content_type = "output_audio" if "audio" in modalities else "output_text"
        resp = _Response(
            P.new_id("resp"),
            Item(P.new_id("item"), "assistant", [Part(content_type)], "in_progress"),
            modalities,
            voice,
            max_out,
            to_conversation,
        )
        self.response = resp
        resp.task = asyncio.create_task(self._respond(resp, instructions, items))

    async def _cancel_response(self, reason: str) -> None:
        """Stop the running response now (its task sends the response.done "cancelled")."""
        resp = self.response
        if resp is None or resp.task is None:
            return
        resp.cancel_reason = reason
        resp.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await resp.task

    def _budget(self, max_out: int | str, audio: bool) -> int:
        """Prompt tokens a response may use: the model length less its output, and with speech the talker's."""
        s = self.serving
        out = max_out if isinstance(max_out, int) else min(1024, s.max_model_len // 4)
        budget = s.max_model_len - out
        if audio and s.talker_max_len:
            budget = min(budget, s.talker_max_len - 2)
        return budget

    async def _respond(
        self, resp: _Response, instructions: str | None, items: list[Item] | None
    ) -> None:
        """A response's task: it is the session's running response until its response.done is out."""
        try:
            await self._produce(resp, instructions, items)
        finally:
            if self.response is resp:
                self.response = None
            self._last_active = time.monotonic()

    async def _produce(
        self, resp: _Response, instructions: str | None, items: list[Item] | None
    ) -> None:
        core, audio = self.serving.core, "audio" in resp.modalities
        part = resp.item.parts[0]
        out = {
            "response_id": resp.id,
            "item_id": resp.item.id,
            "output_index": 0,
            "content_index": 0,
        }
        status, details, usage, final = "completed", None, None, None
        await self.send(
            P.server_event(
                "response.created", response=self._response_obj(resp, "in_progress")
            )
        )
        started = chunks = None
        try:
            msgs, dropped = self.conversation.messages(
                self.config.instructions if instructions is None else instructions,
                items,
                self._budget(resp.max_output_tokens, audio),
                self.serving.count_text,
            )
            for item in dropped if items is None else ():
                await self.send(
                    P.server_event("conversation.item.deleted", item_id=item.id)
                )
            request = ChatCompletionRequest(
                model=self.serving.model_name,
                messages=msgs,
                max_completion_tokens=resp.max_output_tokens
                if isinstance(resp.max_output_tokens, int)
                else None,
            )
            core.check_media(request.messages)
            t0 = time.monotonic()
            started = await core.start(
                request,
                request_id=resp.id,
                voice=resp.voice,
                audio=audio,
                max_codes=core.max_codes(None, "max_audio_tokens"),
            )
            if resp.to_conversation:
                previous = self.conversation.add(resp.item)
            await self.send(
                P.server_event(
                    "response.output_item.added",
                    response_id=resp.id,
                    output_index=0,
                    item=resp.item.to_openai(),
                )
            )
            if resp.to_conversation:
                await self.send(
                    P.server_event(
                        "conversation.item.added",
                        item=resp.item.to_openai(),
                        previous_item_id=previous,
                    )
                )
            await self.send(
                P.server_event(
                    "response.content_part.added",
                    **out,
                    part={"type": "audio" if audio else "text"},
                )
            )
            delta = (
                "response.output_audio_transcript.delta"
                if audio
                else "response.output_text.delta"
            )
            chunks = core.chunks(started, t0)
            async for chunk in chunks:
                if chunk.text:
                    part.text += chunk.text
                    await self.send(P.server_event(delta, **out, delta=chunk.text))
                if audio and chunk.audio is not None and len(chunk.audio):
                    self.spoken = True
                    part.audio_ms += len(chunk.audio) / P.SAMPLE_RATE * 1000
                    await self.send(
                        P.server_event(
                            "response.output_audio.delta",
                            **out,
                            delta=base64.b64encode(_pcm16(chunk.audio)).decode(),
                        )
                    )
                if chunk.finished:
                    final = chunk
            if final is not None and final.finish_reason == "length":
                status, details = (
                    "incomplete",
                    {"type": "incomplete", "reason": "max_output_tokens"},
                )
            if final is not None:
                usage = core.usage(final, started.mm_counts)
        except asyncio.CancelledError:
            status, details = (
                "cancelled",
                {
                    "type": "cancelled",
                    "reason": resp.cancel_reason or "client_cancelled",
                },
            )
        except P.ClientError as e:
            status, details = (
                "failed",
                {
                    "type": "failed",
                    "error": {"type": e.err_type, "code": e.code, "message": str(e)},
                },
            )
            await self.send(P.client_error_event(e))
        except (
            Exception
        ) as e:  # refused by the core (prompt too long, busy, ...), or failed
            body = error_body(e)
            logger.info(
                "realtime response %s failed: %s", resp.id, body.get("message") or e
            )
            code = body.get("code")
            err = {
                "type": body.get("type") or "server_error",
                "code": None if code is None else str(code),
                "message": body.get("message") or str(e),
            }
            status, details = "failed", {"type": "failed", "error": err}
            await self.send(
                P.error_event(
                    err["message"],
                    err_type=err["type"],
                    code=err["code"],
                    param=body.get("param"),
                )
            )
        finally:
            if (
                chunks is not None
            ):  # cancelled between chunks: close it, which aborts the request
                with contextlib.suppress(Exception):
                    await chunks.aclose()
        resp.item.status = "completed" if status == "completed" else "incomplete"
        if started is not None:
            text = part.text
            if audio:
                await self.send(P.server_event("response.output_audio.done", **out))
                await self.send(
                    P.server_event(
                        "response.output_audio_transcript.done", **out, transcript=text
                    )
                )
            else:
                await self.send(
                    P.server_event("response.output_text.done", **out, text=text)
                )
            done_part = (
                {"type": "audio", "transcript": text}
                if audio
                else {"type": "text", "text": text}
            )
            await self.send(
                P.server_event("response.content_part.done", **out, part=done_part)
            )
            await self.send(
                P.server_event(
                    "response.output_item.done",
                    response_id=resp.id,
                    output_index=0,
                    item=resp.item.to_openai(),
                )
            )
            if resp.to_conversation:
                await self.send(
                    P.server_event("conversation.item.done", item=resp.item.to_openai())
                )
        elif resp.to_conversation and resp.item in self.conversation.items:
            self.conversation.items.remove(resp.item)
        await self.send(
            P.server_event(
                "response.done",
                response=self._response_obj(
                    resp,
                    status,
                    details,
                    usage,
                    output=[resp.item.to_openai()] if started is not None else [],
                ),
            )
        )

    def _response_obj(
        self,
        resp: _Response,
        status: str,
        details: dict | None = None,
        usage=None,
        output: list | None = None,
    ) -> dict:
        obj = {
            "id": resp.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output or [],
            "output_modalities": list(resp.modalities),
            "conversation_id": self.id if resp.to_conversation else None,
            "max_output_tokens": resp.max_output_tokens,
            "audio": {
                "output": {
                    "format": {"type": "audio/pcm", "rate": P.SAMPLE_RATE},
                    "voice": resp.voice,
                }
            },
        }
        if usage is not None:
            pd, cd = usage.prompt_tokens_details, usage.completion_tokens_details
            audio_in = (pd.audio_tokens or 0) if pd else 0
            audio_out = (cd.audio_tokens or 0) if cd else 0
            obj["usage"] = {
                "total_tokens": usage.total_tokens,
                "input_tokens": usage.prompt_tokens,
                "output_tokens": usage.completion_tokens,
                "input_token_details": {
                    "audio_tokens": audio_in,
                    "text_tokens": usage.prompt_tokens - audio_in,
                    "image_tokens": (pd.image_tokens or 0) if pd else 0,
                    "cached_tokens": 0,
                },
                "output_token_details": {
                    "audio_tokens": audio_out,
                    "text_tokens": usage.completion_tokens - audio_out,
                },
            }
        return obj


def _pcm16(audio) -> bytes:
    from omni_vllm.api.audio import pcm16

    return pcm16(audio)
