"""The Talker's memory and step costs as batch and context grow (tiny checkpoint, synthetic inputs).

Correctness against transformers is tests/test_talker.py; here: the KV pool (allocated once,
blocks that follow the requests' real lengths), admission by free blocks and recompute
preemption when it runs out, the length limits, and a constant number of aten ops and of
device-to-host reads per step whatever the batch size.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from omni_vllm.talker import Talker, TalkerSampling

TEXT_ID = 100  # an ordinary text token of the tiny tokenizer (special tokens are 0..15)


def _prompt(talker: Talker, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    e = talker.model.config.embedding_size
    return dict(
        prompt_ids=torch.full((n,), TEXT_ID),
        prompt_embeds=torch.randn(n, e, generator=g),
        prompt_hidden=torch.randn(n, e, generator=g),
        prompt_positions=torch.arange(n).expand(3, n),
        voice="Chelsie",
    )


def _start(talker: Talker, rid, n: int, seed: int = 0, **kwargs) -> None:
    """Add a request whose thinker has finished (tts_text_end then pads: it can step forever)."""
    talker.add_request(rid, **_prompt(talker, n, seed), **kwargs)
    talker.finish_thinker(rid)


def test_kv_pool_allocated_once_blocks_follow_use(make_talker):
    """The pool is allocated once, at the size given (+ the null block); a request's blocks
    follow its real length and go back to the pool when it ends."""
    talker = make_talker(max_slots=8, max_len=512, kv_cache_tokens=1024)
    pool = talker.kv
    per_token = pool.bytes_per_token
    tcfg = talker.model.config
    assert (
        per_token
        == tcfg.num_hidden_layers * 2 * tcfg.num_key_value_heads * tcfg.head_dim * 4
    )
    assert talker.kv_pool_bytes() == (1024 + pool.block_size) * per_token
    assert talker.kv_cache_bytes() == 0 and talker.kv_usage == 0
    _start(talker, "a", 10, max_codes=300)
    # nothing is taken before the request prefills
    assert talker.kv_cache_bytes() == 0
    for _ in range(120):
        # forced: random weights would sample a stop code some time
        talker.step(forced_codes={"a": 5})
    used = pool.lengths.get("a", 0) or 12 + 119
    assert len(pool.block_tables["a"]) == -(-(12 + 120) // pool.block_size)
    assert (
        talker.kv_cache_bytes()
        == len(pool.block_tables["a"]) * pool.block_size * per_token
    )
    assert used
    _start(talker, "b", 3)
    talker.step(forced_codes={"a": 5, "b": 5})
    assert len(pool.block_tables["b"]) == 1
    talker.remove("a")
    talker.remove("b")
    assert talker.kv_cache_bytes() == 0 and pool.num_free_blocks == pool.num_blocks
    assert talker.kv_pool_bytes() == (1024 + pool.block_size) * per_token


def _step_ops(talker: Talker, rids: list, forced: dict) -> int:
    with torch.profiler.profile() as prof:
        out = talker.step(rids, forced_codes=forced)
    assert sorted(out) == sorted(rids)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_kv_pool_decode_step_ops_do_not_grow_with_the_batch(make_talker):
    """A decode step over the pool is one scatter and one attention call per layer for the
    whole batch: its aten op count (kernel launches on a GPU) does not grow with the batch or
    the context length."""
    talker = make_talker(max_slots=16, max_len=512, kv_cache_tokens=16 * 512)
    counts = {}
    for batch in (1, 16):
        rids = [f"{batch}-{i}" for i in range(batch)]
        for i, rid in enumerate(rids):
            _start(talker, rid, 5 + 7 * i, max_codes=400)
        forced = {rid: 5 for rid in rids}
        talker.step(rids, forced_codes=forced)
        short = _step_ops(talker, rids, forced)
        for _ in range(60):
            talker.step(rids, forced_codes=forced)
        counts[batch] = (short, _step_ops(talker, rids, forced))
        for rid in rids:
            talker.remove(rid)
    print(f"aten ops per decode step: batch 1 {counts[1]}, batch 16 {counts[16]}")
    assert counts[1][0] == counts[1][1] and counts[16][0] == counts[16][1]
    # (a few more view ops inside cat and reshape at batch 16: not per row)
    assert counts[16][0] <= 1.1 * counts[1][0]


def test_max_len_from_the_config_and_prompt_too_long(make_talker):
    talker = make_talker(max_slots=2)
    assert talker.max_len == talker.model.config.max_position_embeddings
    short = make_talker(max_slots=2, max_len=40)
    with pytest.raises(ValueError, match="does not fit the talker's max_len 40"):
        short.add_request("x", **_prompt(short, 39))
    assert "x" not in short and short.kv_cache_bytes() == 0
    # fits: its codes are capped at what is left of max_len
    _start(short, "y", 30)
    n = 0
    while "y" in short:
        out = short.step(forced_codes={"y": 5})["y"]
        n += 1
    assert out.reason == "length" and n == 40 - 30 - 1
    small = make_talker(max_slots=2, max_len=1024, kv_cache_tokens=64)
    with pytest.raises(ValueError, match="does not fit the talker's KV pool of 64"):
        small.add_request("z", **_prompt(small, 63))


def _forced_run(talker: Talker, prompts: dict, codes: int) -> tuple[dict, dict]:
    """Teacher-force `codes` codes into every request, all admitted at once; returns each
    request's logits per step and the order its steps ran in."""
    forced = {
        rid: [(7 * i + 3 * k) % 8000 + 16 for k in range(codes)]
        for i, rid in enumerate(prompts)
    }
    for rid, n in prompts.items():
        _start(talker, rid, n, seed=len(rid) + n, max_codes=codes)
    logits = {rid: [] for rid in prompts}
    for _ in range(20 * codes):
        ready = talker.ready()
        if not ready:
            break
        force = {rid: forced[rid][len(logits[rid])] for rid in ready}
        for rid, out in talker.step(
            ready, forced_codes=force, return_logits=True
        ).items():
            logits[rid].append(out.logits)
    assert all(len(v) == codes for v in logits.values())
    return logits


