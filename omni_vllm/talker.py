"""The Talker of the speech path: a batched decoder with its own slot KV cache.

The Talker turns the thinker's reply into codec codes (50 per second of speech). It follows the
thinker token by token, so many requests decode together, each at its own length and position,
joining and leaving between steps. This module adds only what continuous batching needs; the
model itself is transformers' `Qwen2_5OmniTalkerForConditionalGeneration`, loaded from the
checkpoint's `talker.*` tensors unchanged, whose modules we call: `thinker_to_talker_proj`,
the codec embedding, each decoder layer (projections, M-RoPE, SDPA attention, MLP, RMSNorms),
the final norm, `codec_head`, and `get_rope_index` for the TMRoPE positions of the prompt.

What the Talker reads, per request (as `Qwen2_5OmniForConditionalGeneration.generate` builds it):

    prefill  = proj(prompt embedding [media placeholders zeroed] + prompt last hidden state)
               proj(speaker bos text embedding + codec_emb(codec_pad))
               proj(reply[0] + codec_emb(codec_bos))
    step k   = proj(reply[k] + codec_emb(code[k-1]))        k = 1, 2, ...

where `reply[i] = embedding + last hidden state` of the i-th generated thinker token (as fed back
through the thinker), and after the thinker finishes the reply track continues with the text
embedding of `tts_text_end`, then `tts_text_pad` forever. Each step samples one code (repetition
penalty, codec_bos suppressed, temperature / top-k / top-p, per-request generator) and stops on
codec pad/end or at the request's length cap.

How a scheduler drives it:

    talker = Talker.from_pretrained(model_dir, device="cuda", max_slots=32, max_len=4096)
    talker.add_request(rid, prompt_ids=..., prompt_embeds=..., prompt_hidden=..., voice="Chelsie",
                       image_grid_thw=..., sampling=TalkerSampling(seed=1234), max_codes=...)
    ... for each generated thinker token that went through the thinker:
    talker.add_thinker_token(rid, embedding, hidden)      # (E,) each
    ... when the thinker stops (its stop token itself is not added):
    talker.finish_thinker(rid)
    ... in the loop:
    for rid, out in talker.step(talker.ready()).items():   # out.code is None on stop
        ...

A request's slot is released as soon as it finishes (`rid in talker` becomes False); `remove(rid)`
aborts one early.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Qwen2_5OmniConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniTalkerForConditionalGeneration,
)

from omni_vllm.checkpoint import load_embedding_rows, load_prefixed

__all__ = ["Talker", "TalkerSampling", "TalkerOutput"]


@dataclass(frozen=True)
class TalkerSampling:
    """Per-request sampling settings; defaults are those of Qwen2.5-Omni's `generate`.

    `do_sample=False` is greedy (repetition penalty and codec_bos suppression still apply, as in
    transformers). `seed` gives the request its own `torch.Generator`, so its codes do not depend
    on what else is in the batch; `None` draws from torch's global generator.
    """

    do_sample: bool = True
    top_k: int = 40
    top_p: float = 0.8
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    seed: int | None = None


@dataclass
class TalkerOutput:
    """One step's result for one request. `code` is None when the step sampled a stop code."""

    code: int | None
    finished: bool = False
    reason: str | None = None  # "stop" | "length" once finished
    logits: torch.Tensor | None = None  # (vocab,) fp32 raw logits, when asked for


@dataclass
class _Request:
    slot: int
    prefill: torch.Tensor | None  # (L+1, E) prompt + speaker bos inputs, before reply[0]
    positions: torch.Tensor | None  # (3, L+2) TMRoPE positions of the prefill
    next_position: int  # position of the next decode input (all three axes equal)
    processors: LogitsProcessorList
    do_sample: bool
    generator: torch.Generator | None
    max_codes: int
    history: list[int]  # codec ids seen, for the repetition penalty (as transformers counts them)
    reply: deque = field(default_factory=deque)  # pending reply-track elements, (E,) each
    thinker_done: bool = False
    last_code: int | None = None
    num_codes: int = 0


