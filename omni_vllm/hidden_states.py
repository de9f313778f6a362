"""Per-request thinker hidden states, from the engine's model runner to the speech path.

The talker reads, for every thinker position, the decoder's input embedding and its final
(post-norm) hidden state. This module moves exactly those rows, and only for requests that ask
for speech, out of vLLM's model runner (EngineCore process) into the API-server process:

    worker (EngineCore)                                   frontend (API server)
    RunnerCapture.before_forward / after_forward          deliver(output_processor, outputs)
      gathers [n, 2, hidden] rows of opted-in requests      pops EngineCoreOutput.pooling_output of
      (rows[:, 0] input embedding, rows[:, 1] hidden)       generation requests and hands them to
    RunnerCapture.attach                                    the registered sink, tagged with the
      ModelRunnerOutput.pooler_output[req] = rows           request id, in token order
          -> scheduler copies it into EngineCoreOutput.pooling_output (unchanged vLLM code)
          -> msgpack + ZMQ, tensors as zero-copy frames (unchanged vLLM code)

Rows are batched per engine step (one tensor per request per step), never per token. Why this
route and what it costs: docs/hidden_states_route.md. The two vLLM hooks are in
patches/runner_hidden_states.py and patches/output_processor_hidden_states.py.

Semantics (identical to transformers' `generate(output_hidden_states=True)`, which is what the
Qwen2.5-Omni talker consumes): one row per position the decoder consumed, i.e. every prompt
position (the merged multimodal embedding) and then every sampled token that was fed back. The
rows of sampled token k therefore arrive with the output that carries token k+1; the last sampled
token is never fed back, so it has no row (its embedding is one table lookup if ever needed).
Rows of unfinished prefill chunks are held in the worker and sent with the request's first
sampled token, so vLLM's outputs for text (and its prefill/TTFT stats) are unchanged.

Every chunk carries the absolute position of its first row, from the worker to the consumer:
vLLM's scheduler may drop a step's output (a stale output of a request preempted with
`drop_stale_output`: `reset_prefix_cache(reset_running_requests=True)`, KV connectors that require
delivery, resumable requests; `Scheduler.update_from_output`), and with it that step's rows. The
worker re-sends, when such a request resumes, every position past what reached the frontend (what
the scheduler's count of the request's output tokens implies), so the recompute heals the loss; a
gap or an overlap that is not healed is seen by the consumer (`HiddenStatesChunk.start`), never
shifted into the next rows.

Opt in per request with `request_hidden_states(SamplingParams(...))` (sets
`extra_args["omni_speech"]` and disables prefix-cache reads for that request, so that every
prompt position is really computed). Requests without the flag cost one dict lookup per step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)

OPT_IN_KEY = "omni_speech"
EMBED, HIDDEN = 0, 1  # index along dim 1 of the [n, 2, hidden] rows


# --------------------------------------------------------------------------------------------
# Opting in (API server side, travels to the engine inside SamplingParams.extra_args)
# --------------------------------------------------------------------------------------------


def request_hidden_states(params: SamplingParams) -> SamplingParams:
    """Mark `params` so the engine returns this request's thinker hidden states; returns it.

    Prefix-cache reads are switched off for the request: a cached prefix is never run through
    the decoder, so its hidden states would not exist.
    """
    params.extra_args = {**(params.extra_args or {}), OPT_IN_KEY: True}
    params.skip_reading_prefix_cache = True
    return params


def wants_hidden_states(params: Any) -> bool:
    extra = getattr(params, "extra_args", None)
    return bool(extra) and bool(extra.get(OPT_IN_KEY))


def check_speech_config(vllm_config: Any) -> None:
    """Raise ValueError, naming what to change, if this engine's thinker cannot send hidden states.

    Called where speech is served (SpeechEngine, OmniLLM), at start-up: rows flow only from our
    thinker class on vLLM's V1 model runner (pinned by patches/model_runner_v1.py), without
    pipeline parallelism or speculative decoding.
    """
    from omni_vllm.patches.model_runner_v1 import serves_omni_thinker, v2_required_by

    problems = []
    if not serves_omni_thinker(vllm_config):
        arch = getattr(vllm_config.model_config, "architecture", None)
        problems.append(
            f"the model runs as {arch}, not omni-vllm's thinker class (a Qwen2.5-Omni checkpoint "
            "with the plugin installed; leave --model-impl and --hf-overrides' architectures alone)"
        )
    elif vllm_config.use_v2_model_runner:
        problems.append(
            "the engine uses vLLM's Model Runner V2, required here by "
            f"{', '.join(v2_required_by(vllm_config)) or 'this configuration'}; remove it (unset "
            "VLLM_USE_V2_MODEL_RUNNER): omni-vllm pins the V1 runner, whose hooks send the rows"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append(
            "--pipeline-parallel-size > 1 is not supported; use --tensor-parallel-size instead"
        )
    if vllm_config.speculative_config is not None:
        problems.append(
            "speculative decoding is not supported; drop --speculative-config"
        )
    if problems:
        raise ValueError(
            "this engine cannot send the thinker's hidden states that speech needs: "
            + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Worker side: one RunnerCapture per model runner
# --------------------------------------------------------------------------------------------


class _Req:
    __slots__ = ("next_pos", "pending", "pending_start", "positions", "prompt_len")

    def __init__(self, prompt_len: int) -> None:
        # First position not yet captured (dedups recompute after preemption; rewound when the
        # request resumes: RunnerCapture._rewind_resumed).
        self.next_pos = 0
        # Rows waiting for the request's next sampled token, and the position of the first.
        self.pending: list[torch.Tensor] = []
        self.pending_start = 0
        self.prompt_len = prompt_len
        # The prompt's TMRoPE positions (3, prompt_len), sent once with the first rows (the
        # talker reuses them); None before they are known and after they were sent.
        self.positions: torch.Tensor | None = None


# The output carries one tensor per request, so a chunk travels packed into one uint8 tensor:
# an int64 header (absolute position of the first row, rows, hidden, dtype code, prompt
# positions or 0), the rows' bytes, then (first chunk only) the prompt's TMRoPE positions as
# int64 (3, prompt_len). The pack costs one host copy of the rows per step.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEADER = 5 * 8


def _pack(
    start: int, rows: torch.Tensor, positions: torch.Tensor | None
) -> torch.Tensor:
    n_pos = 0 if positions is None else positions.shape[1]
    header = torch.tensor(
        [start, rows.shape[0], rows.shape[2], _DTYPES.index(rows.dtype), n_pos],
        dtype=torch.int64,
    )
    parts = [header, rows.contiguous()]
    if positions is not None:
        parts.append(positions.to(torch.int64).contiguous())
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in parts])


def _unpack(packed: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(absolute position of the first row, rows [n, 2, hidden], prompt positions or None)."""
    start, n, hidden, code, n_pos = packed[:_HEADER].view(torch.int64).tolist()
    dtype = _DTYPES[code]
    end = _HEADER + n * 2 * hidden * dtype.itemsize
    rows = packed[_HEADER:end].view(dtype).reshape(n, 2, hidden)
    positions = packed[end:].view(torch.int64).reshape(3, n_pos) if n_pos else None
    return start, rows, positions


