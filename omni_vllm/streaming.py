"""Sliding-window (streaming) Token2Wav, batched across requests.

A request's codec codes arrive a few at a time from the talker. Its audio is cut into *chunks* of
codes at fixed boundaries ``0, first_chunk, first_chunk + chunk, ...``. Chunk ``k`` = codes
``[b_k, b_k+1)`` is decoded as soon as ``look_ahead`` more codes exist (or the code stream is
finished):

* **DiT**: one flow-matching solve over the *window* of codes ``[b_k - left_context, b_k+1 +
  look_ahead)`` (clipped to the stream), with the matching slice of the request's one fixed noise
  tensor; the mel frames of the chunk itself are kept, the context frames are thrown away.
* **BigVGAN**: the kept (final) mel frames are vocoded with ``vocoder_left`` frames of final mel
  before them; ``vocoder_right`` frames at the end of each chunk are held back until the next chunk
  has supplied their right context (or, with ``vocoder_right_from_dit``, the DiT's own look-ahead
  frames are used as right context and nothing is held back).

Every boundary is a function of the code positions and of the stream's final length only, so the
audio a request gets does not depend on how its codes arrive, on which other requests share a batch
(beyond float rounding of padded batched matmuls, < 1e-7), or on how many windows a call decodes.

Receptive fields (why streamed audio cannot be bit-exact with the real sampler, and the defaults):

* One DiT evaluation is *block-local*: every op is per frame except the block attention, and a
  layer with look-back (look-ahead) lets a 24-frame block see one block before (after) it. The real
  config has look-back in layers 0 and 20 and look-ahead in layer 10: one evaluation reaches 2
  blocks back and 1 block ahead (24 and 12 codes). The speaker encoder (ECAPA) reads only the
  voice's ``ref_mel``; ``cond`` and the time embedding are global constants: neither couples frames.
* But the ODE is solved over the whole window: 9 RK4 steps of 4 sequential evaluations each, and
  every evaluation widens the dependency cone again. The mel of a frame therefore depends on codes
  and noise ``36 * 2`` blocks back and ``36 * 1`` block ahead (864 / 432 codes, 17 s / 9 s). No
  practical window covers that, so streamed mel differs from one-shot mel; the difference decays
  with the distance to the window edge and is measured in ``benchmarks/streaming_quality.py``.
  With a 2-point sampler (1 RK4 step) the cone is 96 / 48 codes and a window covering it makes
  streaming equal to one-shot up to float rounding (tested), which is what shows the windowing is
  right. :func:`dit_receptive_field` computes these numbers from the config.
* BigVGAN is a finite convolution stack: :func:`bigvgan_receptive_field` walks it (convs, transposed
  convs, anti-aliased activations) and gives 34 mel frames each side for the real config (most of it
  from the 11-tap dilated resblocks at 5 samples per frame). Its effective field is shorter: 16
  frames of context each side already reach the float32 floor on random weights.

Noise: one per-request noise tensor, frames ``[0, 2 * num_codes)``, sliced by absolute frame. Given
as a tensor it must cover the stream; given as a seed / generator (or None: a seed drawn from
torch's global RNG at open) it is drawn lazily, one DiT block (24 frames) at a time from a CPU
generator, so it is the same tensor however long the stream turns out to be.

The window schedule and per-request buffers (`StreamConfig`, `StreamState`: which codes form the
next window) are in omni_vllm.stream_windows and re-exported here; this module does the torch
decoding. A window call is three steps: `plan_windows` (bookkeeping: which windows and vocoder
segments, the streams advanced), the tensor work (omni_vllm.token2wav_runner.WindowRunner: eager,
or on static buffers captured per bucket on CUDA) and `apply_windows` (the new final mel kept as
vocoder context, the audio cut out), so that the tensor work can run on another thread while the
caller goes on (`StreamingToken2Wav.begin` / `finish`; omni_vllm.speech.decoder).

Scheduler use (one engine iteration)::

    streamer = StreamingToken2Wav(t2w)            # once
    streamer.open(req_id, voice, noise=seed)      # when a request starts speaking
    streamer.push(req_id, new_codes, finished)    # after each talker step
    for req_id, out in streamer.step().items():   # one batched DiT + one BigVGAN call
        send(req_id, out.audio, out.done)         # done streams are closed by step()
    streamer.cancel(req_id)                       # client went away: state freed
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from omni_vllm.stream_windows import StreamConfig, StreamState, next_windows
from omni_vllm.token2wav import NoiseSource, Token2Wav
from omni_vllm.token2wav_runner import DEFAULT_MAX_BATCH, WindowRunner

__all__ = [  # StreamConfig / StreamState live in omni_vllm.stream_windows
    "StreamConfig",
    "StreamOutput",
    "StreamState",
    "StreamingToken2Wav",
    "WindowCall",
    "WindowResult",
    "apply_windows",
    "bigvgan_receptive_field",
    "decode_windows",
    "dit_receptive_field",
    "plan_windows",
    "stream_decode",
]


def dit_receptive_field(t2w: Token2Wav, num_steps: int = 10) -> tuple[int, int]:
    """(codes back, codes ahead) that a mel frame of a full `num_steps` solve depends on:
    4 sequential evaluations per RK4 step, each reaching as many blocks back (ahead) as there are
    layers with look-back (look-ahead)."""
    layers = t2w.dit.transformer_blocks
    back = sum(layer.look_backward_block for layer in layers)
    ahead = sum(layer.look_ahead_block for layer in layers)
    evaluations = 4 * (num_steps - 1)
    block = t2w.block_size // t2w.repeats
    return evaluations * back * block, evaluations * ahead * block


def bigvgan_receptive_field(t2w: Token2Wav) -> tuple[int, int]:
    """(mel frames back, mel frames ahead) that any output sample of the vocoder depends on.

    Exact index arithmetic through the vocoder's layers on an unbounded signal, for every one of
    the `hop` output phases within a frame; the residual/averaged branches take the union."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    voc = t2w.bigvgan

    def conv(m, lo, hi):  # nn.Conv1d, stride 1
        (k,), (d,), (p,) = m.kernel_size, m.dilation, m.padding
        return lo - p, hi - p + (k - 1) * d

    def conv_t(m, lo, hi):  # nn.ConvTranspose1d: out[i*s + j - p] += in[i] * w[j]
        (k,), (s,), (p,) = m.kernel_size, m.stride, m.padding
        return -((-(lo + p - (k - 1))) // s), (hi + p) // s

    def act(m, lo, hi):  # anti-aliased activation: upsample, pointwise, downsample
        down, up = m.downsample, m.upsample
        lo, hi = (
            lo * down.stride - down.pad_left,
            hi * down.stride + down.kernel_size - 1 - down.pad_left,
        )
        lo, hi = (
            lo + up.pad_left,
            hi + up.pad_left,
        )  # crop of the transposed conv's output
        k, s = up.kernel_size, up.stride
        return -(
            (-(lo - (k - 1))) // s
        ) - up.pad, hi // s - up.pad  # undo the replicate pad

    def resblock(m, lo, hi):
        acts1, acts2 = m.activations[::2], m.activations[1::2]
        for conv1, conv2, act1, act2 in reversed(
            list(zip(m.convs1, m.convs2, acts1, acts2))
        ):
            a, b = act(act1, *conv(conv1, *act(act2, *conv(conv2, lo, hi))))
            lo, hi = min(lo, a), max(hi, b)
        return lo, hi

    assert isinstance(voc.activation_post, ref.Qwen2_5OmniAntiAliasedActivation1d)
    back = ahead = 0
    for phase in range(t2w.hop):
        lo = hi = phase
        lo, hi = act(voc.activation_post, *conv(voc.conv_post, lo, hi))
        for stage in reversed(range(voc.num_upsample_layers)):
            blocks = voc.resblocks[
                stage * voc.num_residual_blocks : (stage + 1) * voc.num_residual_blocks
            ]
            spans = [resblock(b, lo, hi) for b in blocks]
            lo, hi = conv_t(
                voc.ups[stage][0], min(s[0] for s in spans), max(s[1] for s in spans)
            )
        lo, hi = conv(voc.conv_pre, lo, hi)
        back, ahead = (
            max(back, -lo),
            max(ahead, hi),
        )  # the output sample lies in mel frame 0
    return back, ahead


@dataclass
class Segment:
    """One BigVGAN input of a window call: mel frames [in_start, ...) of which [emit_start,
    emit_end) are emitted. `pieces` say where its frames come from, in order: a tensor (final mel
    decoded by earlier calls, (mel_dim, n)) or `(window, start, end)`: frames [start, end) of this
    call's DiT mel of that window."""

    index: int  # stream position in the call
    pieces: list
    in_start: int
    emit_start: int
    emit_end: int

    @property
    def frames(self) -> int:
        return sum(
            p.shape[1] if torch.is_tensor(p) else p[2] - p[1] for p in self.pieces
        )


@dataclass
class WindowCall:
    """The tensor work of one window call, planned by the bookkeeping (`plan_windows`) and run
    by omni_vllm.token2wav_runner (in the worker's thread or a decode thread): one DiT solve over
    `codes` / `noise` / `voices` (one entry per window), then one BigVGAN call over `segments`."""

    streams: list[StreamState]
    windows: list  # stream_windows.Window, flat over streams
    codes: list[torch.Tensor]  # per window, CPU long
    noise: list[torch.Tensor]  # per window, (frames, mel_dim) float32 CPU
    voices: list[str]
    sampling: dict
    segments: list[Segment]
    request_ids: list = field(
        default_factory=list
    )  # StreamingToken2Wav's ids of `streams`


@dataclass
class WindowResult:
    """What a window call computed: the DiT mel per window (mel_dim, frames) on the device, the
    waveform per segment (float32, CPU)."""

    mels: list[torch.Tensor]
    wavs: list[torch.Tensor]


def plan_windows(
    t2w: Token2Wav, streams: Sequence[StreamState], max_windows: int = 1
) -> WindowCall:
    """The next window call of these streams: which windows (at most `max_windows` per stream)
    and which vocoder segments, with the streams' schedule advanced as if it had run (next chunk,
    frames emitted). Bookkeeping only: no tensor op beyond reading the streams' codes and noise,
    so it runs while the previous call's tensors are still in flight. `apply_windows` completes it."""
    sampling = streams[0].config.sampling() if streams else {}
    if any(s.config.sampling() != sampling for s in streams):
        raise ValueError(
            "streams decoded together must share num_steps / guidance / sway"
        )
    repeats = t2w.repeats
    if len(set(map(id, streams))) != len(streams):
        raise ValueError("a stream appears twice in one call")
    if any(s.repeats != repeats for s in streams):
        raise ValueError(
            "stream opened with another mel frames per code than this Token2Wav"
        )
    windows = [next_windows(s, max_windows) for s in streams]
    flat = [w for ws in windows for w in ws]
    call = WindowCall(
        list(streams),
        flat,
        [w.stream._code_slice(w.code_start, w.code_end) for w in flat],
        [
            w.stream.noise(
                repeats * w.code_start,
                repeats * w.code_end,
                t2w.mel_dim,
                t2w.block_size,
            )
            for w in flat
        ],
        [w.stream.voice for w in flat],
        sampling,
        [],
    )

    # BigVGAN: one segment per decoded chunk (plus a finished stream's held tail).
    j = 0
    for i, (s, ws) in enumerate(zip(streams, windows)):
        cfg = s.config
        # this call's final mel of the stream: (absolute first frame, window, start, end)
        pending = []
        for w in ws:
            a, b = (
                repeats * (w.keep_start - w.code_start),
                repeats * (w.keep_end - w.code_start),
            )
            pending.append((repeats * w.keep_start, j, a, b))
            decoded = repeats * w.keep_end  # final mel frames [0, decoded) exist now
            full = (
                w.keep_end == s.bounds(w.chunk)[1]
            )  # a partial chunk is the stream's last
            if cfg.vocoder_right_from_dit:
                emit_end = decoded
                # provisional frames of the look-ahead
                end = min(b + cfg.vocoder_right, repeats * (w.code_end - w.code_start))
                right = [(j, b, end)] if end > b else []
            else:
                emit_end = decoded - cfg.vocoder_right if full else decoded
                right = []
            call.segments.append(_segment(i, s, emit_end, decoded, pending, right))
            s.next_chunk = w.chunk + 1
            j += 1
        if s._tail_ready():
            decoded = repeats * s.num_codes
            call.segments.append(_segment(i, s, decoded, decoded, pending, []))
    return call


def _segment(
    index: int, s: StreamState, emit_end: int, decoded: int, pending: list, right: list
) -> Segment:
    """Vocoder input for emitting final frames [frames_emitted, emit_end): final mel from
    `vocoder_left` frames before, up to `decoded` (from the stream's mel so far, then this call's
    `pending` windows), then `right` (provisional) frames."""
    in_start = max(0, s.frames_emitted - s.config.vocoder_left)
    pieces = []
    have = s._mel_base + (0 if s._mel is None else s._mel.shape[1])
    if in_start < min(have, decoded):
        pieces.append(
            s._mel[:, in_start - s._mel_base : min(have, decoded) - s._mel_base]
        )
    for first, window, a, b in pending:
        lo, hi = max(in_start, first), min(decoded, first + b - a)
        if lo < hi:
            pieces.append((window, a + lo - first, a + hi - first))
    seg = Segment(index, pieces + right, in_start, s.frames_emitted, emit_end)
    s.frames_emitted = emit_end
    return seg


def apply_windows(
    t2w: Token2Wav, call: WindowCall, result: WindowResult
) -> list[torch.Tensor]:
    """Complete a planned call with what it computed: each stream keeps its new final mel (vocoder
    context for its next call) and releases what it never needs again; returns, per stream, the
    waveform samples that became final (float32, CPU; empty when it had nothing ready)."""
    repeats, hop = t2w.repeats, t2w.hop
    for w, mel in zip(call.windows, result.mels):
        s = w.stream
        final = mel[
            :,
            repeats * (w.keep_start - w.code_start) : repeats
            * (w.keep_end - w.code_start),
        ]
        if s.mel_chunks is not None:
            s.mel_chunks.append(final)
        s._mel = final if s._mel is None else torch.cat([s._mel, final], dim=1)

    out: list[list[torch.Tensor]] = [[] for _ in call.streams]
    for seg, wav in zip(call.segments, result.wavs):
        out[seg.index].append(
            wav[
                (seg.emit_start - seg.in_start) * hop : (seg.emit_end - seg.in_start)
                * hop
            ]
        )
    for s in call.streams:
        # Never needed again: codes and noise before the next window, mel before the next segment's context.
        nxt = max(0, s.bounds(s.next_chunk)[0] - s.config.left_context)
        s._release(nxt, repeats * nxt, max(0, s.frames_emitted - s.config.vocoder_left))
    return [torch.cat(parts) if parts else torch.zeros(0) for parts in out]


@torch.no_grad()
def decode_windows(
    t2w: Token2Wav,
    streams: Sequence[StreamState],
    max_windows: int = 1,
    runner: WindowRunner | None = None,
) -> list[torch.Tensor]:
    """Decode the next ready window(s) of every stream in ONE batched DiT solve and ONE batched
    BigVGAN call; return, per stream, the waveform samples that became final (float32, CPU; empty
    when the stream had nothing ready). `max_windows` bounds the chunks taken from one stream per
    call (a stream that fell behind catches up that many chunks at a time); a finished stream's held
    tail rides along with its last chunk. Streams must share sampling settings. `runner`: how
    the tensor work runs (captured per bucket, or eagerly: the default)."""
    if not streams:
        return []
    call = plan_windows(t2w, streams, max_windows)
    result = (runner or WindowRunner(t2w, enforce_eager=True)).run(call)
    return apply_windows(t2w, call, result)


def stream_decode(
    t2w: Token2Wav,
    codes: Sequence[int] | torch.Tensor,
    voice: str,
    noise: NoiseSource = None,
    config: StreamConfig | None = None,
) -> torch.Tensor:
    """The streamed waveform of a complete code sequence, one window per call (the reference the
    incremental, batched path must reproduce)."""
    s = StreamState(voice, noise, config, t2w.repeats)
    s.append(codes, finished=True)
    parts = []
    while not s.done:
        parts.append(decode_windows(t2w, [s])[0])
    return torch.cat(parts) if parts else torch.zeros(0)


@dataclass
class StreamOutput:
    audio: torch.Tensor  # new samples, float32 24 kHz, possibly empty
    done: bool  # the stream's last samples (its state is freed)


@dataclass
class StreamingToken2Wav:
    """Per-request stream states keyed by request id, decoded together by :meth:`step`.

    A call can also be split in two for a decode thread: :meth:`begin` plans it (bookkeeping, on
    the caller's thread), `runner.run(call)` does its tensor work (anywhere), :meth:`finish`
    applies the result. Streams of a call in flight are `in_flight` until it finishes; at most
    one call may be in flight (the next call's vocoder context is this call's mel)."""

    t2w: Token2Wav
    config: StreamConfig = field(default_factory=StreamConfig)
    streams: dict = field(default_factory=dict)
    enforce_eager: bool = False  # no captured window calls (--speech-enforce-eager)
    max_batch: int = DEFAULT_MAX_BATCH  # largest captured window batch
    runner: WindowRunner | None = None  # None: built from the fields above
    in_flight: dict = field(
        default_factory=dict
    )  # request id -> StreamState of the call out

    def __post_init__(self):
        self.config.validate(self.t2w)
        if self.runner is None:
            self.runner = WindowRunner(
                self.t2w,
                self.config,
                enforce_eager=self.enforce_eager,
                max_batch=self.max_batch,
            )

    def open(self, request_id, voice: str, noise: NoiseSource = None) -> StreamState:
        if request_id in self.streams:
            raise ValueError(f"stream {request_id!r} already open")
        self.t2w._voice(voice)  # unknown voice: fail now, not in a later batch
        self.streams[request_id] = state = StreamState(
            voice, noise, self.config, self.t2w.repeats
        )
        return state

    def push(
        self,
        request_id,
        codes: Iterable[int] | torch.Tensor = (),
        finished: bool = False,
    ) -> None:
        self.streams[request_id].append(codes, finished)

    def cancel(self, request_id) -> None:
        """Forget a stream (client gone, request aborted); unknown ids are ignored. A stream of
        the call in flight is forgotten too: its result is dropped when the call finishes."""
        state = self.streams.pop(request_id, None)
        self.in_flight.pop(request_id, None)
        if state is not None:
            state.free()

    def ready(self) -> list:
        return [
            rid
            for rid, s in self.streams.items()
            if s.ready and rid not in self.in_flight
        ]

    def finished_streams(self) -> list:
        """Streams that emitted everything (and are not waiting for the call in flight)."""
        return [
            rid
            for rid, s in self.streams.items()
            if s.done and rid not in self.in_flight
        ]

    def step(
        self,
        max_windows: int = 1,
        max_streams: int | None = None,
        request_ids: Sequence | None = None,
    ) -> dict:
        """One batched decode of every ready stream (oldest first, at most `max_streams`), or of the
        given ready `request_ids`; returns {request_id: StreamOutput}. Finished streams that emitted
        their last samples are closed."""
        call = self.begin(max_windows, max_streams, request_ids)
        with torch.no_grad():
            result = self.runner.run(call)
        return self.finish(call, result)

    def begin(
        self,
        max_windows: int = 1,
        max_streams: int | None = None,
        request_ids: Sequence | None = None,
    ) -> WindowCall:
        """Plan the next call (as :meth:`step` chooses its streams); its streams are in flight."""
        if self.in_flight:
            raise RuntimeError("a window call is already in flight")
        ids = self.ready()[:max_streams] if request_ids is None else list(request_ids)
        states = [self.streams[r] for r in ids]
        call = plan_windows(self.t2w, states, max_windows)
        call.request_ids = ids
        self.in_flight = dict(zip(ids, states))
        return call

    def finish(self, call: WindowCall, result: WindowResult) -> dict:
        """Apply a planned call's result; returns {request_id: StreamOutput} of its streams still
        open (and of empty streams that finished with no codes); done streams are closed."""
        alive = [
            self.in_flight.get(rid) is s
            for rid, s in zip(call.request_ids, call.streams)
        ]
        self.in_flight = {}
        wavs = apply_windows(self.t2w, call, result)
        out = {}
        for rid, wav, live in zip(call.request_ids, wavs, alive):
            if not live:  # cancelled while in flight
                continue
            done = self.streams[rid].done
            out[rid] = StreamOutput(wav, done)
            if done:
                self.cancel(rid)
        for rid in self.finished_streams():  # empty streams finished with no codes
            out[rid] = StreamOutput(torch.zeros(0), True)
            self.cancel(rid)
        return out