class _SlotCache:
    """The KV cache seen by transformers' attention layers for one forward.

    The layers call `update(key, value, layer_idx)` with the step's rotated keys/values
    (batch, kv_heads, q, head_dim); we write each row's valid tokens into its slot at its own
    length and hand back the slots' keys/values up to the longest row (masked by the caller).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], slots, rows, cols, dst_pos, kv_len):
        self.k, self.v = k, v
        self.slots = slots  # (B,) slot of each row
        self.rows, self.cols = rows, cols  # valid (row, query index) pairs
        self.dst_slot, self.dst_pos = slots[rows], dst_pos  # where each valid token goes
        self.kv_len = kv_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[self.dst_slot, :, self.dst_pos] = key_states[self.rows, :, self.cols]
        v[self.dst_slot, :, self.dst_pos] = value_states[self.rows, :, self.cols]
        return k[self.slots, :, : self.kv_len], v[self.slots, :, : self.kv_len]


class Talker:
    """Batched Qwen2.5-Omni Talker with a slot KV cache (max_slots x max_len per layer)."""

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
        max_len: int = 4096,
        max_codes: int = 4096,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_slots, self.max_len, self.default_max_codes = max_slots, max_len, max_codes
        self.thinker_config = config.thinker_config
        tcfg = config.talker_config
        tcfg._attn_implementation = "sdpa"  # our masks are boolean SDPA masks
        with no_init_weights(), self.device:
            model = Qwen2_5OmniTalkerForConditionalGeneration(tcfg)
        model.load_state_dict(talker_state, strict=True)
        inv_freq = model.model.rotary_emb.inv_freq.clone()  # RoPE frequencies stay fp32
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.model.model.rotary_emb.inv_freq = inv_freq.to(self.device)
        assert self.model.config._attn_implementation == "sdpa"
        self.voices = dict(voices)
        self.text_rows = {t: r.to(self.device, dtype) for t, r in text_rows.items()}
        self.codec_bos, self.codec_pad = tcfg.tts_codec_start_token_id, tcfg.tts_codec_pad_token_id
        self.codec_mask = tcfg.tts_codec_mask_token_id
        self.stop_codes = {tcfg.tts_codec_pad_token_id, tcfg.tts_codec_end_token_id}
        self.text_end, self.text_pad = tcfg.tts_text_end_token_id, tcfg.tts_text_pad_token_id
        self.media_ids = [
            self.thinker_config.audio_token_index,
            self.thinker_config.image_token_index,
            self.thinker_config.video_token_index,
        ]

        n_layers = tcfg.num_hidden_layers
        shape = (max_slots, tcfg.num_key_value_heads, max_len, tcfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(n_layers)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(n_layers)]
        self.lengths = [0] * max_slots
        self.free_slots = list(range(max_slots))
        self.requests: dict[object, _Request] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs) -> "Talker":
        """Load from a Qwen2.5-Omni checkpoint directory (config.json, safetensors, spk_dict.pt)."""
        model_dir = Path(model_dir)
        config = Qwen2_5OmniConfig.from_pretrained(model_dir)
        spk_path = model_dir / "spk_dict.pt"
        if not spk_path.exists():
            raise ValueError(f"{model_dir}: no spk_dict.pt, so no voices for the talker")
        speakers = torch.load(spk_path, map_location="cpu", weights_only=True)
        voices = {name: int(params["bos_token"]) for name, params in speakers.items()}
        tc = config.talker_config
        token_ids = sorted({*voices.values(), tc.tts_text_end_token_id, tc.tts_text_pad_token_id})
        talker_state = load_prefixed(model_dir, "talker.")
        rows = load_embedding_rows(model_dir, token_ids)
        return cls(config, talker_state, rows, voices, **kwargs)

    # ------------------------------------------------------------------ requests

    def __contains__(self, req_id) -> bool:
        return req_id in self.requests

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

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
        recomputed). It prefills once its first reply element arrives (or the thinker finishes)."""
        if voice not in self.voices:
            raise ValueError(f"unknown voice {voice!r}; available voices: {sorted(self.voices)}")
        if req_id in self.requests:
            raise ValueError(f"request {req_id!r} is already in the talker")
        if not self.free_slots:
            raise RuntimeError("no free talker slot (check num_free_slots before adding)")
        prompt_ids = torch.as_tensor(prompt_ids).reshape(-1).cpu()
        n = prompt_ids.numel()
        if prompt_embeds.shape[0] != n or prompt_hidden.shape[0] != n:
            raise ValueError("prompt_ids, prompt_embeds and prompt_hidden must have the same length")
        if n + 2 > self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the talker's max_len {self.max_len}")

        # Prompt inputs: embedding (media placeholders zeroed) + hidden state; then speaker bos.
        embeds = prompt_embeds.to(self.device, self.dtype).clone()
        embeds[torch.isin(prompt_ids, torch.tensor(self.media_ids)).to(self.device)] = 0
        spk = self.text_rows[self.voices[voice]] + self._codec_embed(self.codec_pad)
        prefill = torch.cat([embeds + prompt_hidden.to(self.device, self.dtype), spk[None]])

        # TMRoPE positions of prompt + speaker bos + first reply token, as the talker computes them:
        # the prompt's are the thinker's (same rule, same ids), the two text tokens continue them.
        if prompt_positions is not None:
            prompt_positions = torch.as_tensor(prompt_positions).cpu().long().reshape(3, n)
            after = int(prompt_positions.max()) + 1
            positions = torch.cat([prompt_positions, torch.arange(after, after + 2).expand(3, 2)], 1)
        else:
            text_ids = torch.cat([prompt_ids, torch.tensor([self.voices[voice]] * 2)])[None]
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
            positions = positions[:, 0]  # (3, L+2)

        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        processors.append(SuppressTokensLogitsProcessor([self.codec_bos], device=self.device))
        if sampling.do_sample:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

        slot = self.free_slots.pop(0)
        self.lengths[slot] = 0
        self.requests[req_id] = _Request(
            slot=slot,
            prefill=prefill,
            positions=positions.to(self.device),
            next_position=int(positions.max()) + 1,
            processors=processors,
            do_sample=sampling.do_sample,
            generator=generator,
            max_codes=min(max_codes or self.default_max_codes, self.max_len - n - 1),
            # transformers' talker input ids: codec_mask per prompt position, then pad, bos
            history=[self.codec_mask] * n + [self.codec_pad, self.codec_bos],
        )

    def add_thinker_token(self, req_id, embedding: torch.Tensor, hidden: torch.Tensor) -> None:
        """Append one generated thinker token's (input embedding, last hidden state), (E,) each."""
        req = self.requests[req_id]
        if req.thinker_done:
            raise ValueError(f"request {req_id!r}: thinker already finished")
        req.reply.append(
            embedding.reshape(-1).to(self.device, self.dtype) + hidden.reshape(-1).to(self.device, self.dtype)
        )

    def finish_thinker(self, req_id) -> None:
        """The thinker is done: the reply track goes on with tts_text_end, then tts_text_pad."""
        req = self.requests[req_id]
        if not req.thinker_done:
            req.thinker_done = True
            req.reply.append(self.text_rows[self.text_end])

    def remove(self, req_id) -> None:
        """Drop a request (abort) and free its slot. Unknown ids are ignored."""
        req = self.requests.pop(req_id, None)
        if req is not None:
            self.lengths[req.slot] = 0
            self.free_slots.append(req.slot)

    def ready(self) -> list:
        """Requests whose next input is available (prefill or decode)."""
        return [rid for rid, req in self.requests.items() if req.reply or req.thinker_done]

    # ------------------------------------------------------------------ stepping

    def _codec_embed(self, code: int) -> torch.Tensor:
        return self.model.get_input_embeddings().weight[code]

    def _next_reply(self, req: _Request) -> torch.Tensor:
        element = req.reply.popleft()
        if req.thinker_done and not req.reply:
            req.reply.append(self.text_rows[self.text_pad])  # tts_text_pad forever after text_end
        return element

    @torch.no_grad()
    def step(
        self,
        req_ids=None,
        *,
        forced_codes: dict | None = None,
        return_logits: bool = False,
    ) -> dict[object, TalkerOutput]:
        """One talker step for each given request (default: all ready ones): prefill for those
        that have not started, one decode step for the others. Returns each request's new code.

        `forced_codes` (teacher forcing, tests) feeds the given code instead of the sampled one.
        """
        req_ids = self.ready() if req_ids is None else list(req_ids)
        not_ready = set(req_ids) - set(self.ready())
        if not_ready:
            raise ValueError(f"requests not ready for a talker step: {sorted(map(str, not_ready))}")
        forced_codes = forced_codes or {}
        prefills, decodes = [], []
        for rid in req_ids:
            req = self.requests[rid]
            if req.prefill is not None:
                reply0 = self._next_reply(req) + self._codec_embed(self.codec_bos)
                prefills.append((rid, torch.cat([req.prefill, reply0[None]]), req.positions))
                req.prefill = req.positions = None
            else:
                x = self._next_reply(req) + self._codec_embed(req.last_code)
                pos = torch.full((3, 1), req.next_position, dtype=torch.long, device=self.device)
                req.next_position += 1
                decodes.append((rid, x[None], pos))

        outputs = {}
        for group in (prefills, decodes):
            if not group:
                continue
            logits = self._forward([self.requests[rid].slot for rid, _, _ in group],
                                   [x for _, x, _ in group], [p for _, _, p in group])
            for (rid, _, _), row in zip(group, logits):
                outputs[rid] = self._emit(rid, row, forced_codes.get(rid), return_logits)
        return {rid: outputs[rid] for rid in req_ids}

    def _emit(self, rid, logits: torch.Tensor, forced: int | None, return_logits: bool) -> TalkerOutput:
        req = self.requests[rid]
        history = torch.tensor([req.history], device=self.device)
        scores = req.processors(history, logits[None].clone())
        if forced is not None:
            code = int(forced)
        elif req.do_sample:
            probs = torch.softmax(scores, dim=-1)
            code = int(torch.multinomial(probs, 1, generator=req.generator))
        else:
            code = int(scores.argmax(dim=-1))
        req.history.append(code)
        req.last_code = code
        req.num_codes += 1
        out = TalkerOutput(code=None if code in self.stop_codes else code,
                           logits=logits if return_logits else None)
        if out.code is None or req.num_codes >= req.max_codes:
            out.finished, out.reason = True, ("stop" if out.code is None else "length")
            self.remove(rid)
        return out

    def _forward(self, slots: list[int], inputs: list[torch.Tensor], positions: list[torch.Tensor]):
        """Run the decoder over one padded batch; returns the logits at each row's last input."""
        dev = self.device
        B = len(slots)
        qlens = torch.tensor([x.shape[0] for x in inputs], device=dev)
        Q = int(qlens.max())
        starts = torch.tensor([self.lengths[s] for s in slots], device=dev)
        x = torch.zeros(B, Q, inputs[0].shape[-1], device=dev, dtype=self.dtype)
        pos = torch.zeros(3, B, Q, dtype=torch.long, device=dev)
        for i, (xi, pi) in enumerate(zip(inputs, positions)):
            x[i, : xi.shape[0]] = xi
            pos[:, i, : xi.shape[0]] = pi
        kv_len = int((starts + qlens).max())

        # Row b, query t (its position starts[b]+t) sees cache entries 0..starts[b]+t; padded
        # queries see what the row's last query sees (their output is discarded).
        t = torch.minimum(torch.arange(Q, device=dev)[None], qlens[:, None] - 1)  # (B, Q)
        mask = torch.arange(kv_len, device=dev)[None, None] <= (starts[:, None] + t)[..., None]
        valid = torch.arange(Q, device=dev)[None] < qlens[:, None]
        rows, cols = valid.nonzero(as_tuple=True)
        cache = _SlotCache(self.k_cache, self.v_cache, torch.tensor(slots, device=dev),
                           rows, cols, starts[rows] + cols, kv_len)

        m = self.model
        h = m.thinker_to_talker_proj(x)
        position_embeddings = m.model.rotary_emb(h, pos)
        for layer in m.model.layers:
            h = layer(h, attention_mask=mask[:, None], position_embeddings=position_embeddings,
                      past_key_values=cache)
        last = h[torch.arange(B, device=dev), qlens - 1]
        logits = m.codec_head(m.model.norm(last)).float()
        for s, q in zip(slots, qlens.tolist()):
            self.lengths[s] += q
        return logits
