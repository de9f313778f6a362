"""Errors of the speech path that callers (the offline API, the server) turn into clear answers."""


class SpeechUnavailable(RuntimeError):
    """Audio was asked of a checkpoint without talker/token2wav weights (or speaker table)."""


class UnknownVoice(ValueError):
    """A voice the checkpoint's speaker table does not have."""


class SpeechBusy(RuntimeError):
    """Back-pressure: the speech engine is at its limit and the request was refused."""


class SpeechLoadError(RuntimeError):
    """The speech path failed to load (out of memory, tensors that do not match the config, an
    unusable dtype); the message names the flag to change."""
