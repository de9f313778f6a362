"""The Talker of the speech path: a batched decoder whose KV memory follows its requests' use.

The Talker turns the thinker's reply into codec codes (50 per second of speech). It follows the
thinker token by token, so many requests decode together, each at its own length and position,
joining and leaving between steps. This module adds only what continuous batching needs; the
model itself is transformers' `Qwen2_5OmniTalkerForConditionalGeneration`, loaded from the
checkpoint's `talker.*` tensors unchanged, whose modules we call: `thinker_to_talker_proj`,
the codec embedding, each decoder layer's projections, M-RoPE, RMSNorms and MLP, the final norm,
`codec_head`, and `get_rope_index` for the TMRoPE positions of the prompt.

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

One step is one forward over all its requests' new tokens packed together (prefills and decodes
alike): projections, norms and MLP run once over the batch; attention runs per request on a view
of its own KV buffer (omni_vllm.talker_kv_cache), so nothing proportional to the context is copied;
sampling and stop checks run batched on the device (omni_vllm.talker_sampler) and the step reads
its codes back to the host once, whatever its batch size.

Memory: KV buffers are allocated per request at admission and grow in blocks with its real length,
`kv_cache_tokens` positions at most over all requests. A request that cannot be admitted within
that raises `TalkerFull`; one that cannot grow ends with reason "length" (and a warning).

How a scheduler drives it:

    talker = Talker.from_pretrained(model_dir, device="cuda", dtype=torch.bfloat16, max_slots=32)
    talker.add_request(rid, prompt_ids=..., prompt_embeds=..., prompt_hidden=..., voice="Chelsie",
                       image_grid_thw=..., sampling=TalkerSampling(seed=1234), max_codes=...)
    ... for each generated thinker token that went through the thinker:
    talker.add_thinker_token(rid, embedding, hidden)      # (E,) each
    ... when the thinker stops (its stop token itself is not added):
    talker.finish_thinker(rid)
    ... in the loop:
    for rid, out in talker.step(talker.ready()).items():   # out.code is None on stop
        ...

A request's slot and KV memory are released as soon as it finishes (`rid in talker` becomes
False); `remove(rid)` aborts one early.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2_5OmniConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniRotaryEmbedding,
    Qwen2_5OmniTalkerForConditionalGeneration,
    apply_rotary_pos_emb,
)

from omni_vllm.checkpoint import load_embedding_rows, load_prefixed
from omni_vllm.talker_kv_cache import TalkerKVCache, round_up
from omni_vllm.talker_sampler import CodecSampler, TalkerSampling
from omni_vllm.voices import load_speakers, resolve_voice

__all__ = ["Talker", "TalkerSampling", "TalkerOutput", "TalkerFull"]

KV_BLOCK_SIZE = (
    64  # talker KV positions per allocation block (a request's buffer is whole blocks)
)


def kv_tokens_for(num_requests: int, max_len: int) -> int:
    """KV positions that hold `num_requests` requests of `max_len` each, in whole blocks."""
    return num_requests * round_up(max_len, KV_BLOCK_SIZE)


logger = logging.getLogger(__name__)


class TalkerFull(RuntimeError):
    """No talker slot, or not enough KV memory, for a new request now."""


@dataclass
class TalkerOutput:
    """One step's result for one request. `code` is None when the step sampled a stop code (or the
    request could not continue: reason "length")."""

    code: int | None
    finished: bool = False
    reason: str | None = None  # "stop" | "length" once finished
    logits: torch.Tensor | None = None  # (vocab,) fp32 raw logits, when asked for


@dataclass
class _Request:
    slot: int
    prefill: (
        torch.Tensor | None
    )  # (L+1, E) prompt + speaker bos inputs, before reply[0]
    positions: (
        torch.Tensor | None
    )  # (3, L+2) TMRoPE positions of the prefill, on the CPU
    next_position: int  # position of the next decode input (all three axes equal)
    max_codes: int
    most_tokens: int  # KV positions it can ever need: prompt + speaker bos + max_codes
    reply: deque = field(
        default_factory=deque
    )  # pending reply-track elements, (E,) each
    thinker_done: bool = False
    last_code: int | None = None
    num_codes: int = 0


class Talker:
    """Batched Qwen2.5-Omni Talker: `max_slots` requests at once, `max_len` positions each (default:
    the talker config's `max_position_embeddings`), `kv_cache_tokens` KV positions over all (default:
    max_slots * max_len, allocated only as used)."""

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
        model.model.rotary_emb = Qwen2_5OmniRotaryEmbedding(
            tcfg
        )  # buffers, not in the checkpoint
        inv_freq = (
            model.model.rotary_emb.inv_freq
        )  # RoPE frequencies stay fp32, as in transformers
        self.model = (
            model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        )
        self.model.model.rotary_emb.inv_freq = inv_freq.to(self.device)
        self.voices = dict(voices)
        self.text_rows = {t: r.to(self.device, dtype) for t, r in text_rows.items()}
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
        self.head_dim = tcfg.head_dim
        self.gqa = tcfg.num_attention_heads != tcfg.num_key_value_heads

        self.kv = TalkerKVCache(
            num_layers=tcfg.num_hidden_layers,
            num_kv_heads=tcfg.num_key_value_heads,
            head_dim=tcfg.head_dim,
            device=self.device,
            dtype=dtype,
            # Buffers are whole blocks: by default room for `max_slots` requests of `max_len` rounded up.
            max_tokens=kv_cache_tokens or kv_tokens_for(max_slots, self.max_len),
            block_size=KV_BLOCK_SIZE,
        )
        self.sampler = CodecSampler(
            max_slots,
            tcfg.vocab_size,
            suppress=self.codec_bos,
            stop=(tcfg.tts_codec_pad_token_id, tcfg.tts_codec_end_token_id),
            device=self.device,
        )
        self.free_slots = list(range(max_slots))
        self.requests: dict[object, _Request] = {}

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
        """Bytes of KV memory allocated now (it follows the requests' lengths)."""
        return self.kv.bytes()

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
        recomputed). It prefills once its first reply element arrives (or the thinker finishes).

        Raises ValueError when the request can never run here (unknown voice, a prompt that does
        not fit `max_len`) and TalkerFull when there is no slot or KV memory for it now."""
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
        if not self.free_slots:
            raise TalkerFull("no free talker slot (check num_free_slots before adding)")

        # Prompt inputs: embedding (media placeholders zeroed) + hidden state; then speaker bos.
        media = torch.isin(prompt_ids, self.media_ids).to(self.device)
        embeds = prompt_embeds.to(self.device).masked_fill(media[:, None], 0)
        spk = self.text_rows[self.voices[voice]] + self._codec_embed(self.codec_pad)
        prefill = torch.cat(
            [(embeds + prompt_hidden.to(self.device)).to(self.dtype), spk[None]]
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

        slot = self.free_slots[0]
        # transformers' talker input ids: codec_mask per prompt position, then pad, bos
        self.sampler.open(
            slot,
            sampling,
            [self.codec_mask, self.codec_pad, self.codec_bos]
            if n
            else [self.codec_pad, self.codec_bos],
        )
        max_codes = min(max_codes or self.default_max_codes, self.max_len - n - 1)
        most_tokens = n + 1 + max_codes
        if not self.kv.reserve(
            req_id, n + 2, most_tokens
        ):  # last: nothing to undo when refused
            raise TalkerFull(
                f"talker KV cache full: a prompt of {n} tokens needs {n + 2} positions (in blocks of "
                f"{self.kv.block_size}), {self.kv.free_tokens} of {self.kv.max_tokens} are free"
            )
        self.free_slots.pop(0)
        self.requests[req_id] = _Request(
            slot=slot,
            prefill=prefill,
            positions=positions,
            next_position=int(positions.max()) + 1,
            max_codes=max_codes,
            most_tokens=most_tokens,
        )

    def add_thinker_token(
        self, req_id, embedding: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        """Append one generated thinker token's (input embedding, last hidden state), (E,) each."""
        req = self.requests[req_id]
        if req.thinker_done:
            raise ValueError(f"request {req_id!r}: thinker already finished")
        element = embedding.reshape(-1).to(self.device) + hidden.reshape(-1).to(
            self.device
        )
        req.reply.append(element.to(self.dtype))

    def finish_thinker(self, req_id, max_codes: int | None = None) -> bool:
        """The thinker is done: the reply track goes on with tts_text_end, then tts_text_pad.

        `max_codes` lowers the request's cap on codes now that the text's length is known (the
        runaway guard: a talker that never samples its stop code then ends with reason "length");
        returns whether it lowered the cap."""
        req = self.requests[req_id]
        if not req.thinker_done:
            req.thinker_done = True
            req.reply.append(self.text_rows[self.text_end])
        if max_codes is not None and max_codes < req.max_codes:
            req.max_codes = max(1, max_codes)
            return True
        return False

    def remove(self, req_id) -> None:
        """Drop a request (abort) and free its slot and KV memory. Unknown ids are ignored."""
        req = self.requests.pop(req_id, None)
        self.kv.release(req_id)
        if req is not None:
            self.free_slots.append(req.slot)

    def ready(self) -> list:
        """Requests whose next input is available (prefill or decode)."""
        return [
            rid for rid, req in self.requests.items() if req.reply or req.thinker_done
        ]

    # ------------------------------------------------------------------ stepping

    def _codec_embed(self, code: int) -> torch.Tensor:
        return self.model.get_input_embeddings().weight[code]

    def _next_reply(self, req: _Request) -> torch.Tensor:
        element = req.reply.popleft()
        if req.thinker_done and not req.reply:
            req.reply.append(
                self.text_rows[self.text_pad]
            )  # tts_text_pad forever after text_end
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
        that have not started, one decode step for the others, all in one forward. Returns each
        request's new code.

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
        outputs: dict[object, TalkerOutput] = {}
        batch, pieces, positions, decodes = [], [], [], []
        for rid in req_ids:
            req = self.requests[rid]
            if req.prefill is not None:
                reply0 = self._next_reply(req) + self._codec_embed(self.codec_bos)
                pieces.append(torch.cat([req.prefill, reply0[None]]))
                positions.append(req.positions)
                req.prefill = req.positions = None
            else:
                if not self.kv.reserve(rid, self.kv.lengths[rid] + 1, req.most_tokens):
                    logger.warning(
                        "talker: request %s ends after %d codes: KV cache full (%d positions, all in use)",
                        rid,
                        req.num_codes,
                        self.kv.max_tokens,
                    )
                    self.remove(rid)
                    outputs[rid] = TalkerOutput(
                        code=None, finished=True, reason="length"
                    )
                    continue
                pieces.append(
                    len(decodes)
                )  # filled in below, once all decode inputs are embedded
                positions.append(
                    torch.full((3, 1), req.next_position, dtype=torch.long)
                )
                req.next_position += 1
                decodes.append(rid)
            batch.append(rid)
        if decodes:
            last = torch.tensor(
                [self.requests[rid].last_code for rid in decodes], device=self.device
            )
            replies = torch.stack(
                [self._next_reply(self.requests[rid]) for rid in decodes]
            )
            decode_inputs = replies + self.model.get_input_embeddings()(last)
            pieces = [
                decode_inputs[p, None] if isinstance(p, int) else p for p in pieces
            ]

        if batch:
            logits = self._forward(
                batch, pieces, torch.cat(positions, dim=1).to(self.device)
            )
            slots = [self.requests[rid].slot for rid in batch]
            codes, stops = self.sampler.sample(
                slots, logits, [forced_codes.get(rid) for rid in batch]
            )
            # The step's one read back to the host: every row's code and stop flag.
            read = torch.stack([codes, stops.to(codes.dtype)]).T.tolist()
            for i, (rid, (code, stop)) in enumerate(zip(batch, read)):
                req = self.requests[rid]
                req.last_code = code
                req.num_codes += 1
                out = TalkerOutput(
                    code=None if stop else code,
                    logits=logits[i] if return_logits else None,
                )
                if stop or req.num_codes >= req.max_codes:
                    out.finished, out.reason = True, ("stop" if stop else "length")
                    self.remove(rid)
                outputs[rid] = out
        return {rid: outputs[rid] for rid in req_ids}

    def _forward(
        self, req_ids: list, inputs: list[torch.Tensor], positions: torch.Tensor
    ) -> torch.Tensor:
        """Run the decoder over the requests' new inputs packed into one sequence ((q_i, E) each,
        positions (3, sum q_i)); returns the fp32 logits at each request's last input, (B, vocab)."""
        m = self.model
        lengths = [x.shape[0] for x in inputs]
        spans, start = [], 0
        for q in lengths:
            spans.append((start, start + q))
            start += q
        for rid, q in zip(req_ids, lengths):
            if q > 1 and self.kv.lengths[rid]:
                raise AssertionError(
                    "a multi-token input must start from an empty KV cache"
                )
        h = m.thinker_to_talker_proj(torch.cat(inputs))[None]  # (1, T, H)
        T, d = h.shape[1], self.head_dim
        cos, sin = m.model.rotary_emb(h, positions[:, None])
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)
            k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)
            v = attn.v_proj(x).view(1, T, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = []
            for rid, (s, e) in zip(req_ids, spans):
                keys, values = self.kv.append(rid, i, k[:, :, s:e], v[:, :, s:e])
                out.append(
                    F.scaled_dot_product_attention(
                        q[:, :, s:e],
                        keys,
                        values,
                        is_causal=e - s > 1,
                        scale=attn.scaling,
                        enable_gqa=self.gqa,
                    )
                )
            h = h + attn.o_proj(torch.cat(out, dim=2).transpose(1, 2).reshape(1, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for rid, q in zip(req_ids, lengths):
            self.kv.advance(rid, q)
        last = h[0, torch.tensor([e - 1 for _, e in spans], device=self.device)]
        return m.codec_head(m.model.norm(last)).float()