def test_preempt_newest_when_the_pool_is_full_and_resume_by_recompute(make_talker):
    """A pool that holds about two requests serves six: requests wait for blocks in arrival
    order, the newest running one is preempted when the pool runs out, and resumes by
    recomputing its KV; every request gets all its codes, with the logits of an unpreempted run."""
    prompts = {f"r{i}": 20 + 5 * i for i in range(6)}
    codes = 60
    big = make_talker(max_slots=6, max_len=512, kv_cache_tokens=6 * 256)
    alone = _forced_run(big, prompts, codes)
    assert big.preemptions == 0
    small = make_talker(max_slots=6, max_len=512, kv_cache_tokens=2 * 112)
    tight = _forced_run(small, prompts, codes)
    print(f"preemptions: {small.preemptions}")
    assert small.preemptions > 0
    for rid in prompts:
        diff = (torch.stack(tight[rid]) - torch.stack(alone[rid])).abs().max().item()
        assert diff < 1e-4, (rid, diff)
    assert small.kv.num_free_blocks == small.kv.num_blocks


def test_preempt_keeps_seeded_sampling_codes(make_talker):
    """Seeded sampling through preemption: the codes equal those of the unpreempted run (the
    draw's step count continues across the recompute)."""

    def run(kv_tokens):
        talker = make_talker(max_slots=4, max_len=512, kv_cache_tokens=kv_tokens)
        for i in range(4):
            talker.add_request(
                f"s{i}",
                **_prompt(talker, 30 + 9 * i, seed=i),
                sampling=TalkerSampling(seed=100 + i),
                max_codes=50,
            )
            talker.add_thinker_rows(
                f"s{i}",
                torch.randn(
                    6,
                    2,
                    talker.model.config.embedding_size,
                    generator=torch.Generator().manual_seed(i),
                ),
            )
            talker.finish_thinker(f"s{i}")
        codes = {f"s{i}": [] for i in range(4)}
        while ready := talker.ready():
            for rid, out in talker.step(ready).items():
                codes[rid].append(out.code)
        return codes, talker.preemptions

    alone, none = run(4 * 128)
    tight, preempted = run(128)
    assert none == 0 and preempted > 0
    assert tight == alone


