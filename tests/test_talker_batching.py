"""The Talker's memory and step costs as batch and context grow (tiny checkpoint, synthetic inputs).

Correctness against transformers is tests/test_talker.py; here: KV memory that follows the
requests' real lengths up to `kv_cache_tokens` (and what happens when it runs out), the length limit
from the config, attention on views of each request's buffer (no per-step copy that grows with the
context), and a constant number of device-to-host reads per step whatever the batch size.
"""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch

from omni_vllm.talker import Talker, TalkerFull, TalkerSampling

TEXT_ID = 100  # an ordinary text token of the tiny tokenizer (special tokens are 0..15)


@pytest.fixture(scope="module")
def make_talker(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniConfig

    from omni_vllm.checkpoint import load_prefixed

    config = Qwen2_5OmniConfig.from_pretrained(tiny_checkpoint_dir)
    base = Talker.from_pretrained(tiny_checkpoint_dir, max_slots=1, max_len=64)
    state = load_prefixed(tiny_checkpoint_dir, "talker.")

    def make(**kwargs):
        return Talker(config, dict(state), base.text_rows, base.voices, **kwargs)

    return make


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


def test_kv_memory_follows_use_in_blocks(make_talker):
    talker = make_talker(max_slots=8, max_len=512)
    cache = talker.kv
    per_token = cache.bytes_per_token
    tcfg = talker.model.config
    assert (
        per_token
        == tcfg.num_hidden_layers * 2 * tcfg.num_key_value_heads * tcfg.head_dim * 4
    )
    assert talker.kv_cache_bytes() == 0  # nothing allocated before a request comes
    _start(talker, "a", 10, max_codes=300)
    assert (
        talker.kv_cache_bytes() == cache.block_size * per_token
    )  # one block for 12 positions
    for _ in range(120):
        talker.step(
            forced_codes={"a": 5}
        )  # forced: random weights would sample a stop code some time
    used = cache.lengths["a"]
    assert used == 12 + 119
    allocated = talker.kv_cache_bytes() // per_token
    assert (
        allocated % cache.block_size == 0
        and used <= allocated <= used + used // 4 + cache.block_size
    )
    _start(talker, "b", 3)
    assert talker.kv_cache_bytes() == (allocated + cache.block_size) * per_token
    talker.remove("a")
    talker.remove("b")
    assert talker.kv_cache_bytes() == 0 and cache.allocated_tokens == 0


def test_attention_reads_views_of_the_request_buffer(make_talker):
    """What attention reads for a request is a view of its own buffer (no gather), and a decode
    step's allocations do not grow with the context."""
    talker = make_talker(max_slots=2, max_len=1024)
    _start(talker, "a", 8, max_codes=1000)
    talker.step(forced_codes={"a": 5})
    nothing = torch.zeros(1, talker.kv.num_kv_heads, 0, talker.kv.head_dim)
    keys, values = talker.kv.append("a", 0, nothing, nothing)
    buf = talker.kv.buffers["a"]
    assert keys.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert values.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert keys.shape[2] == talker.kv.lengths["a"]

    def step_allocations() -> int:
        talker.kv.reserve(
            "a", talker.kv.lengths["a"] + 1, 10_000
        )  # growth (rare) is not the step's
        with torch.profiler.profile(profile_memory=True) as prof:
            talker.step(forced_codes={"a": 5})
        return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())

    short = step_allocations()
    for _ in range(400):
        talker.step(forced_codes={"a": 5})
    long = step_allocations()
    print(
        f"decode step allocations: {short} B at ~10 positions, {long} B at ~410 positions"
    )
    # Attention's own work grows a little with the context (its scores); a copy of the cache would
    # add 400 positions x 2 x layers x kv width x 4 bytes.
    cache_copy = 400 * talker.kv.bytes_per_token
    assert long - short < cache_copy // 10


def test_max_len_from_the_config_and_prompt_too_long(make_talker):
    talker = make_talker(max_slots=2)
    assert talker.max_len == talker.model.config.max_position_embeddings
    short = make_talker(max_slots=2, max_len=40)
    with pytest.raises(ValueError, match="does not fit the talker's max_len 40"):
        short.add_request("x", **_prompt(short, 39))
    assert "x" not in short and short.kv_cache_bytes() == 0
    _start(short, "y", 30)  # fits: its codes are capped at what is left of max_len
    n = 0
    while "y" in short:
        out = short.step(forced_codes={"y": 5})["y"]
        n += 1
    assert out.reason == "length" and n == 40 - 30 - 1


def test_kv_cache_full_refuses_admission_and_ends_growing_requests(make_talker, caplog):
    talker = make_talker(max_slots=4, max_len=1024, kv_cache_tokens=3 * 64)
    _start(
        talker, "a", 100, max_codes=500
    )  # 102 positions: two blocks (no room for headroom beyond)
    assert talker.kv.allocated_tokens == 128
    with pytest.raises(
        TalkerFull,
        match="KV cache full.*needs 102 positions .in blocks of 64., 64 of 192 are free",
    ):
        talker.add_request("b", **_prompt(talker, 100))
    assert "b" not in talker and talker.num_free_slots == 3
    _start(talker, "c", 20, max_codes=500)  # takes the last block
    assert talker.kv.free_tokens == 0
    codes = {"a": 0, "c": 0}
    with caplog.at_level(logging.WARNING, logger="omni_vllm.talker"):
        for _ in range(30):
            for rid, out in talker.step(forced_codes={"a": 5, "c": 5}).items():
                codes[rid] += out.code is not None
                if out.finished:
                    assert out.reason == "length" and out.code is None
    # "a" filled its 128 positions (102 + 26 codes) and ended; "c" goes on in its own block.
    assert "a" not in talker and codes["a"] == 128 - 101
    assert "c" in talker and talker.kv.allocated_tokens == 64
    assert any(
        "ends after 27 codes: KV cache full" in r.getMessage() for r in caplog.records
    )
    _start(talker, "d", 10)  # freed memory is there for the next request
    assert "d" in talker


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
