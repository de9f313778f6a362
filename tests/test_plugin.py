"""What the plugin's `register()` does beside registering our model class.

vLLM's audio loader warns "torchcodec unavailable" on every audio input it decodes where torchcodec
cannot load, which on CPU installs is every one (the set-up removes PyPI's CUDA build on purpose):
the plugin keeps it to once per process. The guard on vLLM's source fails if the warning moves.
"""

from __future__ import annotations

import inspect
import io
import logging

import numpy as np
import pytest


def wav_bytes() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    t = np.arange(1600) / 16000
    sf.write(
        buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV"
    )
    return buf.getvalue()


def test_torchcodec_warning_once_per_process():
    from vllm.multimodal.media import audio as vllm_audio

    from omni_vllm import plugin

    plugin.register()
    plugin.register()  # idempotent: one filter
    assert vllm_audio.logger.name == plugin.TORCHCODEC_LOGGER
    assert f'"{plugin.TORCHCODEC_WARNING} (%r);' in inspect.getsource(
        vllm_audio.load_audio
    )
    logger = logging.getLogger(plugin.TORCHCODEC_LOGGER)
    (once,) = [f for f in logger.filters if isinstance(f, plugin._FirstOnly)]
    if vllm_audio.AudioDecoder is not None:
        pytest.skip("torchcodec loads on this install: vLLM never warns")
    # As in a fresh process (another test in this one may have decoded audio already).
    once.seen = False
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        for _ in range(3):
            audio, sr = vllm_audio.load_audio(io.BytesIO(wav_bytes()), sr=16000)
            assert sr == 16000 and len(audio) == 1600
    finally:
        logger.removeHandler(handler)
    warned = [
        r for r in records if r.getMessage().startswith(plugin.TORCHCODEC_WARNING)
    ]
    assert len(warned) == 1, [r.getMessage() for r in records]
