"""Our server settings: the flags of `python -m omni_vllm.api.serve` (omni_vllm.api.server), or under `vllm serve`
(which has no such flags) the OMNI_VLLM_* environment variables; and the start-up refusal of
vLLM's scale-out flags that speech does not support."""

from __future__ import annotations

import json
import os
import types
import typing
from argparse import Namespace
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

from omni_vllm.speech import SpeechConfig


@dataclass
class Settings:
    """Our server settings (flags of `python -m omni_vllm.api.serve`, see omni_vllm.api.server)."""

    speech: SpeechConfig = field(
        default_factory=SpeechConfig
    )  # the speech path's flags
    audio_id_ttl: float = 3600.0  # seconds an `audio.id` can be sent back
    max_media_mb: float = 25.0
    max_audio_input_seconds: float = 600.0
    max_video_input_seconds: float = 600.0
    max_image_pixels: int = 36_000_000  # an 8K UHD frame is 33.2 M
    max_request_mb: float = 100.0
    audio_id_key: str | None = (
        None  # signs audio ids; replicas share it (else OMNI_VLLM_AUDIO_ID_KEY, else random)
    )
    realtime_max_sessions: int = (
        32  # /v1/realtime sessions at once; more: closed with 1013
    )
    realtime_max_session_seconds: float = 1800.0  # then closed with 1008
    realtime_max_input_audio_seconds: float = (
        120.0  # uncommitted input audio per session
    )
    realtime_idle_seconds: float = (
        300.0  # no client event and no reply running: closed with 1008
    )

    @classmethod
    def from_args(cls, args: Namespace) -> Settings:
        """Our flags where the command line has them (`python -m omni_vllm.api.serve`), else the environment
        variable OMNI_VLLM_<FLAG> (e.g. OMNI_VLLM_MAX_AUDIO_TOKENS: `vllm serve` has no such flags),
        else the default."""
        values = {}
        speech = SpeechConfig.cli_fields()  # {field: flag dest}
        hints = typing.get_type_hints(SpeechConfig)
        flags = {
            **typing.get_type_hints(cls),
            **{dest: hints[name] for name, dest in speech.items()},
        }
        del flags["speech"]
        for name, typ in flags.items():
            if hasattr(args, name):
                values[name] = getattr(args, name)
            elif (raw := os.environ.get(f"OMNI_VLLM_{name.upper()}")) is not None:
                values[name] = _parse_setting(name, raw, typ)
        speech_args = Namespace(
            **{dest: values.pop(dest) for dest in speech.values() if dest in values}
        )
        return cls(speech=SpeechConfig.from_cli_args(speech_args), **values)


def check_scale_out(args: Namespace) -> None:
    """Refuse, at start-up and saying why, the scale-out flags of vLLM's that speech does not support
    (with --allow-text-only: serve text only, saying why, instead).

    Supported: --tensor-parallel-size (every rank runs the same hooks, rank 0 sends the rows) with the
    mp and uni executors (tested). Refused: pipeline and data parallelism, several API server
    processes, and the Ray executor (never run with speech: no Ray on our machines)."""
    problems = []
    if (getattr(args, "pipeline_parallel_size", None) or 1) > 1:
        problems.append(
            "--pipeline-parallel-size > 1: the talker needs each step's input embeddings (first "
            "stage) and last hidden states (last stage) in one process; use --tensor-parallel-size"
        )
    if (getattr(args, "api_server_count", None) or 1) > 1:
        problems.append(
            "--api-server-count > 1: each API server process would load its own talker and "
            "Token2Wav and the requests would be spread over them blindly; run one API server per "
            "engine and scale out with replicas behind a load balancer (README: Replicas)"
        )
    if (getattr(args, "data_parallel_size", None) or 1) > 1:
        problems.append(
            "--data-parallel-size > 1 is not supported with speech (not tested: the speech "
            "engine is one per API server); run one replica per GPU (or --tensor-parallel-size "
            "per replica) behind a load balancer instead (README: Replicas)"
        )
    if getattr(args, "distributed_executor_backend", None) == "ray":
        problems.append(
            "--distributed-executor-backend ray has never run with speech here; use mp (vLLM's "
            "default on one node: a 7B fits one GPU) and replicas for more than one node"
        )
    if not problems:
        return
    reason = "omni-vllm: " + "; ".join(problems)
    if Settings.from_args(args).speech.allow_text_only:
        args.speech_disabled = (
            getattr(args, "speech_disabled", None) or reason
        )  # SpeechEngine serves text only
        return
    raise ValueError(reason + " (or serve text only with --allow-text-only)")


def _parse_setting(name: str, raw: str, typ) -> Any:
    if typing.get_origin(typ) is Literal:
        return raw
    # X | None -> X (only a union is unwrapped: dict[str, str]'s arguments are no choice)
    base = typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)
    try:
        if base is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        # JSON of its fields or entries
        if base is dict or typing.get_origin(base) is dict or is_dataclass(base):
            return json.loads(raw)
        return base(raw)
    except ValueError as e:
        raise ValueError(f"OMNI_VLLM_{name.upper()}={raw!r}: {e}") from None
