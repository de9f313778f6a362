"""What both realtime test modules need: 24 kHz PCM16 clips and the espeak-ng phrase.

Its own module so that the fast session tests (test_realtime_session.py) and the SDK tests against
a real server (test_realtime.py) share one copy without importing each other.
"""

import numpy as np
import system_tools

from omni_vllm.testing import media

RATE = 24000


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def spoken_phrase() -> np.ndarray:
    """The phrase at 24 kHz; the test that asks skips where espeak-ng is missing (system_tools)."""
    system_tools.require("espeak-ng")
    return media.spoken_phrase("Hello, what can you hear?", sr=RATE)