# What take() hands to attach() per request: (first position, row chunks, prompt positions).
_Taken = tuple[int, list[torch.Tensor], "torch.Tensor | None"]


@dataclass
class _Step:
    """What one forward captured; lives from before_forward to attach."""

    req_ids: list[str]  # opted-in requests in this step, batch order
    starts: list[int]  # absolute position of each request's first row
    counts: list[int]  # rows per request (after dedup)
    flush: list[bool]  # whether the request samples a token this step
    index: torch.Tensor  # token rows to gather, on the model's device
    embeds: (
        torch.Tensor
    )  # [N, hidden] gathered before the forward (it may reuse the buffer)
    rows: torch.Tensor | None = None  # [N, 2, hidden] on CPU once after_forward ran
    ready: Any = None  # CUDA event of the device-to-host copy, or None


class RunnerCapture:
    """Capture state of one `GPUModelRunner` (also the base of vLLM's CPU runner).

    Driven by patches/runner_hidden_states.py: `on_schedule` before each step, `before_forward`
    and `after_forward` around the model call, `take` + `attach` when the step's output is built.
    """

    def __init__(self, runner: Any) -> None:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        self.requests: dict[str, _Req] = {}
        self.step: _Step | None = None
        # Every TP rank computes the same rows; only the rank whose output reaches the scheduler
        # (TP rank 0 of the last PP stage) keeps them (see before_forward for what all ranks do).
        self.is_output_rank = (
            get_tp_group().rank_in_group == 0 and get_pp_group().is_last_rank
        )
        self.pp_size = get_pp_group().world_size
        self.speculative = runner.speculative_config is not None

    # -- bookkeeping -------------------------------------------------------------------------

    def on_schedule(self, scheduler_output: Any) -> None:
        for rid in scheduler_output.finished_req_ids:
            self.requests.pop(rid, None)
        cached = scheduler_output.scheduled_cached_reqs
        if cached.resumed_req_ids and self.requests:
            self._rewind_resumed(cached)
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self.requests or not wants_hidden_states(
                new.sampling_params
            ):
                continue
            if self.pp_size > 1 or self.speculative:
                # Refuse this request's hidden states, not the whole engine: its speech path
                # sees no rows and fails that request alone.
                logger.error(
                    "omni-vllm: request %s asks for thinker hidden states, which are not "
                    "supported with pipeline parallelism or speculative decoding; none will be "
                    "sent. Serve the thinker without them to get speech.",
                    new.req_id,
                )
                continue
            if new.num_computed_tokens:
                logger.error(
                    "omni-vllm: request %s asks for hidden states but %d prompt positions came "
                    "from a cache and were never computed; its speech input starts late. Opt in "
                    "with omni_vllm.hidden_states.request_hidden_states(), which disables "
                    "prefix-cache reads for the request.",
                    new.req_id,
                    new.num_computed_tokens,
                )
            prompt_len = (
                len(new.prompt_token_ids)
                if new.prompt_token_ids is not None
                else len(new.prompt_embeds)
            )
            self.requests[new.req_id] = _Req(prompt_len)
        self.step = None

    def _rewind_resumed(self, cached: Any) -> None:
        """Re-send, from its recompute, what a resumed request's lost outputs carried.

        A request resumes after a preemption with nothing in flight: outputs still to be
        delivered are drained first (`Scheduler.schedule` holds it back meanwhile), stale ones
        of a drop-mode preemption were discarded by `update_from_output`, rows and sampled token
        alike. So the scheduler's count of its output tokens is exactly what reached the
        frontend, and with it its rows: every position up to the last token's (the last token's
        row travels with the next one), none before the first token. Positions captured past
        that were lost with a dropped output; rows pending in the worker belong to a prefill
        that is recomputed.
        """
        for rid, num_output in zip(cached.req_ids, cached.num_output_tokens):
            state = self.requests.get(rid)
            if state is None or rid not in cached.resumed_req_ids:
                continue
            delivered = state.prompt_len + num_output - 1 if num_output else 0
            if state.next_pos > delivered:
                logger.info(
                    "omni-vllm: request %s resumed with positions %d..%d of its hidden "
                    "states never delivered (a dropped stale output); re-sending them from "
                    "the recompute",
                    rid,
                    delivered,
                    state.next_pos - 1,
                )
                state.next_pos = delivered
            state.pending = []

    # -- around the forward ------------------------------------------------------------------

    def before_forward(
        self,
        runner: Any,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> None:
        self.step = None
        # Token ids without embeddings (text-only serving: --language-model-only, or every media
        # limit 0) are embedded below by the model's vocab-parallel embedding, a collective over
        # the TP group: every TP rank makes the same selection (same scheduler output, same batch)
        # and calls it, and only the output rank keeps the rows. With embeddings, no collective:
        # the other ranks have nothing to do.
        if not self.requests or (not self.is_output_rank and inputs_embeds is not None):
            return
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        qsl = runner.query_start_loc.np
        computed = batch.num_computed_tokens_cpu
        discard = runner.discard_request_mask.np
        req_ids, starts, counts, flush, ranges = [], [], [], [], []
        for i, rid in enumerate(batch.req_ids[:num_reqs]):
            state = self.requests.get(rid)
            if state is None:
                continue
            if state.next_pos == 0 and self.is_output_rank:
                cached = runner.requests[rid]
                if cached.mrope_positions is not None:
                    state.positions = cached.mrope_positions[
                        :, : len(cached.prompt_token_ids)
                    ]
                    state.positions = state.positions.cpu().clone()
            lo, hi = int(qsl[i]), int(qsl[i + 1])
            first = int(computed[i])
            skip = min(max(state.next_pos - first, 0), hi - lo)
            state.next_pos = max(state.next_pos, first + hi - lo)
            req_ids.append(rid)
            starts.append(first + skip)
            counts.append(hi - lo - skip)
            flush.append(not bool(discard[i]))
            ranges.append(np.arange(lo + skip, hi))
        if not req_ids:
            return
        index_np = np.concatenate(ranges)
        device = inputs_embeds.device if inputs_embeds is not None else input_ids.device
        index = torch.from_numpy(index_np).to(device, non_blocking=True)
        if inputs_embeds is not None:
            embeds = inputs_embeds.index_select(0, index)
        else:  # text-only serving of the thinker (no multimodal inputs): embed the ids ourselves
            embeds = runner.model.embed_input_ids(input_ids.index_select(0, index))
        if self.is_output_rank:
            self.step = _Step(req_ids, starts, counts, flush, index, embeds)

    def after_forward(self, hidden_states: Any) -> None:
        step = self.step
        if step is None or not isinstance(hidden_states, torch.Tensor):
            return
        rows = torch.stack(
            (step.embeds, hidden_states.index_select(0, step.index)), dim=1
        )
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
            rows = host
        elif rows.device.type != "cpu":
            rows = rows.cpu()
        step.rows = rows
        step.embeds = step.index = None  # type: ignore[assignment]

    # -- into the step's output --------------------------------------------------------------

    def take(self) -> tuple[dict[str, _Taken], Any] | None:
        """This step's rows to send, per request; called when sample_tokens builds the output.

        Rows of requests that do not sample this step (unfinished prefill chunks) stay pending.
        """
        step, self.step = self.step, None
        if step is None or step.rows is None:
            return None
        out: dict[str, _Taken] = {}
        for rid, start, chunk, flush in zip(
            step.req_ids,
            step.starts,
            torch.split(step.rows, step.counts),
            step.flush,
            strict=True,
        ):
            state = self.requests.get(rid)
            if state is None:
                continue
            if len(chunk):
                if not state.pending:
                    state.pending_start = start
                state.pending.append(chunk)
            if flush and state.pending:
                out[rid] = (state.pending_start, state.pending, state.positions)
                state.pending, state.positions = [], None
        return (out, step.ready) if out else None

    @staticmethod
    def attach(output: Any, taken: tuple[dict[str, _Taken], Any]) -> None:
        """Put the rows, packed with their first position (and, the first time, the prompt's
        positions), into `output.pooler_output` (a `ModelRunnerOutput`), per request."""
        rows_by_req, ready = taken
        if ready is not None:
            ready.synchronize()
        index = output.req_id_to_index
        pooler = output.pooler_output
        if pooler is None:
            pooler = output.pooler_output = [None] * len(output.req_ids)
        for rid, (start, chunks, positions) in rows_by_req.items():
            i = index.get(rid)
            if i is not None:
                rows = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
                pooler[i] = _pack(start, rows, positions)


# --------------------------------------------------------------------------------------------
# Frontend side: hand the rows to the speech path
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiddenStatesChunk:
    """Consecutive thinker rows of one request.

    rows[:, 0] is the decoder's input embedding, rows[:, 1] its final (post-norm) hidden state,
    for positions start .. start+len(rows)-1 (prompt positions first, then sampled tokens).
    """

    request_id: str  # the id the caller gave to generate() (parent id for n > 1)
    engine_request_id: str  # vLLM's internal id of this (child) request
    start: int  # absolute position of rows[0], as the worker captured it
    rows: torch.Tensor
    finished: bool  # the request finished with this output: no more rows will come
    # TMRoPE positions (3, prompt_len) of the whole prompt, on the request's first chunk only
    # (None for models without M-RoPE).
    prompt_positions: torch.Tensor | None = None

    @property
    def embeds(self) -> torch.Tensor:
        return self.rows[:, EMBED]

    @property
    def hidden(self) -> torch.Tensor:
        return self.rows[:, HIDDEN]


class HiddenStatesOutOfOrder(RuntimeError):
    """A request's rows do not continue where its previous rows ended (a gap: rows lost; an
    overlap: rows sent twice). Every later row would belong to another position than the one
    the consumer would give it, so the request's speech must stop here."""


def check_next(request_id: str, chunk: HiddenStatesChunk, expected: int) -> int:
    """The position after `chunk`, which must start at `expected`; HiddenStatesOutOfOrder
    (logged) otherwise."""
    if chunk.start != expected:
        what = "gap" if chunk.start > expected else "overlap"
        msg = (
            f"request {request_id}: the thinker's hidden-state rows jump from position "
            f"{expected} to {chunk.start} (a {what}: rows of the engine's step outputs "
            f"{'lost' if what == 'gap' else 'sent twice'}); its speech cannot follow the text"
        )
        logger.error("omni-vllm: %s", msg)
        raise HiddenStatesOutOfOrder(msg)
    return chunk.start + len(chunk.rows)


HiddenStatesSink = Callable[[HiddenStatesChunk], None]

_sink: HiddenStatesSink | None = None


def set_hidden_states_sink(sink: HiddenStatesSink | None) -> HiddenStatesSink | None:
    """Register the callable that receives every chunk in this (frontend) process.

    Called from the engine's output handling (AsyncLLM's output task, or LLMEngine.step) before
    the same step's RequestOutputs are queued, so a consumer that sees sampled token k+1 already
    has the rows of token k. It must be quick and must not block. Returns the previous sink.
    """
    global _sink
    previous, _sink = _sink, sink
    return previous


def deliver(output_processor: Any, engine_core_outputs: list[Any]) -> None:
    """Pop hidden-state rows off generation outputs and hand them to the sink.

    `EngineCoreOutput.pooling_output` of a generation request (one with a detokenizer) is only
    ever set by our runner hook; pooling requests are left alone.
    """
    states = output_processor.request_states
    for out in engine_core_outputs:
        rows = out.pooling_output
        if rows is None:
            continue
        state = states.get(out.request_id)
        if state is None or state.detokenizer is None:
            continue  # aborted (vLLM drops it too), or a real pooling request
        out.pooling_output = None
        start, rows, positions = _unpack(rows)
        sink = _sink
        if sink is None:
            logger.warning_once(
                "omni-vllm: hidden states arrived for request %s but no sink is registered "
                "(omni_vllm.hidden_states.set_hidden_states_sink); dropping them.",
                state.external_req_id,
            )
            continue
        sink(
            HiddenStatesChunk(
                state.external_req_id,
                out.request_id,
                start,
                rows,
                out.finish_reason is not None,
                positions,
            )
        )


class HiddenStatesCollector:
    """A sink that keeps every chunk, per request id; for tests and simple consumers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.chunks: dict[str, list[HiddenStatesChunk]] = {}

    def __call__(self, chunk: HiddenStatesChunk) -> None:
        with self._lock:
            self.chunks.setdefault(chunk.request_id, []).append(chunk)

    def rows(self, request_id: str) -> torch.Tensor:
        """All rows of `request_id` in order, [n, 2, hidden]; HiddenStatesOutOfOrder unless
        they are contiguous from position 0."""
        with self._lock:
            chunks = list(self.chunks.get(request_id, ()))
        pos = 0
        for c in chunks:
            pos = check_next(request_id, c, pos)
        return torch.cat([c.rows for c in chunks]) if chunks else torch.empty(0)

    def prompt_positions(self, request_id: str) -> torch.Tensor | None:
        """The prompt's TMRoPE positions (3, prompt_len), from the request's first chunk."""
        with self._lock:
            chunks = self.chunks.get(request_id, ())
            return chunks[0].prompt_positions if chunks else None

    def clear(self) -> None:
        with self._lock:
            self.chunks.clear()
