"""The speech worker with Token2Wav on its own thread (omni_vllm.speech.decoder), on the CPU.

The worker alone (no vLLM): requests with synthetic thinker rows, greedy talker. With the window
calls on the decoder's thread (CUDA's default) the talker steps while a call runs; what each
request gets must not change: the same codes, and audio equal to `stream_decode` of those codes
(up to the float rounding of batched windows), as with the calls run inline (the CPU default).
A failing call fails its requests and the worker keeps serving.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from omni_vllm.speech.config import SpeechConfig
from omni_vllm.speech.worker import AddRequest, SpeechWorker, ThinkerFinished
from omni_vllm.streaming import StreamConfig, StreamingToken2Wav, stream_decode
from omni_vllm.talker import Talker, TalkerSampling
from omni_vllm.token2wav import Token2Wav

torch.set_num_threads(1)

STREAM = StreamConfig(
    first_chunk=12,
    chunk=24,
    left_context=12,
    look_ahead=12,
    vocoder_left=8,
    vocoder_right=8,
    num_steps=3,
)
CODES = [40, 29, 52]
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_checkpoint_dir):
    return (
        Talker.from_pretrained(tiny_checkpoint_dir, max_slots=4),
        Token2Wav.from_pretrained(tiny_checkpoint_dir),
    )


def add(talker, rid, seed, max_codes):
    g = torch.Generator().manual_seed(seed)
    e = talker.thinker_config.text_config.hidden_size
    n = 8
    return AddRequest(
        request_id=rid,
        prompt_ids=torch.full((n,), 100, dtype=torch.long),
        prompt_rows=torch.stack(
            [torch.randn(n, e, generator=g) * 0.02, torch.randn(n, e, generator=g)], 1
        ),
        rows=torch.stack(
            [torch.randn(4, e, generator=g) * 0.02, torch.randn(4, e, generator=g)], 1
        ),
        positions=torch.arange(n).expand(3, -1),
        voice=("Chelsie", "Ethan")[seed % 2],
        sampling=TalkerSampling(do_sample=False),
        noise=seed,
        max_codes=max_codes,
    )


def serve(models, threaded, fail=False):
    """Run the requests through a worker; {rid: {codes, audio, error, done}}."""
    talker, t2w = models
    streamer = StreamingToken2Wav(t2w, STREAM)
    if fail:

        def broken(call):
            raise RuntimeError("device lost")

        streamer.runner.run = broken
    got = {
        f"r{i}": dict(codes=[], audio=[], error=None, done=False)
        for i in range(len(CODES))
    }
    finished = threading.Event()

    def post(outputs, stats, syncs):
        for rid, out in outputs.items():
            got[rid]["codes"] += out.codes
            got[rid]["audio"] += out.audio
            got[rid]["error"] = got[rid]["error"] or out.error
            got[rid]["done"] |= out.done or out.error is not None
        if all(g["done"] for g in got.values()):
            finished.set()

    worker = SpeechWorker(
        talker, streamer, post, SpeechConfig(), threaded_token2wav=threaded
    )
    worker.start()
    for i, n in enumerate(CODES):
        worker.submit(add(talker, f"r{i}", i, n))
        worker.submit(ThinkerFinished(f"r{i}", None))
    assert finished.wait(300)
    worker.stop()
    worker.join(10)
    assert worker.decoder.threaded == threaded
    return got


def test_threaded_token2wav_gives_the_inline_audio(models):
    _, t2w = models
    inline = serve(models, threaded=False)
    threaded = serve(models, threaded=True)
    for i, n in enumerate(CODES):
        got = threaded[f"r{i}"]
        codes = got["codes"]
        assert got["error"] is None and len(codes) == n
        assert codes == inline[f"r{i}"]["codes"]
        audio = torch.from_numpy(np.concatenate(got["audio"]))
        ref = stream_decode(t2w, codes, ("Chelsie", "Ethan")[i % 2], i, STREAM)
        assert audio.shape == ref.shape and (audio - ref).abs().max() < ATOL


def test_a_failing_window_call_fails_its_requests(models):
    got = serve(models, threaded=True, fail=True)
    assert all(
        isinstance(g["error"], RuntimeError) and "device lost" in str(g["error"])
        for g in got.values()
    )
