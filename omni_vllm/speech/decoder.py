"""Token2Wav window calls off the speech worker's thread, so that the talker never waits for them.

The worker keeps the bookkeeping (which windows, the streams' state: omni_vllm.streaming's
`begin` / `finish`) and hands each planned call's tensor work (`WindowRunner.run`: the DiT solve
and BigVGAN) to a `WindowDecoder`. Threaded (the default on CUDA), the decoder runs it on its own
thread and, on CUDA, its own stream, while the worker keeps running talker steps on theirs; the
worker applies the result when it comes back (`collect`). At most one call is in flight: the next
call's vocoder context is this call's mel, and the scheduler picks the next call's windows when
this one has been applied. Not threaded (the default on the CPU, where both halves would share the
same cores and a thread gains nothing), `submit` runs the call at once, which is the worker's
order before the decoder existed: the same windows decoded, the same audio.

The worker's tensor work on a call's outputs (`finish`: the new final mel appended to each
stream) runs under `context()`, i.e. on the decoder's stream, so that every Token2Wav tensor is
made and freed on one stream (no cross-stream use for the caching allocator to track). Not run on
a GPU yet: the stream overlap is checked by reading; CPU tests run the threaded path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from omni_vllm.streaming import WindowCall, WindowResult
from omni_vllm.token2wav_runner import WindowRunner

logger = logging.getLogger("omni_vllm.speech")


class Decoded(NamedTuple):
    """A finished call: its result (None on error), the seconds its tensor work took, the error."""

    call: WindowCall
    result: WindowResult | None
    seconds: float
    error: BaseException | None


class WindowDecoder:
    """Runs one window call at a time for the worker (see the module docstring)."""

    def __init__(
        self, runner: WindowRunner, wake: Callable[[], None], *, threaded: bool
    ):
        """`wake`: called (from the decoder's thread) when a result is ready to collect."""
        self.runner, self.wake, self.threaded = runner, wake, threaded
        device = runner.t2w.device
        self.stream = (
            torch.cuda.Stream(device=device)
            if threaded and device.type == "cuda"
            else None
        )
        self._cond = threading.Condition()
        self._call: WindowCall | None = None  # submitted, not started
        self._done: Decoded | None = None  # finished, not collected
        self._busy = False  # a call submitted and not collected
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """A call is in flight (submitted and its result not collected)."""
        return self._busy

    @property
    def has_result(self) -> bool:
        return self._done is not None

    def context(self):
        """Where the worker's own tensor work on Token2Wav outputs runs: the decoder's stream."""
        return (
            torch.cuda.stream(self.stream)
            if self.stream is not None
            else contextlib.nullcontext()
        )

    def submit(self, call: WindowCall) -> None:
        """Start the call's tensor work (threaded: on the decoder's thread; else now)."""
        if self._busy:
            raise RuntimeError("a window call is already in flight")
        self._busy = True
        if not self.threaded:
            self._done = self._run(call)
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="omni-token2wav", daemon=True
            )
            self._thread.start()
        with self._cond:
            self._call = call
            self._cond.notify()

    def collect(self) -> Decoded | None:
        """The finished call, once (None: none finished)."""
        with self._cond:
            done, self._done = self._done, None
        if done is not None:
            self._busy = False
        return done

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self, call: WindowCall) -> Decoded:
        t0 = time.perf_counter()
        try:
            with self.context(), torch.no_grad():
                result = self.runner.run(call)
            return Decoded(call, result, time.perf_counter() - t0, None)
        except Exception as e:  # handed to the worker, which fails the call's requests
            return Decoded(call, None, time.perf_counter() - t0, e)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._call is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                call, self._call = self._call, None
            done = self._run(call)
            with self._cond:
                self._done = done
            self.wake()
