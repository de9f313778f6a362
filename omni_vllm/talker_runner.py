"""The talker's model runner: static buffers, batch buckets, one captured decode step per bucket.

Modelled on vLLM's GPU model runner. The Talker (omni_vllm.talker) decides which requests run a
step; this runner turns them into device work at a host cost that does not grow with the batch:

* **Layers**: q/k/v are one matmul and gate/up one (`fuse_projections`, stacked once at load
  from the checkpoint's tensors), as vLLM's merged linear layers.
* **Decode** (one new token per request, the steady state): the step's inputs go into static
  buffers allocated once for the largest bucket: the reply-track rows (one `cat` of the requests'
  rows), and one pinned int64 block with every row's last code, position, KV slot, length,
  sampler slot, forced code and block table, uploaded with one non-blocking copy. The batch is
  padded to a bucket of `batch_buckets(max_batch)` and the block tables to a width bucket; padded
  rows write into the pool's null block and sample into the sampler's dummy slot. The forward
  (projection, every layer with one KV scatter and one attention call, the head) and the sampling
  run as one function of those buffers, captured per (batch bucket, width bucket, sampling
  candidate width: omni_vllm.talker_sampler) as a CUDA graph on CUDA (omni_vllm.capture.GraphCache), eager elsewhere or with `enforce_eager`. A bucket is
  captured the first time a step needs it, on padding rows (null block, dummy sampler slot), so
  the capture's runs change no request's state; its memory comes from one pool shared by all
  graphs, sized for the largest (the memory plan counts it).
* **Prefill** (a request's prompt, or its recompute after preemption): eager, all of a step's
  prefills padded into one forward.

A step's codes and stop flags come back to the host in one read (`Talker.step` does it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    apply_rotary_pos_emb,
)

from omni_vllm.capture import GraphCache, batch_buckets, bucket_for
from omni_vllm.talker_attention import (
    DecodeMetadata,
    PrefillMetadata,
    TorchPagedAttention,
)
from omni_vllm.talker_kv_cache import NULL_BLOCK, TalkerKVPool, blocks_for
from omni_vllm.talker_sampler import CodecSampler

__all__ = ["DecodeRow", "PrefillRow", "TalkerModelRunner", "fuse_projections"]

# columns of the per-row int block uploaded for a decode step (the block table follows)
_LAST, _POS, _SLOT, _LEN, _SAMPLER, _FORCED, _TABLE = range(7)


class _Fused:
    """One decoder layer's q/k/v projections as one matmul and its gate/up as one (vLLM's
    QKVParallelLinear and MergedColumnParallelLinear idea: fewer launches per layer). The
    layer's own modules keep working: their weights become views of the stacked tensors."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_sizes = [p.out_features for p in projections]
        self.qkv_weight = _stack(projections, "weight")
        self.qkv_bias = (
            None if attn.q_proj.bias is None else _stack(projections, "bias")
        )
        self.gate_up = _stack((mlp.gate_proj, mlp.up_proj), "weight")
        if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
            raise ValueError(
                "a talker MLP with biases is not the Qwen2.5-Omni talker's"
            )
        self.act = mlp.act_fn

    def qkv(self, x: torch.Tensor):
        return F.linear(x, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, -1)

    def mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, -1)
        return layer.mlp.down_proj(self.act(gate) * up)


def _stack(modules, name: str) -> torch.Tensor:
    """`modules`' parameter `name` stacked along dim 0; each module's becomes a view of it."""
    stacked = torch.cat([getattr(m, name).detach() for m in modules])
    start = 0
    for m in modules:
        n = getattr(m, name).shape[0]
        setattr(m, name, torch.nn.Parameter(stacked[start : start + n], False))
        start += n
    return stacked


def fuse_projections(model) -> list[_Fused]:
    """Stacked projections of every layer of a talker `model` (see `_Fused`)."""
    return [_Fused(layer) for layer in model.model.layers]


@dataclass
class DecodeRow:
    """One request's decode input: its reply-track row (1, E) on the device, the code it sampled
    last, the position and KV length after this token, and its block table."""

    reply: torch.Tensor
    last_code: int
    position: int
    kv_len: int
    blocks: list[int]
    sampler_slot: int
    forced: int = -1


