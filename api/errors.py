"""One error vocabulary for our routes, vLLM's, mapped once at the edge.

A request is refused by raising vLLM's own exceptions (`VLLMValidationError(message,
parameter=...)`: 400, `VLLMUnprocessableEntityError`: 422, `VLLMNotFoundError`: 404) or one of
the two below that vLLM has no class for: `RequestTooLargeError` (413) and `ServiceBusyError`
(503 for load, shaped like vLLM's `QueueOverflowError`, with a string `code` and Retry-After).
The model side raises its own exceptions (omni_vllm.errors: it knows no HTTP); `_MODEL_ERRORS`
maps them, in this one table. The edge turns any exception into an error response
(`error_response`), the error event of a started stream (`sse_error`, vLLM's streaming shape), or
the OpenAI error object (`error_body`) that a Realtime `error` event carries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import (
    create_error_response,
)
from vllm.exceptions import (
    GracefulHTTPError,
    VLLMClientError,
    VLLMError,
    VLLMUnprocessableEntityError,
    VLLMValidationError,
)

from omni_vllm.errors import SpeechBusy, SpeechUnavailable, UnknownVoice

__all__ = [
    "SSE_DONE",
    "RequestTooLargeError",
    "ServiceBusyError",
    "ServingError",
    "VLLMUnprocessableEntityError",
    "VLLMValidationError",
    "REFUSALS",
    "api_error",
    "error_body",
    "error_response",
    "sse_error",
]

SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream, also after an error event (as vLLM)

# The error `type` of each status, as vLLM names them.
_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    503: "ServiceUnavailableError",
}


class RequestTooLargeError(VLLMClientError):
    """413: a request body or media item over the server's limits (`parameter` names the item)."""

    def __init__(self, message: str, *, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


class ServiceBusyError(GracefulHTTPError):
    """503 for load, as vLLM's QueueOverflowError, with our string `code` saying why (OpenAI's codes
    are strings) and `retry_after`, the seconds until a retry would be taken (None: no estimate;
    the message and the Retry-After header give it rounded up)."""

    def __init__(self, message: str, *, code: str, retry_after: float | None = None):
        hint = (
            "" if retry_after is None else f"; retry after {math.ceil(retry_after)} s"
        )
        super().__init__(message + hint, HTTPStatus.SERVICE_UNAVAILABLE)
        self.code, self.retry_after = code, retry_after


class ServingError(VLLMError):
    """vLLM's serving layer answered with an ErrorResponse (unknown model, chat template, media):
    passed on to the client as it is."""

    def __init__(self, response: ErrorResponse):
        super().__init__(response.error.message)
        self.response = response

    @classmethod
    def of(cls, e: Exception) -> ServingError:
        """An exception raised by vLLM's own code, answered as vLLM's handlers answer it."""
        return cls(create_error_response(e))


# What a route answers itself, before its response starts (anything else goes to vLLM's handlers).
REFUSALS = (
    VLLMValidationError,
    VLLMUnprocessableEntityError,
    RequestTooLargeError,
    ServiceBusyError,
    ServingError,
)

# The model side's exceptions (omni_vllm.errors) in this vocabulary: the one place they meet HTTP.
_MODEL_ERRORS: dict[type, Callable[[Any], VLLMError]] = {
    SpeechBusy: lambda e: ServiceBusyError(
        str(e), code=e.code, retry_after=e.retry_after
    ),
    UnknownVoice: lambda e: VLLMValidationError(str(e), parameter="audio.voice"),
    SpeechUnavailable: lambda e: VLLMValidationError(
        f"this model cannot produce audio: {e}", parameter="modalities"
    ),
}


def api_error(e: BaseException) -> BaseException:
    """`e` in this vocabulary: a model-side exception mapped (`_MODEL_ERRORS`), else `e` itself."""
    for cls in type(e).__mro__:
        if (convert := _MODEL_ERRORS.get(cls)) is not None:
            return convert(e)
    return e


def _message(e: BaseException) -> str:
    # vLLM's validation errors append "(parameter=...)" to str(); the message stays the one raised.
    return str(e.args[0]) if e.args else str(e)


def _error(e: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) of any exception."""
    e = api_error(e)
    if isinstance(e, ServingError):
        return e.response.error.code, e.response.error.model_dump()
    if isinstance(e, ServiceBusyError):
        status, param, code = 503, None, e.code
    elif isinstance(e, RequestTooLargeError):
        status, param, code = 413, e.parameter, None
    elif isinstance(e, VLLMUnprocessableEntityError):
        status, param, code = 422, e.parameter, None
    elif isinstance(e, VLLMValidationError):
        status, param, code = 400, e.parameter, None
    else:  # anything else as vLLM maps it (404, 500 for an unexpected failure, ...)
        info = create_error_response(e).error
        return info.code, info.model_dump()
    info = create_error_response(
        _message(e),
        err_type=_TYPES[status],
        status_code=HTTPStatus(status),
        param=param,
    ).error.model_dump()
    if code is not None:
        info["code"] = code
    return status, info


def error_body(e: BaseException) -> dict:
    """The OpenAI error object {message, type, param, code} (a Realtime `error` event's `error`)."""
    return _error(e)[1]


def error_response(e: BaseException) -> JSONResponse:
    """The answer to a request refused before its response started, Retry-After for load."""
    status, body = _error(e)
    retry_after = getattr(api_error(e), "retry_after", None)
    headers = (
        None if retry_after is None else {"Retry-After": str(math.ceil(retry_after))}
    )
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def sse_error(e: BaseException) -> str:
    """The error event of a stream already started, in vLLM's shape; `SSE_DONE` follows it."""
    return f"data: {json.dumps({'error': error_body(e)})}\n\n"
