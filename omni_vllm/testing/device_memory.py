"""A simulated device memory for CPU tests: counts the bytes of live tensors that torch ops
create, records the peak, and raises `torch.OutOfMemoryError` past a capacity, at the allocation
that crosses it (as CUDA's caching allocator does).

It is a `TorchDispatchMode`, so it sees every tensor an op returns (factory functions inside
module constructors included) through the real code path; storages are counted once however many
views share them, and leave the count when their last tensor is freed. Tensors made outside the
mode (e.g. read from a file before it was entered) are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class SimulatedDeviceMemory(TorchDispatchMode):
    """`with SimulatedDeviceMemory(capacity=...) as mem: ...`; then `mem.peak` (bytes)."""

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity = capacity
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]

    def _free(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            if self.capacity is not None and self.live + nbytes > self.capacity:
                raise torch.OutOfMemoryError(
                    f"simulated device out of memory: tried to allocate {nbytes} bytes with {self.live} of "
                    f"{self.capacity} in use"
                )
            entry = self._storages[key] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out