@dataclass
class PrefillRow:
    """One request's prefill: inputs (Q, E) and TMRoPE positions (3, Q), both on the device, the
    pool slots of its Q tokens, its sampler slot."""

    inputs: torch.Tensor
    positions: torch.Tensor
    slots: list[int]
    sampler_slot: int
    forced: int = -1


class TalkerModelRunner:
    """Runs talker forwards over the KV pool for `max_batch` decode rows at most (see the module
    docstring). `model`: transformers' `Qwen2_5OmniTalkerForConditionalGeneration`."""

    def __init__(
        self,
        model,
        pool: TalkerKVPool,
        sampler: CodecSampler,
        *,
        max_batch: int,
        max_len: int,
        enforce_eager: bool = False,
        capture=None,
    ):
        self.model, self.pool, self.sampler = model, pool, sampler
        self.device, self.dtype = pool.device, pool.dtype
        cfg = model.config
        self.head_dim = cfg.head_dim
        self.attn = TorchPagedAttention(
            scale=model.model.layers[0].self_attn.scaling,
            gqa=cfg.num_attention_heads != cfg.num_key_value_heads,
        )
        self.fused = fuse_projections(model)
        self.batch_buckets = batch_buckets(max_batch)
        self.max_batch = self.batch_buckets[-1]
        self.max_blocks = blocks_for(max_len, pool.block_size)
        self.width_buckets = batch_buckets(self.max_blocks)
        embed = model.thinker_to_talker_proj.in_features
        self.reply = torch.zeros(
            self.max_batch, embed, device=self.device, dtype=self.dtype
        )
        columns = _TABLE + self.max_blocks
        pin = self.device.type == "cuda"
        self.ints_host = torch.zeros(
            self.max_batch, columns, dtype=torch.long, pin_memory=pin
        )
        self.ints = torch.zeros(
            self.max_batch, columns, dtype=torch.long, device=self.device
        )
        self.key_index = torch.arange(
            self.max_blocks * pool.block_size, device=self.device
        )
        self._pad_row = np.zeros(columns, dtype=np.int64)
        self._pad_row[[_LEN, _SAMPLER, _FORCED]] = (1, sampler.dummy, -1)
        self.graphs = GraphCache(
            "talker decode",
            device=self.device,
            enabled=not enforce_eager,
            capture=capture,
        )

    @property
    def captured(self) -> bool:
        return self.graphs.enabled

    def decode_key(self, batch: int, widest: int) -> tuple[int, int]:
        """(batch bucket, block-table width bucket) of a decode step; with the sampler's
        candidate width, its graph's key."""
        return bucket_for(batch, self.batch_buckets), bucket_for(
            widest, self.width_buckets
        )

    # ------------------------------------------------------------------ decode

    def decode(self, rows: list[DecodeRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stops (2, n) and fp32 logits (n, vocab) of one decode step, on the device.
        The logits are the static buffer's: read them before the next step."""
        n = len(rows)
        batch, width = self.decode_key(n, max(len(r.blocks) for r in rows))
        top = self.sampler.width([r.sampler_slot for r in rows])
        key = (batch, width, top)
        step = lambda: self._decode_step(batch, width, top)  # noqa: E731
        if self.graphs.enabled and key not in self.graphs:
            # capture on padding rows only: they write the null block and sample into the
            # dummy slot, so warm-up and capture change no request's state
            self.ints[:batch].copy_(torch.from_numpy(self._pad_rows(batch)))
            self.graphs.capture(key, step)
        ints = self._pad_rows(batch)
        for i, r in enumerate(rows):
            ints[i, :_TABLE] = (
                r.last_code,
                r.position,
                r.blocks[(r.kv_len - 1) // self.pool.block_size] * self.pool.block_size
                + (r.kv_len - 1) % self.pool.block_size,
                r.kv_len,
                r.sampler_slot,
                r.forced,
            )
            ints[i, _TABLE : _TABLE + len(r.blocks)] = r.blocks
        self.ints_host[:batch].copy_(torch.from_numpy(ints))
        self.ints[:batch].copy_(self.ints_host[:batch], non_blocking=True)
        self.reply[:n].copy_(torch.cat([r.reply for r in rows]))
        out, logits = self.graphs.run(key, step)
        return out[:, :n], logits[:n]

    def _pad_rows(self, batch: int) -> np.ndarray:
        return np.tile(self._pad_row, (batch, 1))

    def _decode_step(
        self, batch: int, width: int, top: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured function: reads the first `batch` rows of the static buffers only."""
        m, d = self.model, self.head_dim
        ints = self.ints[:batch]
        slot_mapping = ints[:, _SLOT]
        embeds = self.reply[:batch] + m.get_input_embeddings()(ints[:, _LAST])
        h = m.thinker_to_talker_proj(embeds)[:, None]
        positions = ints[:, _POS].view(1, batch, 1).expand(3, batch, 1)
        cos, sin = m.model.rotary_emb(h, positions)
        span = width * self.pool.block_size
        mask = self.key_index[:span][None] < ints[:, _LEN, None]
        meta = DecodeMetadata(
            slot_mapping=slot_mapping,
            block_table=ints[:, _TABLE : _TABLE + width],
            mask=mask.view(batch, 1, 1, span),
        )
        for i, layer in enumerate(m.model.layers):
            fused, cache = self.fused[i], self.pool.layer(i)
            q, k, v = fused.qkv(layer.input_layernorm(h))
            q = q.view(batch, 1, -1, d).transpose(1, 2)
            k = k.view(batch, 1, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.attn.write(cache, slot_mapping, k[:, :, 0], v.view(batch, -1, d))
            out = self.attn.decode(q, cache, meta)
            h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            h = h + fused.mlp(layer, layer.post_attention_layernorm(h))
        logits = m.codec_head(m.model.norm(h[:, 0])).float()
        codes = self.sampler.sample(ints[:, _SAMPLER], logits, ints[:, _FORCED], top)
        return codes, logits

    # ------------------------------------------------------------------ prefill

    def prefill(self, rows: list[PrefillRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stops (2, n) and fp32 logits (n, vocab) at each prefill's last input."""
        m, d = self.model, self.head_dim
        n = len(rows)
        lengths = [r.inputs.shape[0] for r in rows]
        width = max(lengths)
        inputs = torch.nn.utils.rnn.pad_sequence(
            [r.inputs for r in rows], batch_first=True
        )
        positions = torch.nn.utils.rnn.pad_sequence(
            [r.positions.T for r in rows], batch_first=True
        ).permute(2, 0, 1)
        ints = np.zeros((n, width + 3), dtype=np.int64)
        ints[:, 0] = lengths
        for i, r in enumerate(rows):
            ints[i, 1], ints[i, 2] = r.sampler_slot, r.forced
            # padded tokens write into the null block (its position 0)
            ints[i, 3 : 3 + lengths[i]] = r.slots
        ints = torch.from_numpy(ints).to(self.device)
        length, slot_mapping = ints[:, 0], ints[:, 3:].reshape(-1)
        index = torch.arange(width, device=self.device)
        mask = (index[None, None, :] <= index[None, :, None]) & (
            index[None, None, :] < length[:, None, None]
        )
        meta = PrefillMetadata(slot_mapping=slot_mapping, mask=mask[:, None])
        h = m.thinker_to_talker_proj(inputs.to(self.dtype))
        cos, sin = m.model.rotary_emb(h, positions)
        for i, layer in enumerate(m.model.layers):
            attn, cache = layer.self_attn, self.pool.layer(i)
            q, k, v = self.fused[i].qkv(layer.input_layernorm(h))
            q = q.view(n, width, -1, d).transpose(1, 2)
            k = k.view(n, width, -1, d).transpose(1, 2)
            v = v.view(n, width, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.attn.write(
                cache,
                slot_mapping,
                k.transpose(1, 2).reshape(n * width, -1, d),
                v.transpose(1, 2).reshape(n * width, -1, d),
            )
            out = self.attn.prefill(q, k, v, meta)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(n, width, -1))
            h = h + self.fused[i].mlp(layer, layer.post_attention_layernorm(h))
        last = h[torch.arange(n, device=self.device), length - 1]
        logits = m.codec_head(m.model.norm(last)).float()
        top = self.sampler.width([r.sampler_slot for r in rows])
        codes = self.sampler.sample(ints[:, 1], logits, ints[:, 2], top)
        return codes, logits


assert NULL_BLOCK == 0, "padded rows and tables use block 0 (zeros in the int buffers)"
