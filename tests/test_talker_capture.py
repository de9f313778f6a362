"""The talker's captured decode step, simulated on the CPU.

CUDA graphs exist only on CUDA, and no machine here has one. What a capture requires of the code
can still be checked: `GraphCache`'s `capture=` hook stands in for `torch.cuda.graph`. The fake
capture runs the step function once while recording (no device-to-host read may happen there:
capture forbids it) and gives back a replay that recomputes into the *same* output tensors, the
contract a CUDA graph has. With it the Talker must give the eager codes and logits, use one graph
per (batch bucket, block-table width bucket, sampling width), and never capture with `enforce_eager`.
"""

from __future__ import annotations

import pytest
import torch

from omni_vllm.capture import GraphCache, batch_buckets, bucket_for
from omni_vllm.talker import Talker, TalkerSampling

TEXT_ID = 100
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item"}


class FakeCapture:
    """A CUDA graph's contract on the CPU: record once, replay into the same outputs."""

    def __init__(self):
        self.recorded = 0

    def __call__(self, fn, pool, warmup):
        for _ in range(warmup):
            fn()
        with torch.profiler.profile() as prof:
            outputs = fn()
        syncs = [e.key for e in prof.key_averages() if e.key in SYNC_OPS]
        assert not syncs, f"a captured step may not read the device: {syncs}"
        self.recorded += 1

        def replay():
            fresh = fn()
            for static, new in zip(outputs, fresh):
                static.copy_(new)

        return replay, outputs


def _run(talker: Talker, lengths: list[int], steps: int) -> tuple[dict, dict]:
    e = talker.model.config.embedding_size
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(i)
        talker.add_request(
            f"r{i}",
            prompt_ids=torch.full((n,), TEXT_ID),
            prompt_embeds=torch.randn(n, e, generator=g),
            prompt_hidden=torch.randn(n, e, generator=g),
            prompt_positions=torch.arange(n).expand(3, n),
            sampling=TalkerSampling(seed=10 + i),
            max_codes=steps,
        )
        talker.add_thinker_rows(f"r{i}", torch.randn(4, 2, e, generator=g))
        talker.finish_thinker(f"r{i}")
    codes = {f"r{i}": [] for i in range(len(lengths))}
    logits = {rid: [] for rid in codes}
    while ready := talker.ready():
        for rid, out in talker.step(ready, return_logits=True).items():
            codes[rid].append(out.code)
            logits[rid].append(out.logits)
    return codes, logits


def test_bucket_choice():
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_for(3, [1, 2, 4, 8, 12]) == 4
    assert bucket_for(12, [1, 2, 4, 8, 12]) == 12
    with pytest.raises(ValueError):
        bucket_for(13, [1, 2, 4, 8, 12])


def test_graph_cache_keys_and_eager_fallback():
    calls = []
    fake = FakeCapture()
    cache = GraphCache("t", device="cpu", capture=fake)
    out = torch.zeros(1)

    def fn():
        calls.append(1)
        return (out + len(calls),)

    first = cache.run((1, 2), fn)[0].item()
    again = cache.run((1, 2), fn)[0].item()
    cache.run((2, 2), fn)
    assert cache.keys == [(1, 2), (2, 2)] and cache.captures == 2
    assert again > first  # the replay recomputed into the static output
    # CPU without a capture hook, or capture off: plain calls, no graphs
    assert not GraphCache("t", device="cpu").enabled
    off = GraphCache("t", device="cpu", enabled=False, capture=fake)
    off.run((1, 2), fn)
    assert off.keys == [] and fake.recorded == 2


def test_captured_decode_equals_eager(make_talker):
    """Six requests of different lengths, sampled with their seeds, over enough steps to cross
    block-table width buckets: the simulated capture gives the eager codes and logits, one graph
    per (batch bucket, width bucket) used, replayed on every later step."""
    lengths, steps = [3, 17, 40, 9, 70, 25], 60
    eager = make_talker(max_slots=8, max_len=256, kv_cache_tokens=8 * 256)
    assert not eager.runner.captured
    want_codes, want_logits = _run(eager, lengths, steps)

    fake = FakeCapture()
    captured = make_talker(
        max_slots=8, max_len=256, kv_cache_tokens=8 * 256, capture=fake
    )
    assert captured.runner.captured
    got_codes, got_logits = _run(captured, lengths, steps)
    assert got_codes == want_codes
    for rid in want_logits:
        diff = (torch.stack(got_logits[rid]) - torch.stack(want_logits[rid])).abs()
        assert diff.max() < 1e-5, rid
    graphs = captured.runner.graphs
    batches = {key[0] for key in graphs.keys}
    widths = {key[1] for key in graphs.keys}
    print(f"graphs: {sorted(graphs.keys)}, replays {graphs.replays}")
    assert batches <= set(captured.runner.batch_buckets)
    assert widths <= set(captured.runner.width_buckets) and len(widths) > 1
    assert graphs.captures == len(graphs.keys) == fake.recorded
    assert graphs.replays > 3 * graphs.captures

    off = make_talker(
        max_slots=8,
        max_len=256,
        kv_cache_tokens=8 * 256,
        capture=FakeCapture(),
        enforce_eager=True,
    )
    codes, _ = _run(off, lengths, steps)
    assert codes == want_codes and off.runner.graphs.keys == []
