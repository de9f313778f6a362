"""SpeechJob: the event-loop side of one audio request, and the routing of what arrives
for it.

Kept apart from the engine (omni_vllm.speech.engine), which runs requests (admits them,
starts their producer, consumes, releases): a job is what one request gathers on the way.
The thinker's hidden-state rows are held until its prompt ids are known and then become
the worker's `AddRequest`; the worker's outputs go into its `RequestCollector`; its last
chunk gets the finish reason and counts. Its admission state is a `Ticket`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import torch

from omni_vllm.hidden_states import HiddenStatesChunk, check_next
from omni_vllm.speech.admission import Ticket
from omni_vllm.speech.outputs import RequestCollector, SpeechChunk
from omni_vllm.speech.worker import AddRequest, WorkerOutput
from omni_vllm.talker import TalkerSampling

logger = logging.getLogger("omni_vllm.speech")


class SpeechJob(Ticket):
    """Loop-side state of one audio request."""

    def __init__(
        self,
        rid: str,
        voice: str,
        sampling: TalkerSampling,
        noise: Any,
        max_codes: int | None,
    ):
        super().__init__()
        self.rid, self.voice, self.sampling, self.noise, self.max_codes = (
            rid,
            voice,
            sampling,
            noise,
            max_codes,
        )
        self.out = RequestCollector()
        self.t_arrival = time.monotonic()
        self.t_first_audio: float | None = None
        self.pending_rows: list[
            torch.Tensor
        ] = []  # rows before the prompt ids are known
        self.positions: torch.Tensor | None = None
        self.rows_seen = 0
        self.rows_failed = False  # rows came out of order: the request's speech failed
        self.submitted = False  # the worker has the request
        self.thinker_done = False
        self.released = False
        self.producer: asyncio.Task | None = None

    def take_rows(self, chunk: HiddenStatesChunk) -> torch.Tensor | None:
        """The thinker's next hidden-state rows: returned when the worker has the request
        (send them on), else held for `add_request` (None).

        Rows carry the absolute position the worker captured them at: rows that do not
        continue at `rows_seen` (a gap or an overlap) raise HiddenStatesOutOfOrder (logged),
        as every later row would be given the wrong position; the caller ends the request's
        speech with that error."""
        self.rows_seen = check_next(self.rid, chunk, self.rows_seen)
        if chunk.prompt_positions is not None:
            self.positions = chunk.prompt_positions
        if self.submitted:
            return chunk.rows
        self.pending_rows.append(chunk.rows)
        return None

    def add_request(self, prompt_ids) -> AddRequest:
        """The worker command that starts the request, once its prompt ids are known (the
        thinker's first output), with the rows held so far."""
        n = len(prompt_ids)
        rows = torch.cat(self.pending_rows) if self.pending_rows else None
        self.pending_rows = []
        if rows is None or len(rows) < n:
            raise RuntimeError(
                f"request {self.rid}: the thinker sent "
                f"{0 if rows is None else len(rows)} of {n} prompt hidden-state rows; "
                "is the omni_vllm plugin (patches/) active in the engine?"
            )
        return AddRequest(
            self.rid,
            prompt_ids=torch.tensor(prompt_ids),
            prompt_rows=rows[:n],
            rows=rows[n:] if len(rows) > n else None,
            positions=self.positions,
            voice=self.voice,
            sampling=self.sampling,
            noise=self.noise,
            max_codes=self.max_codes,
        )

    def add_output(self, res: WorkerOutput) -> np.ndarray | None:
        """One worker iteration's output (not an error) into the collector; returns the new
        audio samples, if any."""
        audio = None
        if res.audio:
            audio = np.concatenate(res.audio) if len(res.audio) > 1 else res.audio[0]
        if audio is not None or res.codes or res.done:
            self.out.add_audio(audio, res.codes, res.done, res.talker_reason)
        return audio

    def finish(self, chunk: SpeechChunk, codes_total: int) -> None:
        """Make `chunk` the last one: finish reason and counts."""
        out = self.out
        reason, prompt, completion = (
            out.text_end if out.text_end is not None else ("abort", 0, 0)
        )
        if out.talker_reason in ("length", "runaway") and reason == "stop":
            reason = (
                "length"  # the text is whole but its speech was cut (a cap on codes)
            )
        chunk.finished, chunk.finish_reason = (
            True,
            "abort" if out.aborted else reason,
        )
        chunk.prompt_tokens, chunk.completion_tokens, chunk.audio_tokens = (
            prompt,
            completion,
            codes_total,
        )
