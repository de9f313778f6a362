"""The talker's KV memory: one contiguous buffer per request, grown in blocks as it speaks.

Why this shape: a talker request's attention reads only its own keys and values, so each request
keeps them in one buffer of shape (layers, 2, kv_heads, capacity, head_dim) and attention runs on a
view of it (`SDPA(q, buffer[layer, 0, :, :length], ...)`): nothing is gathered or copied per step.
The buffer is allocated when the request is admitted and grows, in whole blocks, when its length
reaches its capacity; growth moves what is there into a larger buffer once (capacity grows by a
quarter, at least one block, so a request of L positions is moved at most a few times over its life
and its buffer is never more than a quarter plus one block larger than its use). What is
allocated, over all requests, never exceeds `max_tokens` positions: when a request cannot grow
within it, `reserve` says so and the caller ends that request. (While one request's buffer grows,
its old buffer lives on until the copy is done: a memory budget adds one request's buffer.)

A paged pool (vLLM's block tables) would also avoid the over-allocation, but needs a paged
attention kernel to read a request's blocks without gathering them; plain PyTorch (CPU, and the
device machine without vLLM) has none, and SDPA on a contiguous view is what both devices run well.
"""

from __future__ import annotations

import torch

__all__ = ["TalkerKVCache"]


def round_up(n: int, block: int) -> int:
    """`n` rounded up to whole blocks (KV buffers are allocated in blocks)."""
    return -(-n // block) * block


class TalkerKVCache:
    """Per-request KV buffers for a decoder of `num_layers` layers, at most `max_tokens` positions
    allocated over all requests together, in blocks of `block_size` positions."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int,
        block_size: int = 64,
    ):
        if max_tokens < block_size:
            raise ValueError(
                f"talker KV cache of {max_tokens} positions is smaller than one block ({block_size})"
            )
        self.num_layers, self.num_kv_heads, self.head_dim = (
            num_layers,
            num_kv_heads,
            head_dim,
        )
        self.device, self.dtype = device, dtype
        self.max_tokens, self.block_size = max_tokens, block_size
        self.buffers: dict[
            object, torch.Tensor
        ] = {}  # rid -> (layers, 2, kv_heads, capacity, head_dim)
        # rid -> per layer (keys, values) views of its buffer, (1, kv_heads, capacity, head_dim) each
        self.layer_views: dict[object, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.lengths: dict[object, int] = {}  # rid -> positions written
        self.allocated_tokens = 0

    @property
    def bytes_per_token(self) -> int:
        return (
            self.num_layers
            * 2
            * self.num_kv_heads
            * self.head_dim
            * self.dtype.itemsize
        )

    def bytes(self) -> int:
        """Bytes of KV memory allocated now."""
        return self.allocated_tokens * self.bytes_per_token

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self.allocated_tokens

    def capacity(self, rid) -> int:
        buf = self.buffers.get(rid)
        return 0 if buf is None else buf.shape[3]

    def reserve(self, rid, num_tokens: int, most: int) -> bool:
        """Make room for `num_tokens` positions of `rid` in total (a request never needs more than
        `most`); False, changing nothing, when that does not fit in what is left of `max_tokens`."""
        have = self.capacity(rid)
        if num_tokens <= have:
            return True
        block = self.block_size
        want = min(
            round_up(max(num_tokens, have + max(block, have // 4)), block),
            round_up(most, block),
        )
        need = round_up(num_tokens, block)
        target = max(want, need)
        if target - have > self.free_tokens:
            target = need  # no headroom: exactly the blocks this step needs
            if target - have > self.free_tokens:
                return False
        buf = torch.empty(
            (self.num_layers, 2, self.num_kv_heads, target, self.head_dim),
            device=self.device,
            dtype=self.dtype,
        )
        length = self.lengths.get(rid, 0)
        if length:
            buf[:, :, :, :length] = self.buffers[rid][:, :, :, :length]
        self.buffers[rid] = buf
        self.layer_views[rid] = [
            (buf[i, 0, None], buf[i, 1, None]) for i in range(self.num_layers)
        ]
        self.lengths[rid] = length
        self.allocated_tokens += target - have
        return True

    def release(self, rid) -> None:
        """Free `rid`'s buffer (unknown ids are ignored)."""
        buf = self.buffers.pop(rid, None)
        if buf is not None:
            self.allocated_tokens -= buf.shape[3]
            del self.lengths[rid], self.layer_views[rid]

    def append(
        self, rid, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values (1, kv_heads, q, head_dim) after `rid`'s current length
        and return views of all its keys/values so far, (1, kv_heads, length + q, head_dim) each. The
        length advances once the last layer has written (`advance`)."""
        keys, values = self.layer_views[rid][layer]
        start = self.lengths[rid]
        end = start + key.shape[2]
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, rid, num_tokens: int) -> None:
        self.lengths[rid] += num_tokens
