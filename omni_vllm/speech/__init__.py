"""The speech path of the server: text and streamed speech per request, batched across requests.

Laid out along vLLM's own seam: `scheduler` (the policy, as vllm/v1/core/sched/), `worker` (the
thread that runs the talker and Token2Wav, as vllm/v1/engine/core.py's busy loop), `engine`
(`SpeechEngine`, the async front, as vllm/v1/engine/async_llm.py) with `admission` (the FIFO
wait for a speaking slot and refusals for load), `job` (one request's loop-side state and the
routing of its rows and outputs), `outputs` (`SpeechChunk`, one `RequestCollector` per
request), `config` (`SpeechConfig`, every setting and its flag) and `loading` (the modules of a
checkpoint).
"""

from omni_vllm.errors import (
    SpeechBusy,
    SpeechLoadError,
    SpeechUnavailable,
    UnknownVoice,
)
from omni_vllm.speech.config import SpeechConfig
from omni_vllm.speech.engine import RUNAWAY_FLOOR_CODES, SpeechChunk, SpeechEngine
from omni_vllm.speech.loading import load_speech_modules
from omni_vllm.talker import TalkerSampling
from omni_vllm.token2wav import SAMPLE_RATE

__all__ = [
    "RUNAWAY_FLOOR_CODES",
    "SAMPLE_RATE",
    "SpeechBusy",
    "SpeechChunk",
    "SpeechConfig",
    "SpeechEngine",
    "SpeechLoadError",
    "SpeechUnavailable",
    "TalkerSampling",
    "UnknownVoice",
    "load_speech_modules",
]
