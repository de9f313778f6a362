"""Errors of the speech path that callers (the offline API, the server) turn into clear answers."""

from __future__ import annotations


class SpeechUnavailable(RuntimeError):
    """Audio was asked of a checkpoint without talker/token2wav weights (or speaker table)."""


class UnknownVoice(ValueError):
    """A voice the checkpoint's speaker table does not have."""


class SpeechBusy(RuntimeError):
    """Load: the speech engine refused the request. `code` says why (one of the codes below, the
    server's error `code`); `retry_after` estimates the seconds until a retry would be taken
    (None: no estimate, e.g. on shutdown)."""

    QUEUE_FULL = "speech_queue_full"  # `max_waiting` requests are waiting for a speaking slot already
    WAIT_TIMEOUT = (
        "speech_wait_timeout"  # waited `queue_timeout` seconds without getting a slot
    )
    SHUTDOWN = "speech_engine_shutdown"  # the engine stopped while the request waited

    def __init__(
        self, message: str, *, code: str = QUEUE_FULL, retry_after: float | None = None
    ):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


class SpeechLoadError(RuntimeError):
    """The speech path failed to load (out of memory, tensors that do not match the config, an
    unusable dtype); the message names the flag to change."""
