"""The Token2Wav runner's captured path, simulated on the CPU.

On CUDA a window call runs on static buffers, padded to fixed lengths and batch buckets, and is
replayed as one CUDA graph per key; on the CPU it runs eagerly. GraphCache's `capture` hook stands
in for the CUDA capture here: the "graph" records the function once and every replay re-runs it
on the buffers as they are then, so a function that read anything but its static buffers (a
per-call tensor closed over, a mask built on the host) would give wrong audio on the next call.
What CUDA alone would show (the capture itself, replay timing) is not run here.
"""

import pytest
import torch

from omni_vllm.stream_windows import StreamState
from omni_vllm.streaming import StreamConfig, StreamingToken2Wav, plan_windows
from omni_vllm.token2wav import Token2Wav, ode_schedule, rk4_solve
from omni_vllm.token2wav_runner import WindowRunner, window_shape

torch.set_num_threads(1)

ATOL = (
    1e-6  # captured (padded, bucketed) against eager: float rounding of padded batches
)
CONFIG = StreamConfig(num_steps=3)


@pytest.fixture(scope="module")
def t2w(tiny_checkpoint_dir):
    return Token2Wav.from_pretrained(tiny_checkpoint_dir)


def fake_capture(fn, pool, warmup):
    """GraphCache's CUDA capture, on the CPU: outputs fixed at capture, each replay refreshes
    them from the buffers as they are then."""
    outputs = fn()

    def replay():
        for out, new in zip(outputs, fn()):
            out.copy_(new)

    return replay, outputs


def codes_of(n, seed):
    return torch.randint(0, 8192, (n,), generator=torch.Generator().manual_seed(seed))


def drive(streamer, arrivals):
    """Each request's codes in increments of `step` codes per iteration, one step() each."""
    out = {rid: [] for rid in arrivals}
    pos = dict.fromkeys(arrivals, 0)
    for rid, (voice, seed, _, _) in arrivals.items():
        streamer.open(rid, voice, seed)
    while streamer.streams:
        for rid, (_, _, codes, step) in arrivals.items():
            if rid in streamer.streams and not streamer.streams[rid].finished:
                new = codes[pos[rid] : pos[rid] + step]
                pos[rid] += len(new)
                streamer.push(rid, new, finished=pos[rid] >= len(codes))
        for rid, o in streamer.step().items():
            out[rid].append(o.audio)
    return {rid: torch.cat(parts) for rid, parts in out.items()}


ARRIVALS = {
    "a": ("Chelsie", 1, codes_of(130, 1), 9),
    "b": ("Ethan", 2, codes_of(61, 2), 5),
    "c": ("Ethan", 3, codes_of(40, 3), 40),  # shorter than one window: a tail
}


def test_rk4_matches_transformers_solver():
    """The host-scheduled RK4 loop equals transformers' RungeKutta4ODESolver bit for bit."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        RungeKutta4ODESolver,
    )

    def velocity(t, x):
        return torch.sin(3 * x + t) - 0.5 * x * t

    x0 = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0))
    points = torch.linspace(0, 1, 10, dtype=torch.float32)
    points += -1.0 * (torch.cos(torch.pi / 2 * points) - 1 + points)
    ref = RungeKutta4ODESolver(velocity, x0).integrate(points)[-1]
    ours = rk4_solve(
        lambda t, x: velocity(torch.tensor(t), x), x0, ode_schedule(10, -1.0)
    )
    assert torch.equal(ours, ref)


def test_captured_calls_give_the_eager_audio(t2w):
    eager = drive(StreamingToken2Wav(t2w, CONFIG), ARRIVALS)
    streamer = StreamingToken2Wav(t2w, CONFIG, max_batch=4)
    streamer.runner = runner = WindowRunner(
        t2w, CONFIG, max_batch=4, capture=fake_capture
    )
    got = drive(streamer, ARRIVALS)
    for rid in ARRIVALS:
        assert got[rid].shape == eager[rid].shape == (len(ARRIVALS[rid][2]) * 480,)
        assert (got[rid] - eager[rid]).abs().max() < ATOL
    window, segment = window_shape(t2w, CONFIG)
    assert (window, segment) == (2 * (24 + 36 + 12), 34 + 72 + 16)
    sampling = tuple(sorted(CONFIG.sampling().items()))
    # one graph per (window bucket, segment bucket); the same shapes and sampling in every key
    assert runner.graphs.keys and all(
        k[2:] == (window, segment, sampling) for k in runner.graphs.keys
    )
    assert {k[0] for k in runner.graphs.keys} <= {1, 2, 4}
    assert runner.graphs.captures == len(runner.graphs.keys)
    assert runner.graphs.replays > runner.graphs.captures  # later calls replayed
    assert runner.eager_calls == 0


def test_bucket_choice_and_eager_fallback(t2w):
    runner = WindowRunner(t2w, CONFIG, max_batch=4, capture=fake_capture)
    states = []
    for i in range(5):
        s = StreamState("Chelsie", i, CONFIG, t2w.repeats)
        s.append(codes_of(48, i))
        states.append(s)

    def key(streams):
        call = plan_windows(t2w, streams)
        for s in streams:  # undo the plan's bookkeeping
            s.next_chunk, s.frames_emitted = 0, 0
        return runner.key(call)

    assert key(states[:1])[:2] == (1, 1)
    assert key(states[:3])[:2] == (4, 4)  # 3 windows, 3 segments: bucket 4
    assert key(states) is None  # 5 windows > the largest bucket: eager
    # capture off: --speech-enforce-eager, or a CPU without a capture hook
    assert (
        WindowRunner(t2w, CONFIG, enforce_eager=True, capture=fake_capture).key(
            plan_windows(t2w, states[:1])
        )
        is None
    )
    assert not WindowRunner(t2w, CONFIG).captured
    assert not StreamingToken2Wav(t2w, CONFIG).runner.captured


def test_window_longer_than_the_shape_runs_eagerly(t2w):
    """A stream of other settings than the runner's (a longer chunk) is decoded eagerly."""
    runner = WindowRunner(t2w, CONFIG, capture=fake_capture)
    long = StreamConfig(chunk=72, num_steps=3)
    s = StreamState("Ethan", 5, long, t2w.repeats)
    s.append(codes_of(100, 5))
    call = plan_windows(t2w, [s])
    assert runner.key(call) is None
    result = runner.run(call)
    assert runner.eager_calls == 1 and len(result.wavs) == 1


def test_tf32_is_switched_on_for_cuda_only():
    """The CUDA default (TF32 matmuls and convolutions), simulated: the switches exist without a
    GPU; the CPU path leaves them alone."""
    from omni_vllm.token2wav import fast_cuda_defaults

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert not fast_cuda_defaults("cpu")
        assert not torch.backends.cuda.matmul.allow_tf32
        assert fast_cuda_defaults(torch.device("cuda", 1))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_window_call_benchmark_runs(t2w):
    """benchmarks/real_size.py's window-call rows (capture on / off; CUDA's run), on the CPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_size_stages
    from meters import Device

    rows = real_size_stages.bench_window_calls(t2w, Device("cpu"), [2], repeat=1)
    assert [(r["capture"], r["concurrency"]) for r in rows] == [(False, 2), (False, 2)]
    assert all(r["ms_per_call"] > 0 and r["audio_s_per_call"] == 1.44 for r in rows)
    assert "| off | 2 |" in "\n".join(real_size_stages.window_call_table(rows, "fp32"))
