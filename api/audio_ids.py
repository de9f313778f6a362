"""Assistant `audio.id`s that any replica accepts: the id carries its transcript and expiry, signed.

A later turn may send an assistant reply back as `{"role": "assistant", "audio": {"id": ...}}`; the
server needs only the reply's transcript to rebuild the prompt. Keeping transcripts in one process's
memory tied a conversation to one replica and lost it on restart, so the id itself holds the
(compressed) transcript and its expiry, with an HMAC-SHA256 tag under a key the replicas share
(`--audio-id-key` or `OMNI_VLLM_AUDIO_ID_KEY`; by default a random per-process key, so ids stay valid
on the server that issued them only). The transcript is readable by whoever holds the id, as it is
by whoever received the reply; the tag only stops forged or altered ids.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time
import zlib

PREFIX = "audio_"
ENV_KEY = "OMNI_VLLM_AUDIO_ID_KEY"
_TAG_BYTES = 16


class AudioIdError(ValueError):
    """An id that cannot be accepted; the message says why (unknown, tampered, expired)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AudioIds:
    """Issues and checks signed audio ids. `key`: any string shared by the replicas (None: random)."""

    def __init__(self, ttl: float, key: str | None = None):
        self.ttl = ttl
        secret = key.encode() if key else secrets.token_bytes(32)
        self._key = hashlib.sha256(b"omni-vllm audio id\0" + secret).digest()

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_TAG_BYTES]

    def issue(self, transcript: str) -> tuple[str, int]:
        """A new id for a reply with this transcript, and when it expires (Unix seconds)."""
        expires_at = math.ceil(time.time() + self.ttl)
        payload = zlib.compress(
            json.dumps([expires_at, transcript], ensure_ascii=False).encode(), 9
        )
        return f"{PREFIX}{_b64(payload)}.{_b64(self._tag(payload))}", expires_at

    def transcript(self, audio_id: object) -> str:
        """The transcript an id carries; AudioIdError if it is not ours, was altered, or expired."""
        if (
            not isinstance(audio_id, str)
            or not audio_id.startswith(PREFIX)
            or "." not in audio_id
        ):
            raise AudioIdError(
                f"audio id {audio_id!r} is unknown (not an audio id issued by this server)"
            )
        body, _, tag = audio_id[len(PREFIX) :].rpartition(".")
        try:
            payload, given = _unb64(body), _unb64(tag)
        except (ValueError, TypeError):
            raise AudioIdError("audio id is malformed") from None
        if not hmac.compare_digest(given, self._tag(payload)):
            raise AudioIdError(
                "audio id is unknown or was altered (its signature does not match this "
                "server's key; replicas must share --audio-id-key)"
            )
        expires_at, transcript = json.loads(zlib.decompress(payload))
        if expires_at < time.time():
            raise AudioIdError(
                f"audio id expired at {expires_at} (ids are valid {self.ttl:g} s)"
            )
        return transcript
