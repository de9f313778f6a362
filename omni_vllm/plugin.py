"""vLLM plugin entry point (`vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), so it
must be cheap and idempotent: it records the lazy `"module:Class"` path of our model class for
the architectures that the Qwen2.5-Omni checkpoints declare, and lets our loggers print the way
vLLM's do.
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
        NewLineFormatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", datefmt="%m-%d %H:%M:%S")
    )
    ours.addHandler(handler)
    ours.setLevel(envs.VLLM_LOGGING_LEVEL)
    ours.propagate = False


def register() -> None:
    from vllm import ModelRegistry

    _configure_logging()
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)

    # Frontend half of the hidden-states route (the runner half is applied by our model class),
    # and the V1 model runner pinned for our model (before any VllmConfig is built or read).
    from patches import model_runner_v1, output_processor_hidden_states

    model_runner_v1.apply()
    output_processor_hidden_states.apply()

    # Media URLs in requests are fetched from public addresses only, on our routes and vLLM's alike
    # (api/media_fetch.py); VLLM_MEDIA_CONNECTOR set by the user (e.g. "http", vLLM's own) wins.
    from api import media_fetch

    media_fetch.register()
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", media_fetch.CONNECTOR_NAME)
