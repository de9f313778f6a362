"""Patch: under stock `vllm serve` with our endpoint plugin, the speech memory plan runs before
vLLM builds its engine, as it does under `python -m omni_vllm.api.serve`.

What: wraps `vllm.engine.arg_utils.EngineArgs.create_engine_config`. When our endpoint plugin is
enabled (`VLLM_PLUGINS` names omni_vllm: vLLM loads endpoint plugins only then) and no plan was
made in this process yet, it runs `omni_vllm.api.server.plan_speech` on the engine arguments and
our `OMNI_VLLM_*` settings, lowers the engine arguments' `gpu_memory_utilization` by the speech
share (unless the user gave it), and records the plan for the speech engine that our endpoint
plugin builds later in the same process, whose talker KV pool is then the plan's. A plan that
does not fit stops the start-up with its message, our flags spelled as the `OMNI_VLLM_*`
variables that set them under `vllm serve`.

Why: vLLM claims its share of the GPU when it builds the engine, before any endpoint plugin's
`init_state` runs; without this the speech path would have only what vLLM leaves free (~8 %) and
no plan at all (a busy server would run out of memory instead of queueing).

Where it runs: `create_engine_config` is called in the API server process (vLLM's engine core
and workers receive the built config); `register()` applies this patch there first.

Checked against: vLLM 0.32.0. Any other version raises: re-read
`EngineArgs.create_engine_config` and `vllm serve`'s `build_async_engine_client_from_engine_args`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from argparse import Namespace

from omni_vllm.patches import require_vllm

CHECKED_VLLM_VERSIONS = ("0.32.0",)
_APPLIED = "_omni_vllm_speech_memory_plan"
# the vLLM engine arguments the plan reads
_ENGINE_FIELDS = (
    "model",
    "revision",
    "download_dir",
    "trust_remote_code",
    "dtype",
    "max_model_len",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "data_parallel_size_local",
    "gpu_memory_utilization",
)

logger = logging.getLogger(__name__)


def endpoint_plugin_enabled() -> bool:
    """vLLM loads our endpoint plugin (our routes, hence our speech engine) only when
    `VLLM_PLUGINS` names it."""
    from vllm import envs

    return "omni_vllm" in (envs.VLLM_PLUGINS or ())


def _env_names(message: str) -> str:
    """Our flags in a plan's message as the OMNI_VLLM_* variables that set them under `vllm serve`."""
    from omni_vllm.speech import SpeechConfig

    for dest in SpeechConfig.cli_fields().values():
        flag = "--" + dest.replace("_", "-")
        message = re.sub(
            rf"{re.escape(flag)}(?![\w-])", f"OMNI_VLLM_{dest.upper()}", message
        )
    return message + (
        " (under `vllm serve` our settings are OMNI_VLLM_* environment variables; "
        "--max-model-len and --gpu-memory-utilization are vLLM's flags)"
    )


def plan_for_engine_args(engine_args, device_total: int | None = None):
    """Run the speech plan for `engine_args` (an EngineArgs) and our OMNI_VLLM_* settings; write
    vLLM's share back into `engine_args`. Returns the plan (None: no speech model)."""
    from omni_vllm.api.server import plan_speech
    from omni_vllm.api.settings import Settings
    from omni_vllm.memory import set_current_plan

    speech = Settings.from_args(Namespace()).speech
    args = Namespace(
        **{name: getattr(engine_args, name, None) for name in _ENGINE_FIELDS},
        speech_device=speech.device,
        speech_dtype=speech.speech_dtype,
        max_audio_tokens=speech.max_codes,
        talker_max_len=speech.talker_max_len,
        max_speaking=speech.max_speaking,
        speech_gpu_memory_gb=speech.gpu_memory_gb,
        allow_text_only=speech.allow_text_only,
        speech_stream_config=vars(speech.stream_config),
    )
    argv = sys.argv[1:]
    try:
        plan = plan_speech(args, argv, device_total)
    except SystemExit as e:
        raise SystemExit(_env_names(str(e))) from None
    if plan is None and getattr(args, "speech_disabled", None):
        set_current_plan(None, disabled=args.speech_disabled)
    if plan is not None and plan.gpu_memory_utilization is not None:
        engine_args.gpu_memory_utilization = plan.gpu_memory_utilization
    return plan


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _APPLIED, False):
        return
    require_vllm(
        CHECKED_VLLM_VERSIONS,
        __name__,
        "Under `vllm serve` the speech path would get no memory plan.",
    )

    def create_engine_config(self, *args, **kwargs):
        from omni_vllm.memory import current_plan, planned

        if endpoint_plugin_enabled() and not planned() and current_plan() is None:
            plan_for_engine_args(self, _simulated_device_total())
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _APPLIED, True)
    create_engine_config.__wrapped__ = original
    EngineArgs.create_engine_config = create_engine_config


def _simulated_device_total() -> int | None:
    """OMNI_VLLM_SIMULATE_GPU_GB (tests): plan as if the speech GPU had that many GiB."""
    raw = os.environ.get("OMNI_VLLM_SIMULATE_GPU_GB")
    return None if raw is None else int(float(raw) * 2**30)
