"""Captured runs of the speech path's static-shape calls: one CUDA graph per bucket key.

The idea is vLLM's `CUDAGraphWrapper` (vllm/compilation/cuda_graph.py): the caller keeps its
inputs in static buffers (allocated once, padded to a bucket), writes each call's inputs into
them, and asks `GraphCache.run(key, fn)` for the outputs. On CUDA, the first call for a key warms
`fn` up on a side stream and captures it into a `torch.cuda.CUDAGraph` (all graphs share one
memory pool); every later call replays the graph, so a talker step or a Token2Wav window batch is
one launch on the host, whatever its depth. Everywhere else (CPU, or capture turned off with
`--speech-enforce-eager`) `fn` simply runs.

`fn` must read only the static buffers and return tensors (or a tuple of them) that the caller
reads before the next call of the same key: a replay overwrites them. The host must do no
device->host read inside `fn` (capture forbids it): the callers keep those outside. Warm-up and
capture run `fn` for real: a function with side effects on state (a sampler's step counts)
is captured ahead with dummy inputs in the buffers (`capture(key, fn)`, as vLLM captures with
dummy runs), then run with the real ones.

Bucket helpers: `batch_buckets(n)` (1, 2, 4, 8, ... up to n, n itself included) and
`bucket_for(size, buckets)` (the smallest bucket that holds `size`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

__all__ = ["GraphCache", "batch_buckets", "bucket_for"]

logger = logging.getLogger(__name__)


def batch_buckets(largest: int, *, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `largest`, then `largest` itself (vLLM's capture
    sizes are a list of the same kind)."""
    if largest < 1:
        raise ValueError("the largest bucket must be >= 1")
    sizes, n = [], max(1, smallest)
    while n < largest:
        sizes.append(n)
        n *= 2
    sizes.append(largest)
    return sizes


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest of the (sorted) `buckets` that holds `size`; ValueError past the largest."""
    i = bisect.bisect_left(buckets, size)
    if i == len(buckets):
        raise ValueError(f"{size} is larger than the largest bucket {buckets[-1]}")
    return buckets[i]


def _capture_cuda(
    fn: Callable[[], Any], pool, warmup: int
) -> tuple[Callable[[], None], Any]:
    """Warm `fn` up on a side stream, capture it; returns (replay, the static outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's unsafe CUDA calls break the capture; the speech path
    # captures Token2Wav window calls on the decoder's thread (omni_vllm.speech.decoder) while
    # the worker's thread keeps running (and reading back) talker steps on its own stream.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = fn()
    return graph.replay, outputs


class GraphCache:
    """Runs `fn` captured per key on CUDA (see the module docstring), eagerly otherwise.

    `capture` (tests) replaces the CUDA capture: it gets `(fn, pool, warmup)` and returns
    `(replay, outputs)` (outputs valid once `replay` has run), which lets a CPU test exercise the cache, its keys and the replay
    contract the way CUDA would use them."""

    def __init__(
        self,
        name: str,
        *,
        device: torch.device | str,
        enabled: bool = True,
        warmup: int = 2,
        capture: Callable | None = None,
    ):
        self.name = name
        self.device = torch.device(device)
        self.warmup = warmup
        self._capture = capture
        if capture is None and self.device.type != "cuda":
            enabled = False
        self.enabled = enabled
        self._graphs: dict[Hashable, tuple[Callable[[], None], Any]] = {}
        self._pool = None
        self.captures = 0
        self.replays = 0

    @property
    def keys(self) -> list:
        return list(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def capture(self, key: Hashable, fn: Callable[[], Any]) -> None:
        """Capture `fn` for `key` now (no replay): with dummy inputs in the static buffers."""
        if self.enabled and key not in self._graphs:
            self._graphs[key] = self._capture_one(key, fn)

    def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """The outputs of `fn` for this key: captured once, then replayed (or run eagerly)."""
        if not self.enabled:
            return fn()
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture_one(key, fn)
        replay, outputs = entry
        # a capture records without running: the first call replays too
        replay()
        self.replays += 1
        return outputs

    def _capture_one(self, key, fn):
        self.captures += 1
        if self._capture is not None:
            return self._capture(fn, self._pool, self.warmup)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        logger.debug("%s: capturing a CUDA graph for %s", self.name, key)
        return _capture_cuda(fn, self._pool, self.warmup)

    def clear(self) -> None:
        """Drop every graph (their memory returns to the pool's allocator)."""
        self._graphs.clear()
        self._pool = None
