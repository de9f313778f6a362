"""One realtime response: its settings, and the task that speaks it.

A session (`RealtimeConnection`) runs at most one response at a time, as a task, so that
client events (a barge-in above all) are read while it speaks. The response is a chat
completion request built from the session's conversation and run through the shared serving
core (`OmniServing.start` / `chunks`); this module turns its chunks into the Realtime API's
`response.*` events and ends every response, however it stops, with one `response.done`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import TYPE_CHECKING

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.logger import init_logger

from omni_vllm.api.audio import pcm16
from omni_vllm.api.errors import error_body
from omni_vllm.api.realtime import protocol as P
from omni_vllm.api.realtime.session import (
    Item,
    Part,
    check_max_tokens,
    check_modalities,
    check_no_tools,
    item_from_event,
)

if TYPE_CHECKING:
    from omni_vllm.api.realtime.connection import RealtimeConnection

logger = init_logger("omni_vllm.api.realtime")


class RealtimeResponse:
    """A response of the session `conn`: it is `conn.response` until its response.done is out."""

    def __init__(
        self,
        conn: RealtimeConnection,
        id: str,
        item: Item,
        modalities: tuple[str, ...],
        voice: str,
        max_output_tokens: int | str,
        to_conversation: bool,
        metadata: dict | None = None,
        event_id: str | None = None,
    ):
        self.conn, self.id, self.item = conn, id, item
        self.modalities, self.voice = modalities, voice
        self.max_output_tokens = max_output_tokens
        self.to_conversation = to_conversation
        # the response.create's `metadata`, shown in response.created / response.done as OpenAI
        # does (LiveKit matches its reply by it), and its event_id, which an error names
        self.metadata, self.event_id = metadata, event_id
        self.task: asyncio.Task | None = None
        self.cancel_reason: str | None = None

    @classmethod
    def start(
        cls, conn: RealtimeConnection, params, event_id: str | None
    ) -> RealtimeResponse:
        """Check a response.create's overrides, then run it as a task (so that new client events,
        a barge-in above all, are read while it speaks); the session keeps it as its
        `response`."""
        cfg = conn.config
        modalities, voice, max_out, instructions = (
            cfg.output_modalities,
            cfg.voice,
            cfg.max_output_tokens,
            None,
        )
        items, to_conversation, metadata = None, True, None
        if params is not None:
            check_no_tools(params, "response", event_id)
            metadata = params.metadata
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
                voice = conn.check_voice(
                    params.audio.output.voice, "response.audio.output.voice", event_id
                )
            if "max_output_tokens" in params.model_fields_set:
                max_out = check_max_tokens(
                    params.max_output_tokens, "response.max_output_tokens", event_id
                )
            instructions = params.instructions
            to_conversation = params.conversation != "none"
            if params.input is not None:
                items = [
                    item_from_event(i, event_id, conn.buffer.max_bytes)
                    for i in params.input
                ]
        if "audio" in modalities:
            try:
                conn.serving.core.need_speech("response.output_modalities")
            except Exception as e:
                raise P.ClientError(
                    str(e),
                    code="invalid_value",
                    param="output_modalities",
                    event_id=event_id,
                ) from None
        content_type = "output_audio" if "audio" in modalities else "output_text"
        resp = cls(
            conn,
            P.new_id("resp"),
            Item(P.new_id("item"), "assistant", [Part(content_type)], "in_progress"),
            modalities,
            voice,
            max_out,
            to_conversation,
            metadata,
            event_id,
        )
        resp.task = asyncio.create_task(resp._respond(instructions, items))
        return resp

    async def cancel(self, reason: str) -> None:
        """Stop the response now (its task sends the response.done "cancelled")."""
        if self.task is None:
            return
        self.cancel_reason = reason
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    def _budget(self, audio: bool) -> int:
        """Prompt tokens the response may use: the model length less its output, and with
        speech the talker's."""
        s, max_out = self.conn.serving, self.max_output_tokens
        out = max_out if isinstance(max_out, int) else min(1024, s.max_model_len // 4)
        budget = s.max_model_len - out
        if audio and s.talker_max_len:
            budget = min(budget, s.talker_max_len - 2)
        return budget

    async def _respond(
        self, instructions: str | None, items: list[Item] | None
    ) -> None:
        """The response's task: it is the session's running response until its
        response.done is out."""
        conn = self.conn
        try:
            await self._produce(instructions, items)
        finally:
            if conn.response is self:
                conn.response = None
            conn.last_active = time.monotonic()

    async def _produce(
        self, instructions: str | None, items: list[Item] | None
    ) -> None:
        conn = self.conn
        core, audio = conn.serving.core, "audio" in self.modalities
        part = self.item.parts[0]
        out = {
            "response_id": self.id,
            "item_id": self.item.id,
            "output_index": 0,
            "content_index": 0,
        }
        status, details, usage, final = "completed", None, None, None
        await conn.send(
            P.server_event("response.created", response=self.to_openai("in_progress"))
        )
        started = chunks = None
        try:
            keep, post_instructions = conn.config.truncation_limits()
            msgs, dropped = conn.conversation.messages(
                conn.config.instructions if instructions is None else instructions,
                items,
                self._budget(audio),
                conn.serving.count_text,
                keep,
                post_instructions,
            )
            for item in dropped if items is None else ():
                await conn.send(
                    P.server_event("conversation.item.deleted", item_id=item.id)
                )
            request = ChatCompletionRequest(
                model=conn.serving.model_name,
                messages=msgs,
                max_completion_tokens=self.max_output_tokens
                if isinstance(self.max_output_tokens, int)
                else None,
            )
            core.check_media(request.messages)
            t0 = time.monotonic()
            started = await core.start(
                request,
                request_id=self.id,
                voice=self.voice,
                audio=audio,
                max_codes=core.max_codes(None, "max_audio_tokens"),
            )
            if self.to_conversation:
                previous = conn.conversation.add(self.item)
            await conn.send(
                P.server_event(
                    "response.output_item.added",
                    response_id=self.id,
                    output_index=0,
                    item=self.item.to_openai(),
                )
            )
            if self.to_conversation:
                await conn.send(
                    P.server_event(
                        "conversation.item.added",
                        item=self.item.to_openai(),
                        previous_item_id=previous,
                    )
                )
            await conn.send(
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
                    await conn.send(P.server_event(delta, **out, delta=chunk.text))
                if audio and chunk.audio is not None and len(chunk.audio):
                    conn.spoken = True
                    part.audio_ms += len(chunk.audio) / P.SAMPLE_RATE * 1000
                    await conn.send(
                        P.server_event(
                            "response.output_audio.delta",
                            **out,
                            delta=base64.b64encode(pcm16(chunk.audio)).decode(),
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
                    "reason": self.cancel_reason or "client_cancelled",
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
            e.event_id = e.event_id or self.event_id
            await conn.send(P.client_error_event(e))
        except (
            Exception
        ) as e:  # refused by the core (prompt too long, busy, ...), or failed
            body = error_body(e)
            logger.info(
                "realtime response %s failed: %s", self.id, body.get("message") or e
            )
            code = body.get("code")
            err = {
                "type": body.get("type") or "server_error",
                "code": None if code is None else str(code),
                "message": body.get("message") or str(e),
            }
            status, details = "failed", {"type": "failed", "error": err}
            await conn.send(
                P.error_event(
                    err["message"],
                    err_type=err["type"],
                    code=err["code"],
                    param=body.get("param"),
                    event_id=self.event_id,
                )
            )
        finally:
            if (
                chunks is not None
            ):  # cancelled between chunks: close it, which aborts the request
                with contextlib.suppress(Exception):
                    await chunks.aclose()
        self.item.status = "completed" if status == "completed" else "incomplete"
        if started is not None:
            text = part.text
            if audio:
                await conn.send(P.server_event("response.output_audio.done", **out))
                await conn.send(
                    P.server_event(
                        "response.output_audio_transcript.done", **out, transcript=text
                    )
                )
            else:
                await conn.send(
                    P.server_event("response.output_text.done", **out, text=text)
                )
            done_part = (
                {"type": "audio", "transcript": text}
                if audio
                else {"type": "text", "text": text}
            )
            await conn.send(
                P.server_event("response.content_part.done", **out, part=done_part)
            )
            await conn.send(
                P.server_event(
                    "response.output_item.done",
                    response_id=self.id,
                    output_index=0,
                    item=self.item.to_openai(),
                )
            )
            if self.to_conversation:
                await conn.send(
                    P.server_event("conversation.item.done", item=self.item.to_openai())
                )
        elif self.to_conversation and self.item in conn.conversation.items:
            conn.conversation.items.remove(self.item)
        await conn.send(
            P.server_event(
                "response.done",
                response=self.to_openai(
                    status,
                    details,
                    usage,
                    output=[self.item.to_openai()] if started is not None else [],
                ),
            )
        )

    def to_openai(
        self,
        status: str,
        details: dict | None = None,
        usage=None,
        output: list | None = None,
    ) -> dict:
        """The response as the API's `realtime.response` object."""
        obj = {
            "id": self.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output or [],
            "output_modalities": list(self.modalities),
            "conversation_id": self.conn.id if self.to_conversation else None,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata,
            "audio": {
                "output": {
                    "format": {"type": "audio/pcm", "rate": P.SAMPLE_RATE},
                    "voice": self.voice,
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