def _host_reads(talker: Talker, rids: list) -> int:
    """Device-to-host reads during one step: the ops that make the host wait for the device
    (`aten::_local_scalar_dense` behind .item()/int()/bool(), data-dependent shapes such as
    nonzero and boolean indexing) counted by the profiler, and `.tolist()` / `.numpy()` calls, which
    read a tensor without an op the profiler sees on the CPU."""
    sync_ops = {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }
    reads = []
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy

    def count(method):
        def counted(self, *args, **kwargs):
            reads.append(method.__name__)
            return method(self, *args, **kwargs)

        return counted

    with (
        mock.patch.object(torch.Tensor, "tolist", count(tolist)),
        mock.patch.object(torch.Tensor, "numpy", count(numpy)),
        torch.profiler.profile() as prof,
    ):
        outs = talker.step(rids)
    assert sorted(outs) == sorted(rids) and all(
        o.code is not None or o.finished for o in outs.values()
    )
    ops = sum(e.count for e in prof.key_averages() if e.key in sync_ops)
    return ops + len(reads)


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_host_sync_per_step_independent_of_batch(make_talker, sampling):
    talker = make_talker(max_slots=16, max_len=256)
    settings = [
        TalkerSampling(do_sample=False)
        if sampling == "greedy"
        else TalkerSampling(
            seed=i,
            top_k=10 + i,
            top_p=0.5 + i / 40,
            temperature=0.7 + i / 20,
            repetition_penalty=1.0 + i / 10,
        )
        for i in range(16)
    ]
    counts = {}
    for batch in (1, 16):
        rids = [f"{batch}-{i}" for i in range(batch)]
        for i, rid in enumerate(rids):
            talker.add_request(
                rid,
                **_prompt(talker, 5 + i, seed=i),
                sampling=settings[i],
                max_codes=100,
            )
            for _ in range(3):
                talker.add_thinker_token(
                    rid, *torch.randn(2, talker.model.config.embedding_size)
                )
            talker.finish_thinker(rid)
        prefill = _host_reads(talker, rids)
        live = [r for r in rids if r in talker]
        decode = _host_reads(talker, live)
        counts[batch] = (prefill, decode, len(live))
        for rid in rids:
            talker.remove(rid)
    print(
        f"host reads per step ({sampling}): batch 1 {counts[1][:2]}, batch 16 {counts[16][:2]}"
    )
    assert counts[16][2] > 8  # the decode step really ran a big batch
    assert counts[1][:2] == counts[16][:2] == (1, 1)


def test_talker_batching_benchmark_smoke(tmp_path):
    """benchmarks/talker_batching.py: its 7B talker config has the real sizes (1.35 B parameters,
    counted on the meta device), and `--smoke` (widths / 8) runs and writes its rows."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniTalkerForConditionalGeneration,
    )

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from talker_batching import talker_config
    finally:
        sys.path.remove(str(root / "benchmarks"))
    with torch.device("meta"):
        real = Qwen2_5OmniTalkerForConditionalGeneration(talker_config().talker_config)
    assert 1.34e9 < sum(p.numel() for p in real.parameters()) < 1.36e9

    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(root / "benchmarks" / "talker_batching.py"),
        "--smoke",
        "--batches",
        "1,4",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| dtype | threads | batch |" in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["batch"]) for r in rows] == [
        ("fp32", 1),
        ("fp32", 4),
        ("bf16", 1),
        ("bf16", 4),
    ]
    assert all(r["codes_per_s"] > 0 and r["kv_bytes"] > 0 for r in rows)


def test_talker_and_its_benchmark_import_without_vllm():
    """The device machine of the real-size benchmark has no vLLM: the talker must not need it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any `import vllm` now raises ImportError
        "sys.path.insert(0, 'benchmarks')\n"
        "import omni_vllm.talker, talker_batching\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[
        -2000:
    ]
