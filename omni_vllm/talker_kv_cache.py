"""The talker's KV memory: one block pool allocated once, per-request block tables.

As vLLM's paged KV cache: the pool is one tensor per layer of `num_blocks` blocks of
`block_size` positions, allocated once at start-up to the size the memory plan gives it; a
request holds a list of blocks (its block table) that grows with its real length and returns to
the free list when it ends or is preempted. Nothing is allocated, moved or copied per request
while the server runs, and a step writes every new key and value of every layer with one scatter
(`slot_mapping`: pool position of each new token) and reads them with one gather of the batch's
block tables (omni_vllm.talker_attention).

Block 0 is the null block: never handed out, it is where padded rows of a static-shape step write
and what padded block-table entries point at, so a captured step needs no branch for them.

Admission and preemption are the caller's policy (omni_vllm.talker): this class only says how
many blocks are free, hands them out, and takes them back.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_SIZE", "TalkerKVPool", "round_up", "blocks_for"]

NULL_BLOCK = 0
# positions per block (vLLM's default block size)
BLOCK_SIZE = 16


def round_up(n: int, block: int) -> int:
    """`n` rounded up to whole blocks."""
    return -(-n // block) * block


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return -(-num_tokens // block_size)


class TalkerKVPool:
    """`num_blocks` usable blocks of `block_size` positions for a decoder of `num_layers` layers
    (plus the null block). `kv[layer]` is (2, num_blocks + 1, block_size, kv_heads, head_dim)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int,
        block_size: int = BLOCK_SIZE,
    ):
        if max_tokens < block_size:
            raise ValueError(
                f"talker KV pool of {max_tokens} positions is smaller than one block ({block_size})"
            )
        self.num_layers, self.num_kv_heads, self.head_dim = (
            num_layers,
            num_kv_heads,
            head_dim,
        )
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.num_blocks = max_tokens // block_size
        self.max_tokens = self.num_blocks * block_size
        # One allocation for the whole pool, the null block first.
        self.kv = torch.zeros(
            (num_layers, 2, self.num_blocks + 1, block_size, num_kv_heads, head_dim),
            device=device,
            dtype=dtype,
        )
        self.free_blocks: list[int] = list(range(self.num_blocks, 0, -1))
        # rid -> its blocks, in order
        self.block_tables: dict[object, list[int]] = {}
        # rid -> positions written
        self.lengths: dict[object, int] = {}

    @property
    def bytes_per_token(self) -> int:
        return (
            self.num_layers
            * 2
            * self.num_kv_heads
            * self.head_dim
            * self.dtype.itemsize
        )

    def pool_bytes(self) -> int:
        """Bytes the pool holds on its device (allocated once), the null block included."""
        return self.kv.numel() * self.kv.element_size()

    def bytes(self) -> int:
        """Bytes of the pool in use by requests now."""
        return self.used_blocks * self.block_size * self.bytes_per_token

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def free_tokens(self) -> int:
        return len(self.free_blocks) * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use (vLLM's kv_cache_usage)."""
        return self.used_blocks / self.num_blocks

    def blocks_needed(self, rid, num_tokens: int) -> int:
        """Blocks `rid` still lacks to hold `num_tokens` positions in total."""
        have = len(self.block_tables.get(rid, ()))
        return max(0, blocks_for(num_tokens, self.block_size) - have)

    def allocate(self, rid, num_tokens: int) -> bool:
        """Give `rid` the blocks it lacks to hold `num_tokens` positions; False, changing nothing,
        when the pool has not enough free blocks."""
        need = self.blocks_needed(rid, num_tokens)
        if need > len(self.free_blocks):
            return False
        table = self.block_tables.setdefault(rid, [])
        self.lengths.setdefault(rid, 0)
        for _ in range(need):
            table.append(self.free_blocks.pop())
        return True

    def free(self, rid) -> None:
        """Return `rid`'s blocks to the pool (unknown ids are ignored)."""
        table = self.block_tables.pop(rid, None)
        if table is not None:
            self.free_blocks.extend(reversed(table))
            del self.lengths[rid]

    def __contains__(self, rid) -> bool:
        return rid in self.block_tables

    def slots(self, rid, start: int, count: int) -> list[int]:
        """Pool positions (block * block_size + offset) of `rid`'s positions [start, start+count)."""
        table, bs = self.block_tables[rid], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + count)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `i`'s keys and values, (num_blocks + 1, block_size, kv_heads, head_dim) each."""
        return self.kv[i, 0], self.kv[i, 1]
