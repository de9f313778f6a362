"""The Talker of the speech path: a batched decoder over a paged KV pool, as vLLM runs the thinker.

The Talker turns the thinker's reply into codec codes (50 per second of speech). It follows the
thinker token by token, so many requests decode together, each at its own length and position,
joining and leaving between steps. This module is the talker's scheduler (which requests run a
step, who gets KV blocks, who is preempted); omni_vllm.talker_runner runs the step on the device.
The model itself is transformers' `Qwen2_5OmniTalkerForConditionalGeneration`, loaded from the
checkpoint's `talker.*` tensors unchanged, whose modules the runner calls.

What the Talker reads, per request (as `Qwen2_5OmniForConditionalGeneration.generate` builds it):

    prefill  = proj(prompt embedding [media placeholders zeroed] + prompt last hidden state)
               proj(speaker bos text embedding + codec_emb(codec_pad))
               proj(reply[0] + codec_emb(codec_bos))
    step k   = proj(reply[k] + codec_emb(code[k-1]))        k = 1, 2, ...

where `reply[i] = embedding + last hidden state` of the i-th generated thinker token (as fed back
through the thinker), and after the thinker finishes the reply track continues with the text
embedding of `tts_text_end`, then `tts_text_pad` forever. Each step samples one code (repetition
penalty, codec_bos suppressed, temperature / top-k / top-p, per-request seed) and stops on
codec pad/end or at the request's length cap.

Memory, as vLLM's scheduler and KV cache manager do it for the thinker:

* one KV pool (omni_vllm.talker_kv_cache), allocated once to `kv_cache_tokens` positions;
* a request starts (prefills) when the pool has blocks for its prefill plus a watermark
  (`watermark` of the pool), in arrival order: nobody overtakes an older request;
* a running request gets a block whenever its length crosses one; when the pool has none left,
  the newest running request is preempted: its blocks are freed, it keeps its inputs (prompt
  rows, thinker rows, codes so far) on the host, and it resumes before any newer request by
  recomputing its KV (one prefill of prompt + codes so far), then goes on sampling where it
  stopped (its step count, hence its draws, continue: the same codes as an unpreempted run, up to
  float rounding of the recompute);
* a request that could never fit the pool alone is refused at `add_request`.

How a scheduler drives it:

    talker = Talker.from_pretrained(model_dir, device="cuda", dtype=torch.bfloat16, max_slots=32)
    talker.add_request(rid, prompt_ids=..., prompt_embeds=..., prompt_hidden=..., voice="Chelsie",
                       image_grid_thw=..., sampling=TalkerSampling(seed=1234), max_codes=...)
    ... for each generated thinker token that went through the thinker:
    talker.add_thinker_rows(rid, rows)      # (n, 2, E): input embedding, last hidden state
    ... when the thinker stops (its stop token itself is not added):
    talker.finish_thinker(rid)
    ... in the loop:
    for rid, out in talker.step(talker.ready()).items():   # out.code is None on stop
        ...

A step returns an output for every request that ran (a request waiting for KV blocks, or
preempted, is absent). A request's slot and blocks are released as soon as it finishes
(`rid in talker` becomes False); `remove(rid)` aborts one early.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Qwen2_5OmniConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniRotaryEmbedding,
    Qwen2_5OmniTalkerForConditionalGeneration,
)

from omni_vllm.checkpoint import load_embedding_rows, load_prefixed
from omni_vllm.talker_kv_cache import BLOCK_SIZE, TalkerKVPool, round_up
from omni_vllm.talker_runner import DecodeRow, PrefillRow, TalkerModelRunner
from omni_vllm.talker_sampler import CodecSampler, TalkerSampling
from omni_vllm.voices import load_speakers, resolve_voice

__all__ = ["Talker", "TalkerSampling", "TalkerOutput", "TalkerFull"]

KV_BLOCK_SIZE = BLOCK_SIZE
# KV positions per slot of a default pool (no plan: offline use, tests)
DEFAULT_POSITIONS_PER_SLOT = 2048
# free fraction of the pool a new request must leave (vLLM's scheduler watermark)
WATERMARK = 0.01


def kv_tokens_for(num_requests: int, max_len: int) -> int:
    """KV positions that hold `num_requests` requests of `max_len` each, in whole blocks."""
    return num_requests * round_up(max_len, KV_BLOCK_SIZE)


logger = logging.getLogger(__name__)


class TalkerFull(RuntimeError):
    """No talker slot for a new request now."""


@dataclass
class TalkerOutput:
    """One step's result for one request. `code` is None when the step sampled a stop code."""

    code: int | None
    finished: bool = False
    # "stop" | "length" once finished
    reason: str | None = None
    # (vocab,) fp32 raw logits, when asked for
    logits: torch.Tensor | None = None


