"""The talker's attention over its paged KV pool: one interface, a plain-PyTorch backend.

A talker step has two groups of requests (omni_vllm.talker_runner): prefills (a request's whole
prompt, or its recompute after preemption: its keys are only its own new ones) and decodes (one
new token each, reading everything its block table holds). Per layer and per group the backend
does a constant number of ops whatever the batch: one scatter of the new keys and values into the
pool (`write`), then one attention call (`prefill`: causal over the padded new tokens; `decode`:
one gather of the batch's block tables, then SDPA with a per-row length mask).

`TorchPagedAttention` runs on any device torch runs on (the CPU tests, and the device machine,
which has torch but not vLLM). Its gather reads `width * block_size` positions per decode row
(the block-table bucket), which is memory traffic a paged kernel would not spend: a faster CUDA
kernel (FlexAttention's block-sparse Triton kernel, or vLLM's paged attention) can sit behind the
same three methods.

Metadata is built on the host from the block tables and uploaded once per step
(`PrefillMetadata`, `DecodeMetadata`); inside a captured decode step only their static device
buffers are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DecodeMetadata", "PrefillMetadata", "TorchPagedAttention"]


@dataclass
class PrefillMetadata:
    """A group of prefills padded to (B, Q): `slot_mapping` (B * Q,) pool positions of the new
    tokens (padding: the null block), `mask` (B, 1, Q, Q) causal within each row's length."""

    slot_mapping: torch.Tensor
    mask: torch.Tensor


@dataclass
class DecodeMetadata:
    """A group of decodes, one token each: `slot_mapping` (B,), `block_table` (B, W) block ids
    (padding: the null block), `mask` (B, 1, 1, W * block_size) keys within each row's length."""

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    mask: torch.Tensor


class TorchPagedAttention:
    """Paged attention in plain PyTorch (see the module docstring)."""

    def __init__(self, *, scale: float, gqa: bool):
        self.scale, self.gqa = scale, gqa

    @staticmethod
    def write(
        cache: tuple[torch.Tensor, torch.Tensor],
        slot_mapping: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        """Scatter new keys/values (N, kv_heads, head_dim) to pool positions `slot_mapping` (N,)."""
        k_cache, v_cache = cache
        heads, dim = k_cache.shape[-2:]
        k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, key)
        v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, value)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: PrefillMetadata,
    ) -> torch.Tensor:
        """q (B, heads, Q, D), k/v (B, kv_heads, Q, D): each row attends to its own new tokens."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=meta.mask, scale=self.scale, enable_gqa=self.gqa
        )

    def decode(
        self,
        q: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: DecodeMetadata,
    ) -> torch.Tensor:
        """q (B, heads, 1, D): each row attends to the keys its block table holds."""
        k_cache, v_cache = cache
        batch, width = meta.block_table.shape
        _, block, heads, dim = k_cache.shape
        keys = k_cache[meta.block_table].view(batch, width * block, heads, dim)
        values = v_cache[meta.block_table].view(batch, width * block, heads, dim)
        return F.scaled_dot_product_attention(
            q,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=meta.mask,
            scale=self.scale,
            enable_gqa=self.gqa,
        )
