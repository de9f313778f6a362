"""Realtime API events on the wire, with the `openai` SDK's own GA types as the schema.

Client events are validated with a TypeAdapter over `RealtimeClientEvent` (the union the SDK's
`client.realtime.connect()` sends); server events are built through the SDK's server event models,
so that what we send is what the SDK parses. A client mistake is a `ClientError`, answered with an
`error` event (the OpenAI error object, with the offending event's `event_id`), never a close.
"""

from __future__ import annotations

import base64
import binascii
import json
import typing
import uuid
from typing import Any

from openai.types.realtime.realtime_client_event import RealtimeClientEvent
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from pydantic import ValidationError

# type name -> the SDK's model of that server event
SERVER_EVENTS: dict[str, type] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(RealtimeServerEvent)[0])
    if hasattr(cls, "model_fields")
}
# type name -> the SDK's model of that client event (the members of RealtimeClientEvent: the union's
# discriminator is the SDK's own metadata, so each event is validated against its own model)
CLIENT_EVENTS: dict[str, type] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(RealtimeClientEvent)[0])
}

SAMPLE_RATE = 24000  # audio/pcm, in and out: 16-bit little-endian mono


class ClientError(Exception):
    """A bad client event: becomes an `error` event; the socket stays open."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_request_error",
        param: str | None = None,
        event_id: str | None = None,
        err_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.code, self.param, self.event_id, self.err_type = (
            code,
            param,
            event_id,
            err_type,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def parse_client_event(raw: str | bytes) -> Any:
    """One client event (an SDK model), or ClientError naming what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as e:
        raise ClientError(
            f"the message is not JSON: {e}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ClientError(
            'an event is a JSON object with a "type"', code="invalid_event"
        )
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if kind not in CLIENT_EVENTS:
        raise ClientError(
            f"unknown event type {kind!r}; this server accepts {', '.join(sorted(CLIENT_EVENTS))}",
            code="invalid_event_type",
            param="type",
            event_id=event_id,
        )
    try:
        return CLIENT_EVENTS[kind].model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        where = ".".join(str(p) for p in errors[0]["loc"])
        what = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in errors[:4]
        )
        raise ClientError(
            f"invalid {kind} event: {what}",
            code="invalid_value",
            param=where or None,
            event_id=event_id,
        ) from None


def decode_audio(data: str, param: str, event_id: str | None) -> bytes:
    """base64 pcm16 from a client event (a whole number of 16-bit samples)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ClientError(
            f"{param}: invalid base64 data ({e})",
            code="invalid_audio",
            param=param,
            event_id=event_id,
        ) from None
    if len(raw) % 2:
        raise ClientError(
            f"{param}: pcm16 audio has an even number of bytes, got {len(raw)}",
            code="invalid_audio",
            param=param,
            event_id=event_id,
        )
    return raw


def server_event(kind: str, **fields) -> dict:
    """A server event of type `kind`, checked against the SDK's model of it, as a JSON-ready dict
    (fields left out stay out; fields set to None are sent as null)."""
    model = SERVER_EVENTS[kind].model_validate(
        {"type": kind, "event_id": new_id("event"), **fields}
    )
    return model.model_dump(mode="json", exclude_unset=True)


def error_event(
    message: str,
    *,
    err_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    event_id: str | None = None,
) -> dict:
    error = {
        "message": message,
        "type": err_type,
        "code": code,
        "param": param,
        "event_id": event_id,
    }
    return server_event("error", error=error)


def client_error_event(e: ClientError) -> dict:
    return error_event(
        str(e), err_type=e.err_type, code=e.code, param=e.param, event_id=e.event_id
    )
