"""Sampling of the talker's codec codes for a whole batch at once, on the device, with no
per-row work on the host.

Why: one talker step must cost the same few kernels whatever its batch size, with no read back
to the host until its codes are ready (on a GPU each read waits for the step's kernels, and a
captured step allows none). The logits processors transformers' `generate` applies to
Qwen2.5-Omni's talker (repetition penalty, codec_bos suppression, temperature, top-k, top-p, in
that order) are applied to every row at once, each row with its own settings from per-slot
device tensors, with the arithmetic of transformers' processors: a row gets the probabilities
transformers would give it.

The draw is `argmax(p / q)` with `q ~ Exp(1)`, which is how `torch.multinomial` draws one sample.
Its noise is counter-based, as vLLM's V2 sampler does it: `q` is a hash of (the request's seed,
the request's step count, the vocabulary id), computed by a few integer ops over the batch. So a
seeded request's codes depend on its seed and its own history only, not on what else shares the
batch, on bucket padding, or on a preemption (its step count goes on where it stopped), and the
draw needs no generator object per row. (transformers draws from torch's global generator
instead, so a seeded request samples other codes than transformers with `torch.manual_seed`:
same distribution, different stream.) A request without a seed gets one from torch's global
generator when it opens.

Row `max_slots` is a dummy slot that padded rows of a static-shape step use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TalkerSampling", "CodecSampler", "hashed_exponential"]


@dataclass(frozen=True)
class TalkerSampling:
    """Per-request sampling settings; defaults are those of Qwen2.5-Omni's `generate`.

    `do_sample=False` is greedy (repetition penalty and codec_bos suppression still apply, as in
    transformers). `seed` makes the request's draws reproducible and independent of the batch;
    `None` takes a seed from torch's global generator when the request opens.
    """

    do_sample: bool = True
    top_k: int = 40
    top_p: float = 0.8
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    seed: int | None = None


def _signed(c: int) -> int:
    """A 64-bit constant as the signed int64 torch multiplies with (wrapping)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_STEP = _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hashed_exponential(
    seed: torch.Tensor, counter: torch.Tensor, vocab: torch.Tensor
) -> torch.Tensor:
    """Exp(1) noise (B, V) from a splitmix64 hash of seed (B,), counter (B,) and vocabulary ids
    (V,) or (B, V)."""
    ids = vocab if vocab.dim() == 2 else vocab[None, :]
    x = (seed * _GOLDEN + counter * _STEP)[:, None] + ids * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    # 23 high bits -> a uniform in (0, 1), never 0 or 1 in float32 (q = 0 would make 0 / 0)
    u = (_shr(x, 41).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(u)


class CodecSampler:
    """Per-slot sampling state (settings, codes seen so far, seed, step count) on the device, for
    `max_slots` slots and one dummy slot."""

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
        self.stop = tuple(stop)
        self.dummy = max_slots
        rows = max_slots + 1
        kw = dict(device=self.device)
        # Codes seen by each slot's request: the repetition penalty's set (transformers gathers the
        # talker's input ids, in which a repeated id is penalised once, as a set member is).
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, **kw)
        self.penalty = torch.ones(rows, **kw)
        self.temperature = torch.ones(rows, **kw)
        self.top_k = torch.full((rows,), vocab_size, dtype=torch.long, **kw)
        # tokens whose cumulative probability <= this go (top-p), 0 for rows without top-p
        self.top_p_drop = torch.zeros(rows, **kw)
        self.do_sample = torch.zeros(rows, dtype=torch.bool, **kw)
        self.seed = torch.zeros(rows, dtype=torch.long, **kw)
        self.counter = torch.zeros(rows, dtype=torch.long, **kw)
        self.vocab = torch.arange(vocab_size, **kw)
        # host copies that choose a step's candidate width
        self.top_k_host = [vocab_size] * rows
        self.do_sample_host = [False] * rows
        self.candidate_widths = [w for w in (64, 512) if w < vocab_size] + [vocab_size]
        self.suppressed = self.vocab == suppress

    def open(self, slot: int, sampling: TalkerSampling, seen: list[int]) -> None:
        """Give `slot` a new request's settings and the codes its history starts with (at
        admission, once per request)."""
        sample = sampling.do_sample
        self.seen[slot] = False
        self.seen[slot, seen] = True
        self.penalty[slot] = sampling.repetition_penalty
        self.temperature[slot] = sampling.temperature if sample else 1.0
        top_k = max(sampling.top_k, 1) if sample and sampling.top_k else self.vocab_size
        self.top_k[slot] = self.top_k_host[slot] = min(top_k, self.vocab_size)
        self.do_sample_host[slot] = sample
        # transformers compares with the Python float 1 - top_p (then cast to fp32): same here
        uses_top_p = sample and sampling.top_p < 1.0
        self.top_p_drop[slot] = 1 - sampling.top_p if uses_top_p else -1.0
        self.do_sample[slot] = sample
        seed = sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self.seed[slot] = seed
        self.counter[slot] = 0

    def width(self, slots: list[int]) -> int:
        """How many top candidates a step over `slots` must keep (the graph-key part of sampling):
        the smallest of `candidate_widths` that covers every sampling row's top-k."""
        widest = max(
            (self.top_k_host[s] for s in slots if self.do_sample_host[s]), default=1
        )
        return next(w for w in self.candidate_widths if w >= widest)

    def _processed(
        self, slots: torch.Tensor, logits: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(greedy codes, the processed scores of the `width` best in ascending order, their
        vocabulary ids): the repetition penalty and codec_bos suppression (greedy's argmax), then
        temperature, top-k and top-p (top-k's cut is the k-th largest; top-p's cumulative sum
        runs over what top-k kept, as in transformers, where the rest have probability 0)."""
        penalty = self.penalty[slots, None]
        scores = torch.where(
            self.seen[slots],
            torch.where(logits < 0, logits * penalty, logits / penalty),
            logits,
        )
        scores = scores.masked_fill(self.suppressed, -torch.inf)
        greedy = scores.argmax(dim=-1)
        scores = scores / self.temperature[slots, None]
        if width < self.vocab_size:
            top, order = scores.topk(width, dim=-1)
            ascending, order = top.flip(-1), order.flip(-1)
        else:
            ascending, order = scores.sort(dim=-1)
        # greedy rows (top-k off) keep everything: they do not draw
        cut = (width - self.top_k[slots]).clamp(min=0)
        kth = ascending.gather(1, cut[:, None])
        ascending = ascending.masked_fill(ascending < kth, -torch.inf)
        drop = (
            ascending.softmax(dim=-1).cumsum(dim=-1) <= self.top_p_drop[slots, None]
        ) & (self.vocab[:width] != width - 1)
        return greedy, ascending.masked_fill(drop, -torch.inf), order

    def distribution(self, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities (B, vocab) a sampling row draws from (what transformers' processors
        give), in vocabulary order."""
        width = self.width(slots.tolist())
        _, ascending, order = self._processed(slots, logits, width)
        probs = ascending.softmax(dim=-1)
        return torch.zeros_like(logits).scatter(1, order, probs)

    def sample(
        self,
        slots: torch.Tensor,
        logits: torch.Tensor,
        forced: torch.Tensor,
        width: int | None = None,
    ) -> torch.Tensor:
        """(2, B) long: codes and stop flags for the rows of `logits` (B, vocab) fp32, row i from
        slot `slots[i]`; `forced[i] >= 0` (teacher forcing) replaces the draw. Device ops only (a
        captured step runs it). The codes join their slots' seen sets; the slots' step counts
        advance. `width`: `width(slots)`, computed by the caller (on the host, before a capture)."""
        if width is None:
            width = self.vocab_size
        greedy, ascending, order = self._processed(slots, logits, width)
        probs = ascending.softmax(dim=-1)
        # the noise of each vocabulary id, in the sorted order
        noise = hashed_exponential(self.seed[slots], self.counter[slots], order)
        drawn = order.gather(1, (probs / noise).argmax(dim=-1, keepdim=True))[:, 0]

        codes = torch.where(self.do_sample[slots], drawn, greedy)
        codes = torch.where(forced >= 0, forced, codes)
        self.seen[slots, codes] = True
        self.counter.index_add_(0, slots, torch.ones_like(slots))
        stops = torch.zeros_like(codes, dtype=torch.bool)
        for code in self.stop:
            stops |= codes == code
        return torch.stack([codes, stops.long()])
