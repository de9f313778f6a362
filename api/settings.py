"""Our server settings: the flags of `python -m api.serve` (api.server), or under `vllm serve`
(which has no such flags) the OMNI_VLLM_* environment variables; and the start-up refusal of
vLLM's scale-out flags that speech does not support."""

from __future__ import annotations

import json
import os
import typing
from argparse import Namespace
from dataclasses import dataclass
from typing import Any


@dataclass
class Settings:
    """Our server settings (flags of `python -m api.serve`, see api.server)."""

    default_voice: str = "Chelsie"
    max_audio_tokens: int = 4096  # talker codes per request (50 per second of speech)
    audio_id_ttl: float = 3600.0  # seconds an `audio.id` can be sent back
    max_media_mb: float = 25.0
    max_audio_input_seconds: float = 600.0
    max_video_input_seconds: float = 600.0
    max_image_pixels: int = 36_000_000  # an 8K UHD frame is 33.2 M
    max_request_mb: float = 100.0
    speech_device: str | None = None
    max_speaking: int | None = None  # None: what the speech memory budget holds (api.server.plan_speech)
    speech_stream_config: dict | None = None  # omni_vllm.streaming.StreamConfig fields
    max_waiting: int = 1024  # audio requests waiting for a speaking slot; more: 503
    max_wait_seconds: float | None = None  # server-side wait limit for a speaking slot (None: none)
    audio_id_key: str | None = None  # signs audio ids; replicas share it (else OMNI_VLLM_AUDIO_ID_KEY, else random)
    max_audio_tokens_per_text_token: float = 40.0  # the runaway guard (0: off)
    speech_dtype: str = "auto"  # omni_vllm.memory.speech_dtypes
    speech_gpu_memory_gb: float | None = None
    allow_text_only: bool = False
    talker_max_len: int | None = None  # None: the talker config's, at most max_model_len + max_audio_tokens
    realtime_max_sessions: int = 32  # /v1/realtime sessions at once; more: closed with 1013
    realtime_max_session_seconds: float = 1800.0  # then closed with 1008
    realtime_max_input_audio_seconds: float = 120.0  # uncommitted input audio per session
    realtime_idle_seconds: float = 300.0  # no client event and no reply running: closed with 1008

    @classmethod
    def from_args(cls, args: Namespace) -> "Settings":
        """Our flags where the command line has them (`python -m api.serve`), else the environment
        variable OMNI_VLLM_<FLAG> (e.g. OMNI_VLLM_MAX_AUDIO_TOKENS: `vllm serve` has no such flags),
        else the default."""
        values = {}
        for name, typ in typing.get_type_hints(cls).items():
            if hasattr(args, name):
                values[name] = getattr(args, name)
            elif (raw := os.environ.get(f"OMNI_VLLM_{name.upper()}")) is not None:
                values[name] = _parse_setting(name, raw, typ)
        return cls(**values)


def check_scale_out(args: Namespace) -> None:
    """Refuse, at start-up and saying why, the scale-out flags of vLLM's that speech does not support
    (with --allow-text-only: serve text only, saying why, instead).

    Supported: --tensor-parallel-size (every rank runs the same hooks, rank 0 sends the rows) with the
    mp and uni executors (tested). Refused: pipeline and data parallelism, several API server
    processes, and the Ray executor (never run with speech: no Ray on our machines)."""
    problems = []
    if (getattr(args, "pipeline_parallel_size", None) or 1) > 1:
        problems.append("--pipeline-parallel-size > 1: the talker needs each step's input embeddings (first "
                        "stage) and last hidden states (last stage) in one process; use --tensor-parallel-size")
    if (getattr(args, "api_server_count", None) or 1) > 1:
        problems.append("--api-server-count > 1: each API server process would load its own talker and "
                        "Token2Wav and the requests would be spread over them blindly; run one API server per "
                        "engine and scale out with replicas behind a load balancer (README: Replicas)")
    if (getattr(args, "data_parallel_size", None) or 1) > 1:
        problems.append("--data-parallel-size > 1 is not supported with speech (not tested: the speech "
                        "engine is one per API server); run one replica per GPU (or --tensor-parallel-size "
                        "per replica) behind a load balancer instead (README: Replicas)")
    if getattr(args, "distributed_executor_backend", None) == "ray":
        problems.append("--distributed-executor-backend ray has never run with speech here; use mp (vLLM's "
                        "default on one node: a 7B fits one GPU) and replicas for more than one node")
    if not problems:
        return
    reason = "omni-vllm: " + "; ".join(problems)
    if Settings.from_args(args).allow_text_only:
        args.speech_disabled = getattr(args, "speech_disabled", None) or reason  # SpeechEngine serves text only
        return
    raise ValueError(reason + " (or serve text only with --allow-text-only)")


def _parse_setting(name: str, raw: str, typ) -> Any:
    base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # X | None -> X
    try:
        if base is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if base is dict:
            return json.loads(raw)
        return base(raw)
    except ValueError as e:
        raise ValueError(f"OMNI_VLLM_{name.upper()}={raw!r}: {e}") from None