@dataclass
class _Request:
    slot: int
    # arrival order: who starts or resumes first, who is preempted first (the newest)
    order: int
    # (L+1, E) prompt + speaker bos inputs, on the host
    prefill: torch.Tensor
    # (3, L+2) TMRoPE positions of the prefill and reply[0], on the host
    positions: torch.Tensor
    # position of the first decode input (all three axes equal)
    first_position: int
    max_codes: int
    # the thinker's reply rows (embedding + hidden state), host chunks (n, E)
    rows: list = field(default_factory=list)
    num_rows: int = 0
    # device rows (1, E) of reply[len(codes):num_rows], while running
    pending: deque = field(default_factory=deque)
    thinker_done: bool = False
    codes: list = field(default_factory=list)
    # "waiting" (no KV yet) | "running" | "preempted"
    state: str = "waiting"


class Talker:
    """Batched Qwen2.5-Omni Talker: `max_slots` requests at once (the most one step batches),
    `max_len` positions each (default: the talker config's `max_position_embeddings`), over a KV
    pool of `kv_cache_tokens` positions allocated at construction (default: `max_slots` x
    min(max_len, 2048)). `enforce_eager` turns decode-step capture off (CUDA); `capture` is
    GraphCache's test hook."""

    def __init__(
        self,
        config: Qwen2_5OmniConfig,
        talker_state: dict[str, torch.Tensor],
        text_rows: dict[int, torch.Tensor],
        voices: dict[str, int],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_slots: int = 16,
        max_len: int | None = None,
        max_codes: int = 4096,
        kv_cache_tokens: int | None = None,
        enforce_eager: bool = False,
        block_size: int = KV_BLOCK_SIZE,
        capture=None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.thinker_config = config.thinker_config
        tcfg = config.talker_config
        self.max_slots, self.default_max_codes = max_slots, max_codes
        self.max_len = max_len or tcfg.max_position_embeddings
        with torch.device("meta"):
            model = Qwen2_5OmniTalkerForConditionalGeneration(tcfg)
        model.load_state_dict(talker_state, strict=True, assign=True)
        # buffers, not in the checkpoint
        model.model.rotary_emb = Qwen2_5OmniRotaryEmbedding(tcfg)
        # RoPE frequencies stay fp32, as in transformers
        inv_freq = model.model.rotary_emb.inv_freq
        self.model = (
            model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        )
        self.model.model.rotary_emb.inv_freq = inv_freq.to(self.device)
        self.voices = dict(voices)
        self.text_rows = {
            t: r.to(self.device, dtype).reshape(1, -1) for t, r in text_rows.items()
        }
        self.codec_bos, self.codec_pad = (
            tcfg.tts_codec_start_token_id,
            tcfg.tts_codec_pad_token_id,
        )
        self.codec_mask = tcfg.tts_codec_mask_token_id
        self.text_end, self.text_pad = (
            tcfg.tts_text_end_token_id,
            tcfg.tts_text_pad_token_id,
        )
        self.media_ids = torch.tensor(
            [
                self.thinker_config.audio_token_index,
                self.thinker_config.image_token_index,
                self.thinker_config.video_token_index,
            ]
        )
        with torch.no_grad():
            # host copies of the rows a prefill (or a recompute) is built from
            self._text_host = {t: r.cpu() for t, r in self.text_rows.items()}
            self._speaker_host = {
                name: (self.text_rows[bos] + self._codec_embed(self.codec_pad)).cpu()
                for name, bos in self.voices.items()
            }

        if kv_cache_tokens is None:
            kv_cache_tokens = kv_tokens_for(
                max_slots, min(self.max_len, DEFAULT_POSITIONS_PER_SLOT)
            )
        self.kv = TalkerKVPool(
            num_layers=tcfg.num_hidden_layers,
            num_kv_heads=tcfg.num_key_value_heads,
            head_dim=tcfg.head_dim,
            device=self.device,
            dtype=dtype,
            max_tokens=kv_cache_tokens,
            block_size=block_size,
        )
        self.watermark_blocks = int(WATERMARK * self.kv.num_blocks)
        self.sampler = CodecSampler(
            max_slots,
            tcfg.vocab_size,
            suppress=self.codec_bos,
            stop=(tcfg.tts_codec_pad_token_id, tcfg.tts_codec_end_token_id),
            device=self.device,
        )
        self.runner = TalkerModelRunner(
            self.model,
            self.kv,
            self.sampler,
            max_batch=max_slots,
            max_len=min(self.max_len, self.kv.max_tokens),
            enforce_eager=enforce_eager,
            capture=capture,
        )
        self.free_slots = list(range(max_slots))
        self.requests: dict[object, _Request] = {}
        self._arrivals = 0
        self.preemptions = 0

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs) -> Talker:
        """Load from a Qwen2.5-Omni checkpoint directory (config.json, safetensors, spk_dict.pt)."""
        model_dir = Path(model_dir)
        config = Qwen2_5OmniConfig.from_pretrained(model_dir)
        voices = {
            name: int(params["bos_token"])
            for name, params in load_speakers(model_dir).items()
        }
        tc = config.talker_config
        token_ids = sorted(
            {*voices.values(), tc.tts_text_end_token_id, tc.tts_text_pad_token_id}
        )
        talker_state = load_prefixed(model_dir, "talker.")
        rows = load_embedding_rows(model_dir, token_ids)
        return cls(config, talker_state, rows, voices, **kwargs)

    # ------------------------------------------------------------------ requests

    def __contains__(self, req_id) -> bool:
        return req_id in self.requests

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV pool in use by requests now."""
        return self.kv.bytes()

    def kv_pool_bytes(self) -> int:
        """Bytes the KV pool holds on its device (allocated once)."""
        return self.kv.pool_bytes()

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV pool's blocks in use."""
        return self.kv.usage

    def state(self, req_id) -> str:
        """ "waiting", "running" or "preempted"."""
        return self.requests[req_id].state

    def add_request(
        self,
        req_id,
        *,
        prompt_ids: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_hidden: torch.Tensor,
        voice: str = "Chelsie",
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
        video_second_per_grid: torch.Tensor | None = None,
        prompt_positions: torch.Tensor | None = None,
        sampling: TalkerSampling = TalkerSampling(),
        max_codes: int | None = None,
    ) -> None:
        """Register a request from its thinker prompt (ids (L,), input embeddings and last hidden
        states (L, E)) and either the thinker's TMRoPE positions of the prompt (3, L), as vLLM
        computed them, or the media grid info as the processor returns it (then the positions are
        recomputed). It prefills once its first reply element arrives (or the thinker finishes)
        and the pool has room.

        Raises ValueError when the request can never run here (unknown voice, a prompt that does
        not fit `max_len` or the whole KV pool) and TalkerFull when there is no slot for it now."""
        voice = resolve_voice(voice, self.voices)
        if req_id in self.requests:
            raise ValueError(f"request {req_id!r} is already in the talker")
        prompt_ids = torch.as_tensor(prompt_ids).reshape(-1).cpu()
        n = prompt_ids.numel()
        if prompt_embeds.shape[0] != n or prompt_hidden.shape[0] != n:
            raise ValueError(
                "prompt_ids, prompt_embeds and prompt_hidden must have the same length"
            )
        if n + 2 > self.max_len:
            raise ValueError(
                f"prompt of {n} tokens does not fit the talker's max_len {self.max_len} (prompt + 2 + codes)"
            )
        if n + 2 > self.kv.max_tokens:
            raise ValueError(
                f"prompt of {n} tokens does not fit the talker's KV pool of {self.kv.max_tokens} positions"
            )
        if not self.free_slots:
            raise TalkerFull("no free talker slot (check num_free_slots before adding)")

        # Prompt inputs: embedding (media placeholders zeroed) + hidden state; then speaker bos.
        media = torch.isin(prompt_ids, self.media_ids)
        embeds = prompt_embeds.cpu().masked_fill(media[:, None], 0)
        prefill = torch.cat(
            [(embeds + prompt_hidden.cpu()).to(self.dtype), self._speaker_host[voice]]
        )

        # TMRoPE positions of prompt + speaker bos + first reply token, as the talker computes them:
        # the prompt's are the thinker's (same rule, same ids), the two text tokens continue them.
        if prompt_positions is not None:
            prompt_positions = (
                torch.as_tensor(prompt_positions).cpu().long().reshape(3, n)
            )
            after = int(prompt_positions.max()) + 1
            positions = torch.cat(
                [prompt_positions, torch.arange(after, after + 2).expand(3, 2)], 1
            )
        else:
            text_ids = torch.cat([prompt_ids, torch.tensor([self.voices[voice]] * 2)])[
                None
            ]
            cpu = lambda t: None if t is None else torch.as_tensor(t).cpu()  # noqa: E731
            positions, _ = self.model.get_rope_index(
                text_ids,
                cpu(image_grid_thw),
                cpu(video_grid_thw),
                torch.ones_like(text_ids),
                use_audio_in_video,
                cpu(audio_feature_lengths),
                cpu(video_second_per_grid),
            )
            positions = positions[:, 0].cpu()  # (3, L+2)

        slot = self.free_slots.pop(0)
        # transformers' talker input ids: codec_mask per prompt position, then pad, bos
        self.sampler.open(
            slot,
            sampling,
            [self.codec_mask, self.codec_pad, self.codec_bos]
            if n
            else [self.codec_pad, self.codec_bos],
        )
        max_codes = min(
            max_codes or self.default_max_codes,
            self.max_len - n - 1,
            self.kv.max_tokens - n - 1,
        )
        self._arrivals += 1
        self.requests[req_id] = _Request(
            slot=slot,
            order=self._arrivals,
            prefill=prefill,
            positions=positions,
            first_position=int(positions.max()) + 1,
            max_codes=max_codes,
        )

    def add_thinker_rows(self, req_id, rows: torch.Tensor) -> None:
        """Append generated thinker tokens' (input embedding, last hidden state) rows, (n, 2, E):
        kept on the host (a recompute reads them), uploaded once while the request runs."""
        req = self.requests[req_id]
        if req.thinker_done:
            raise ValueError(f"request {req_id!r}: thinker already finished")
        if not len(rows):
            return
        elements = (rows[:, 0] + rows[:, 1]).to(self.dtype).cpu()
        req.rows.append(elements)
        req.num_rows += len(elements)
        if req.state == "running":
            self._upload(req, elements)

    def add_thinker_token(
        self, req_id, embedding: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        """Append one generated thinker token's (input embedding, last hidden state), (E,) each."""
        self.add_thinker_rows(
            req_id, torch.stack([embedding.reshape(-1), hidden.reshape(-1)])[None]
        )

    def _upload(self, req: _Request, elements: torch.Tensor) -> None:
        req.pending.extend(elements.to(self.device, non_blocking=True).split(1))

    def finish_thinker(self, req_id, max_codes: int | None = None) -> bool:
        """The thinker is done: the reply track goes on with tts_text_end, then tts_text_pad.

        `max_codes` lowers the request's cap on codes now that the text's length is known (the
        runaway guard: a talker that never samples its stop code then ends with reason "length");
        returns whether it lowered the cap."""
        req = self.requests[req_id]
        req.thinker_done = True
        if max_codes is not None and max_codes < req.max_codes:
            req.max_codes = max(1, max_codes)
            return True
        return False

    def remove(self, req_id) -> None:
        """Drop a request (abort) and free its slot and KV blocks. Unknown ids are ignored."""
        req = self.requests.pop(req_id, None)
        self.kv.free(req_id)
        if req is not None:
            self.free_slots.append(req.slot)

    def ready(self) -> list:
        """Requests whose next input is available (prefill or decode)."""
        return [
            rid
            for rid, req in self.requests.items()
            if req.thinker_done or len(req.codes) < req.num_rows
        ]

    # ------------------------------------------------------------------ scheduling

    def _codec_embed(self, code: int) -> torch.Tensor:
        return self.model.get_input_embeddings().weight[code][None]

    def _next_reply(self, req: _Request) -> torch.Tensor:
        """The device row (1, E) of reply[len(codes)] of a running request."""
        if req.pending:
            return req.pending.popleft()
        tail = self.text_end if len(req.codes) == req.num_rows else self.text_pad
        return self.text_rows[tail]

    def _host_rows(self, req: _Request) -> torch.Tensor:
        """All of the request's thinker rows on the host, (num_rows, E), kept as one chunk."""
        if len(req.rows) > 1:
            req.rows[:] = [torch.cat(req.rows)]
        return req.rows[0] if req.rows else self._text_host[self.text_pad][:0]

    def _reply_host(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """reply[0:count] on the host, (count, E), from the request's thinker `rows`."""
        rows = rows[:count]
        extra = count - len(rows)
        if extra > 0:
            tail = [self._text_host[self.text_end]] + [
                self._text_host[self.text_pad]
            ] * (extra - 1)
            rows = torch.cat([rows, *tail])
        return rows

    def _preempt(self, rid) -> None:
        req = self.requests[rid]
        self.kv.free(rid)
        req.pending.clear()
        req.state = "preempted"
        self.preemptions += 1
        logger.debug(
            "talker: preempted %s after %d codes (KV pool full, %d blocks)",
            rid,
            len(req.codes),
            self.kv.num_blocks,
        )

    def _schedule(self, candidates: list) -> tuple[list, list]:
        """(decodes, prefills) of this step: room for every running request's next token first,
        preempting the newest running request while there is none; then, if nothing was
        preempted, the waiting and preempted requests in arrival order while the pool has room
        for their prefill plus the watermark."""
        running = sorted(
            (rid for rid in candidates if self.requests[rid].state == "running"),
            key=lambda rid: self.requests[rid].order,
        )
        preempted = False
        decodes = []
        for rid in running:
            req = self.requests[rid]
            if req.state != "running":
                continue
            length = req.prefill.shape[0] + 1 + len(req.codes)
            while not self.kv.allocate(rid, length):
                victim = max(
                    (r for r, q in self.requests.items() if q.state == "running"),
                    key=lambda r: self.requests[r].order,
                )
                self._preempt(victim)
                preempted = True
                if victim == rid:
                    break
            if req.state == "running":
                decodes.append(rid)
        prefills = []
        if not preempted:
            starting = sorted(
                (rid for rid in candidates if self.requests[rid].state != "running"),
                key=lambda rid: self.requests[rid].order,
            )
            for rid in starting:
                req = self.requests[rid]
                length = req.prefill.shape[0] + 1 + len(req.codes)
                reserve = self.watermark_blocks if self.kv.used_blocks else 0
                if (
                    self.kv.blocks_needed(rid, length) + reserve
                    > self.kv.num_free_blocks
                ):
                    break
                self.kv.allocate(rid, length)
                prefills.append(rid)
        return decodes, prefills

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(
        self,
        req_ids=None,
        *,
        forced_codes: dict | None = None,
        return_logits: bool = False,
    ) -> dict[object, TalkerOutput]:
        """One talker step for the given requests (default: all ready ones): prefill (or resume)
        for those that have not started, one decode step for the others, as the pool allows.
        Returns each request's new code, for the requests that ran.

        `forced_codes` (teacher forcing, tests) feeds the given code instead of the sampled one.
        """
        ready = self.ready()
        req_ids = ready if req_ids is None else list(req_ids)
        not_ready = set(req_ids) - set(ready)
        if not_ready:
            raise ValueError(
                f"requests not ready for a talker step: {sorted(map(str, not_ready))}"
            )
        forced_codes = forced_codes or {}
        decodes, prefills = self._schedule(req_ids)
        results = []
        if prefills:
            results.append(
                self.runner.prefill(
                    [self._prefill_row(rid, forced_codes) for rid in prefills]
                )
            )
        if decodes:
            results.append(
                self.runner.decode(
                    [self._decode_row(rid, forced_codes) for rid in decodes]
                )
            )
        batch = prefills + decodes
        if not batch:
            return {}
        codes = torch.cat([r[0] for r in results], dim=1)
        logits = torch.cat([r[1] for r in results]) if return_logits else None
        # The step's one read back to the host: every row's code and stop flag.
        read = codes.T.tolist()
        outputs: dict[object, TalkerOutput] = {}
        for i, (rid, (code, stop)) in enumerate(zip(batch, read)):
            req = self.requests[rid]
            req.codes.append(code)
            out = TalkerOutput(
                code=None if stop else code,
                logits=logits[i].clone() if return_logits else None,
            )
            if stop or len(req.codes) >= req.max_codes:
                out.finished, out.reason = True, ("stop" if stop else "length")
                self.remove(rid)
            outputs[rid] = out
        return {rid: outputs[rid] for rid in req_ids if rid in outputs}

    def _prefill_row(self, rid, forced_codes: dict) -> PrefillRow:
        """A prefill of prompt + reply[0..n] for a request with n codes so far (n = 0 at the
        start; n > 0 is the recompute of a preempted request)."""
        req = self.requests[rid]
        n = len(req.codes)
        rows = self._host_rows(req)
        inputs = torch.cat([req.prefill, self._reply_host(rows, n + 1)]).to(
            self.device, non_blocking=True
        )
        fed = torch.tensor([self.codec_bos, *req.codes], device=self.device)
        prompt = req.prefill.shape[0]
        inputs[prompt:] += self.model.get_input_embeddings()(fed)
        positions = req.positions
        if n:
            extra = torch.arange(req.first_position, req.first_position + n)
            positions = torch.cat([positions, extra.expand(3, n)], 1)
        req.state = "running"
        if req.num_rows > n + 1:
            self._upload(req, rows[n + 1 :])
        return PrefillRow(
            inputs=inputs,
            positions=positions.to(self.device, non_blocking=True),
            slots=self.kv.slots(rid, 0, inputs.shape[0]),
            sampler_slot=req.slot,
            forced=forced_codes.get(rid, -1),
        )

    def _decode_row(self, rid, forced_codes: dict) -> DecodeRow:
        req = self.requests[rid]
        n = len(req.codes)
        return DecodeRow(
            reply=self._next_reply(req),
            last_code=req.codes[-1],
            position=req.first_position + n - 1,
            kv_len=req.prefill.shape[0] + 1 + n,
            blocks=self.kv.block_tables[rid],
            sampler_slot=req.slot,
            forced=forced_codes.get(rid, -1),
        )
