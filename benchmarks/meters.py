"""The measuring tools the benchmarks share: timing and peak memory on one device, a
process-tree RSS / CPU meter, the cores a process may use.

Its own module so that benchmarks/real_size.py (one process, one device) and benchmarks/e2e.py
(worker processes with vLLM's EngineCore below them) read time and memory the same way. No vLLM
here (real_size.py runs where it is not installed); torch and psutil are imported where used.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from pathlib import Path


def cores() -> int:
    """The cores this process may run on (all of them, for the equal-cores comparison)."""
    return (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1
    )


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so that a clock read after it counts it."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def gpu_peak_mib() -> float | None:
    """`torch.cuda.max_memory_allocated` in MiB; None without CUDA."""
    import torch

    return (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    )


# The dtype labels and their torch dtypes: `tf32` is float32 with TF32 tensor-core matmuls and
# convolutions allowed (`Device.use`), `fp32` float32 with TF32 off.
DTYPE_LABELS = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16"}


class Device:
    """Timing and peak memory on one device; TF32 per dtype label."""

    def __init__(self, name: str):
        self.name, self.cuda = name, name.startswith("cuda")

    def use(self, label: str):
        """The torch dtype of `label`, with TF32 switched on for `tf32` only (one global switch)."""
        import torch

        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
                label == "tf32"
            )
        return getattr(torch, DTYPE_LABELS[label])

    def sync(self) -> None:
        sync(self.name)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):  # resets VmHWM to the current RSS
                Path("/proc/self/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        """CUDA: `torch.cuda.max_memory_allocated`; CPU: peak RSS (VmHWM) since `reset_peak`."""
        if self.cuda:
            return gpu_peak_mib()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


class Meter:
    """Peak resident memory (sampled) and CPU seconds of this process and its children (vLLM's
    EngineCore runs in one), per phase."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self._peak = self._rss()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="bench-meter", daemon=True).start()

    def _tree(self):
        return [self._proc, *self._proc.children(recursive=True)]

    def _rss(self) -> int:
        total = 0
        for p in self._tree():
            with contextlib.suppress(Exception):  # a child that just exited
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while True:
            rss = self._rss()
            with self._lock:
                self._peak = max(self._peak, rss)
            time.sleep(self._interval)

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def phase(self) -> tuple[float, float]:
        """(peak RSS MiB since the previous call, CPU seconds now); starts the next phase."""
        with self._lock:
            peak, self._peak = self._peak, self._rss()
        return peak / 2**20, self.cpu_seconds()
