"""SpeechJob alone (omni_vllm.speech.job): rows held until the prompt is known, worker
outputs into the collector, the last chunk's reason and counts; no model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from omni_vllm.hidden_states import HiddenStatesChunk, HiddenStatesOutOfOrder
from omni_vllm.speech.job import SpeechJob
from omni_vllm.speech.outputs import SpeechChunk
from omni_vllm.speech.worker import WorkerOutput
from omni_vllm.talker import TalkerSampling


def job() -> SpeechJob:
    return SpeechJob("r", "Chelsie", TalkerSampling(), None, 24)


def rows(start: int, n: int, positions=None) -> HiddenStatesChunk:
    return HiddenStatesChunk(
        "r", "r-0", start, torch.full((n, 2, 4), float(start)), False, positions
    )


def test_rows_are_held_until_the_prompt_is_known():
    j, positions = job(), torch.zeros(3, 3)
    assert j.take_rows(rows(0, 3, positions)) is None
    assert j.take_rows(rows(3, 2)) is None
    cmd = j.add_request([7, 8, 9])
    assert cmd.request_id == "r" and cmd.prompt_ids.tolist() == [7, 8, 9]
    assert cmd.prompt_rows.shape == (3, 2, 4) and cmd.rows.shape == (2, 2, 4)
    assert cmd.positions is positions and cmd.voice == "Chelsie" and cmd.max_codes == 24
    assert j.pending_rows == [] and j.rows_seen == 5
    j.submitted = True
    sent = j.take_rows(rows(5, 1))
    assert sent is not None and sent.shape == (1, 2, 4) and j.rows_seen == 6


@pytest.mark.parametrize(
    "submitted, start, what",
    [(False, 4, "gap"), (True, 6, "gap"), (False, 2, "overlap"), (True, 3, "overlap")],
)
def test_rows_out_of_order_fail_the_request(submitted, start, what, monkeypatch):
    """Rows carry the worker's absolute positions: a chunk that does not continue where the
    last ended (a step's output dropped by vLLM's scheduler: a gap; rows sent twice: an
    overlap) is refused and logged, not shifted onto the wrong positions."""
    import omni_vllm.hidden_states as hs

    logged = []
    monkeypatch.setattr(
        hs.logger, "error", lambda *args: logged.append(args[0] % args[1:])
    )
    j = job()
    j.take_rows(rows(0, 3, torch.zeros(3, 3)))
    if submitted:
        j.add_request([7, 8, 9])
        j.submitted = True
        j.take_rows(rows(3, 2))
    with pytest.raises(HiddenStatesOutOfOrder, match=f"a {what}"):
        j.take_rows(rows(start, 1))
    assert len(logged) == 1 and f"a {what}" in logged[0]


def test_add_request_without_the_prompt_rows_fails():
    j = job()
    j.take_rows(rows(0, 2))
    with pytest.raises(RuntimeError, match="sent 2 of 3 prompt hidden-state rows"):
        j.add_request([1, 2, 3])
    with pytest.raises(RuntimeError, match="sent 0 of 1"):
        job().add_request([1])


def test_outputs_reach_the_collector():
    j = job()
    a, b = np.ones(4, np.float32), np.zeros(2, np.float32)
    assert j.add_output(WorkerOutput()) is None
    assert len(j.add_output(WorkerOutput(audio=[a, b], codes=[1, 2]))) == 6
    assert j.add_output(WorkerOutput(done=True, talker_reason="stop")) is None
    chunk = asyncio.run(j.out.get())
    assert len(chunk.audio) == 6 and chunk.audio_codes == [1, 2]
    assert j.out.audio_done and j.out.talker_reason == "stop"


@pytest.mark.parametrize(
    "talker_reason, aborted, want",
    [("stop", False, "stop"), ("runaway", False, "length"), ("stop", True, "abort")],
)
def test_finish(talker_reason, aborted, want):
    j = job()
    j.out.end_text("stop", 5, 7)
    j.out.add_audio(None, [], True, talker_reason)
    if aborted:
        j.out.abort()
    chunk = SpeechChunk("", [], None)
    j.finish(chunk, 30)
    assert chunk.finished and chunk.finish_reason == want
    assert (chunk.prompt_tokens, chunk.completion_tokens, chunk.audio_tokens) == (
        5,
        7,
        30,
    )
