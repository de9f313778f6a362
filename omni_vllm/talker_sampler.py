"""Sampling of the talker's codec codes for a whole batch at once, on the device.

Why batched: one talker step must cost a constant number of device-to-host reads whatever its
batch size (on a GPU each read waits for the step's kernels). The logits processors transformers'
`generate` applies to Qwen2.5-Omni's talker (repetition penalty, codec_bos suppression,
temperature, top-k, top-p, in that order) are applied here to every row at once, each row with its
own settings, with the same arithmetic as transformers' processors, so a request gets the codes
transformers would give it. Only the draw's noise is per row (the exponential noise of
`torch.multinomial`'s one-sample draw, from the row's own generator, so a seeded request's codes do
not depend on what else is in the batch); it stays on the device. The caller reads the step's codes and stop flags once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TalkerSampling", "CodecSampler"]


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


class CodecSampler:
    """Per-slot sampling state (settings, codes seen so far) on the device, for `max_slots` slots."""

    def __init__(
        self,
        max_slots: int,
        vocab_size: int,
        *,
        suppress: int,
        stop: tuple[int, ...],
        device,
    ):
        self.device = torch.device(device)
        self.vocab_size, self.suppress = vocab_size, suppress
        self.stop = torch.tensor(stop, device=self.device)
        # Codes seen by each slot's request: the repetition penalty's set (transformers gathers the
        # talker's input ids, in which a repeated id is penalised once, as a set member is).
        self.seen = torch.zeros(
            max_slots, vocab_size, dtype=torch.bool, device=self.device
        )
        self.penalty = torch.ones(max_slots, device=self.device)
        self.temperature = torch.ones(max_slots, device=self.device)
        self.top_k = torch.full(
            (max_slots,), vocab_size, dtype=torch.long, device=self.device
        )
        self.top_p_drop = torch.zeros(
            max_slots, device=self.device
        )  # tokens whose cumulative prob <= this go
        self.uses_top_p = torch.zeros(max_slots, dtype=torch.bool, device=self.device)
        self.do_sample = [False] * max_slots
        self.top_k_host = [vocab_size] * max_slots
        self.generators: list[torch.Generator | None] = [None] * max_slots

    def open(self, slot: int, sampling: TalkerSampling, seen: list[int]) -> None:
        """Give `slot` a new request's settings and the codes its history starts with."""
        sample = sampling.do_sample
        self.seen[slot] = False
        self.seen[slot, seen] = True
        self.penalty[slot] = sampling.repetition_penalty
        self.temperature[slot] = sampling.temperature if sample else 1.0
        top_k = max(sampling.top_k, 1) if sample and sampling.top_k else self.vocab_size
        self.top_k[slot] = self.top_k_host[slot] = min(top_k, self.vocab_size)
        # transformers compares with the Python float 1 - top_p (then cast to fp32): same here
        self.top_p_drop[slot] = 1 - sampling.top_p
        self.uses_top_p[slot] = sample and sampling.top_p < 1.0
        self.do_sample[slot] = sample
        self.generators[slot] = None
        if sampling.seed is not None:
            self.generators[slot] = torch.Generator(device=self.device).manual_seed(
                sampling.seed
            )

    def sample(
        self, slots: list[int], logits: torch.Tensor, forced: list[int | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B,) for the rows of `logits` (B, vocab) fp32, row i from slot `slots[i]` (a forced
        code, teacher forcing, replaces the draw), and whether each is a stop code; both stay on the
        device. The codes join their slots' seen sets."""
        rows = torch.tensor(slots, device=self.device)
        penalty = self.penalty[rows, None]
        scores = torch.where(
            self.seen[rows],
            torch.where(logits < 0, logits * penalty, logits / penalty),
            logits,
        )
        scores[:, self.suppress] = -torch.inf
        codes = scores.argmax(dim=-1)
        sampled = [
            i for i, s in enumerate(slots) if self.do_sample[s] and forced[i] is None
        ]
        if sampled:
            scores = scores / self.temperature[rows, None]
            # top-k as transformers does it (below the k-th largest goes), one topk for all rows
            top_k = self.top_k[rows, None]
            limited = [
                self.top_k_host[s]
                for s in slots
                if self.top_k_host[s] < self.vocab_size
            ]
            if limited:
                k_most = max(limited)
                kth = scores.topk(k_most, dim=-1).values.gather(
                    1, top_k.clamp(max=k_most) - 1
                )
                kth = kth.masked_fill(
                    top_k >= self.vocab_size, -torch.inf
                )  # rows without top-k
                scores = scores.masked_fill(scores < kth, -torch.inf)
            ascending, order = scores.sort(dim=-1)
            drop = (
                ascending.softmax(dim=-1).cumsum(dim=-1) <= self.top_p_drop[rows, None]
            )
            drop[:, -1] = False
            drop &= self.uses_top_p[rows, None]
            scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
            probs = scores.softmax(dim=-1)
            # torch.multinomial's draw for one sample is argmax(p / q), q ~ Exp(1) from the row's
            # generator; done here without its argument checks, which read back to the host.
            q = torch.ones_like(probs)
            for i in sampled:
                q[i].exponential_(generator=self.generators[slots[i]])
            draws = (probs / q).argmax(dim=-1)
            rows_sampled = torch.tensor(sampled, device=self.device)
            codes[rows_sampled] = draws[rows_sampled]
        teacher = [i for i, f in enumerate(forced) if f is not None]
        if teacher:
            codes[torch.tensor(teacher, device=self.device)] = torch.tensor(
                [forced[i] for i in teacher], device=self.device
            )
        self.seen[rows, codes] = True
        return codes, torch.isin(codes, self.stop)
