"""Shared fixtures: one tiny random-weight Qwen2.5-Omni checkpoint per test session.

Threads are pinned so that fp32 results are reproducible run to run, and vLLM engines started by
tests run in-process (no EngineCore subprocess) unless a test starts a server on purpose.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    """A full tiny Qwen2.5-Omni checkpoint (thinker, talker, token2wav, spk_dict.pt)."""
    from omni_vllm.testing.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-omni", seed=0)


def pytest_report_header(config):
    """The system programs missing here, said once at the start (the tests that need them skip)."""
    import system_tools

    missing = [t for t in system_tools.TOOLS if system_tools.find(t) is None]
    if missing:
        return (
            f"system programs not installed: {', '.join(missing)}; the tests that need them "
            "skip (scripts/setup.sh installs them with apt-get when run as root)"
        )
    return None


# The modules that take longest (servers, engines, benchmarks in subprocesses), longest first: they
# run first, so that two test workers (scripts/test) end together instead of one starting a long
# module when the other is done. The two load tests (reliability: 16 speakers at once; replicas:
# 104 requests through nginx) are kept apart, so that they do not run at the same time on two
# cores. Only the order changes; every other module follows in its own order.
LONGEST_FIRST = (
    "test_reliability.py",
    "test_memory_budget.py",
    "test_benchmarks.py",
    "test_realtime.py",
    "test_queue.py",
    "test_hidden_states.py",
    "test_api.py",
    "test_playground.py",
    "test_replicas.py",
    "test_audio_input.py",
    "test_model_runner.py",
    "test_vllm_serve.py",
    "test_serve.py",
    "test_thinker_parity.py",
    "test_speech_engine.py",
    "test_offline.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


@pytest.fixture(scope="module")
def make_talker(tiny_checkpoint_dir):
    """Talkers of the tiny checkpoint with any settings (`make_talker(max_slots=..., ...)`),
    its tensors read once."""
    from transformers import Qwen2_5OmniConfig

    from omni_vllm.checkpoint import load_prefixed
    from omni_vllm.talker import Talker

    config = Qwen2_5OmniConfig.from_pretrained(tiny_checkpoint_dir)
    base = Talker.from_pretrained(tiny_checkpoint_dir, max_slots=1, max_len=64)
    state = load_prefixed(tiny_checkpoint_dir, "talker.")

    def make(**kwargs):
        return Talker(config, dict(state), base.text_rows, base.voices, **kwargs)

    return make
