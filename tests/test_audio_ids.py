"""Signed audio ids (api/audio_ids.py): what one replica issues, another with the same key accepts;
an altered, foreign or expired id is refused with a reason."""

import time

import pytest

from omni_vllm.api.audio_ids import AudioIdError, AudioIds


def test_round_trip_and_shared_key():
    a, b = AudioIds(60, key="shared secret"), AudioIds(60, key="shared secret")
    transcript = "Hello, wörld! " * 200  # long, non-ASCII
    audio_id, expires_at = a.issue(transcript)
    assert audio_id.startswith("audio_") and expires_at > time.time() + 50
    assert len(audio_id) < len(transcript)  # compressed
    assert a.transcript(audio_id) == b.transcript(audio_id) == transcript


def test_refused_ids():
    ids = AudioIds(60, key="k1")
    audio_id, _ = ids.issue("hi")
    with pytest.raises(AudioIdError, match="altered"):
        AudioIds(60, key="k2").transcript(audio_id)
    with pytest.raises(AudioIdError, match="altered"):
        AudioIds(60).transcript(audio_id)  # default: a random per-process key
    body, tag = audio_id.rsplit(".", 1)
    forged, _ = AudioIds(60, key="k1").issue("something else")
    for bad in (
        body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + tag,
        body + "." + forged.rsplit(".", 1)[1],
        audio_id + "x",
    ):
        with pytest.raises(AudioIdError):
            ids.transcript(bad)
    for junk in ("audio_unknown", "", None, 3, "audio_%%%.%%%"):
        with pytest.raises(AudioIdError, match="unknown|malformed"):
            ids.transcript(junk)


def test_expired():
    ids = AudioIds(0.5, key="k")
    audio_id, _ = ids.issue("hi")
    assert ids.transcript(audio_id) == "hi"
    time.sleep(1.6)
    with pytest.raises(AudioIdError, match="expired"):
        ids.transcript(audio_id)
