"""The batched Talker against transformers' Qwen2.5-Omni, on a tiny random-weight checkpoint.

The reference is the full model's `generate` (thinker greedy, talker greedy or sampled); we capture
the transformers thinker's outputs (input embeddings and last hidden states) and feed them to our
Talker the way a scheduler would: prompt first, then generated tokens one by one.

The reference is transformers with two of its 5.19 bugs corrected (omni_vllm.testing.reference).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from omni_vllm.talker import Talker, TalkerSampling  # noqa: E402
from omni_vllm.testing.reference import corrected_reference  # noqa: E402

THINKER_TOKENS = 6
TALKER_CODES = 20
STOP_CODES = (8292, 8294)


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint_dir):
    return tiny_checkpoint_dir


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(
        tiny_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def talker(tiny_dir):
    return Talker.from_pretrained(tiny_dir, max_slots=4, max_len=256)


def _tone(seconds: float, hz: float = 440.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _inputs(processor, kind: str):
    """Processor inputs (chat template) for each modality; media made in code."""
    from PIL import Image

    rng = np.random.RandomState(0)
    video_kwargs = dict(
        videos_kwargs=dict(size={"shortest_edge": 3136, "longest_edge": 6272})
    )
    parts, media = [], {}
    if kind == "text":
        parts = [{"type": "text", "text": "Hello, how are you today?"}]
    elif kind == "audio":
        parts = [{"type": "audio"}, {"type": "text", "text": "What is this sound?"}]
        media = dict(audio=[_tone(0.6)])
    elif kind == "image":
        img = Image.fromarray((rng.rand(56, 84, 3) * 255).astype(np.uint8))
        parts = [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]
        media = dict(images=[img])
    elif kind == "video":
        frames = (rng.rand(8, 56, 56, 3) * 255).astype(np.uint8)  # (T, H, W, 3)
        parts = [{"type": "video"}, {"type": "text", "text": "Describe this video."}]
        media = dict(videos=[frames], **video_kwargs)
    elif (
        kind == "video_audio"
    ):  # audio track interleaved with the video in 2-second chunks
        frames = (rng.rand(8, 56, 56, 3) * 255).astype(np.uint8)
        parts = [{"type": "video"}, {"type": "text", "text": "Describe this video."}]
        media = dict(
            videos=[frames],
            audio=[_tone(3.0, 300.0)],
            use_audio_in_video=True,
            **video_kwargs,
        )
    text = processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
    )
    return processor(text=text, return_tensors="pt", padding=True, **media)


class _SkipToken2Wav(Exception):
    pass


@dataclass
class Reference:
    """What transformers did for one prompt, and what our Talker needs to replay it."""

    request: dict  # Talker.add_request kwargs (without sampling)
    reply: list  # [(embedding, hidden)] of generated thinker tokens, as fed back to the thinker
    codes: list  # transformers' talker codes, up to the first stop code
    talker_kwargs: dict = field(
        repr=False, default_factory=dict
    )  # transformers talker.generate inputs


def run_reference(
    model, inputs, *, voice, use_audio_in_video=False, sample_seed=None
) -> Reference:
    with corrected_reference(model):
        return _run_reference(
            model,
            inputs,
            voice=voice,
            use_audio_in_video=use_audio_in_video,
            sample_seed=sample_seed,
        )


def _run_reference(
    model, inputs, *, voice, use_audio_in_video, sample_seed
) -> Reference:
    captured = {}
    thinker_generate, talker_generate = model.thinker.generate, model.talker.generate

    def thinker_hook(*args, **kwargs):
        captured["thinker"] = thinker_generate(*args, **kwargs)
        return captured["thinker"]

    def talker_hook(*args, **kwargs):
        captured["talker_kwargs"] = {
            k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()
        }
        out = talker_generate(*args, **kwargs)
        captured["codes"] = out[0, kwargs["input_ids"].shape[1] :].tolist()
        raise _SkipToken2Wav  # the waveform is not what we test here

    if sample_seed is not None:
        torch.manual_seed(sample_seed)  # transformers samples from the global generator
    with (
        mock.patch.object(model.thinker, "generate", thinker_hook),
        mock.patch.object(model.talker, "generate", talker_hook),
        pytest.raises(_SkipToken2Wav),
    ):
        model.generate(
            **inputs,
            speaker=voice,
            use_audio_in_video=use_audio_in_video,
            thinker_max_new_tokens=THINKER_TOKENS,
            talker_max_new_tokens=TALKER_CODES,
            thinker_do_sample=False,
            talker_do_sample=sample_seed is not None,
        )
    hs = captured[
        "thinker"
    ].hidden_states  # step 0: prompt; step i: generated token i-1 fed back
    codes = captured["codes"]
    stops = [i for i, c in enumerate(codes) if c in STOP_CODES]
    request = dict(
        prompt_ids=inputs["input_ids"][0],
        prompt_embeds=hs[0][0][0],
        prompt_hidden=hs[0][-1][0],
        voice=voice,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        video_second_per_grid=inputs.get("video_second_per_grid"),
        audio_feature_lengths=(
            inputs["feature_attention_mask"].sum(-1)
            if "feature_attention_mask" in inputs
            else None
        ),
        use_audio_in_video=use_audio_in_video,
        max_codes=TALKER_CODES,
    )
    reply = [(hs[i][0][0, -1], hs[i][-1][0, -1]) for i in range(1, len(hs))]
    return Reference(
        request, reply, codes[: stops[0]] if stops else codes, captured["talker_kwargs"]
    )


KINDS = ["text", "audio", "image", "video", "video_audio"]
VOICE = {
    "text": "Ethan",
    "audio": "Chelsie",
    "image": "Ethan",
    "video": "Chelsie",
    "video_audio": "Ethan",
}


@pytest.fixture(scope="module")
def references(hf_model, processor):
    return {
        kind: run_reference(
            hf_model,
            _inputs(processor, kind),
            voice=VOICE[kind],
            use_audio_in_video=kind == "video_audio",
        )
        for kind in KINDS
    }


@dataclass
class Job:
    rid: str
    ref: Reference
    sampling: TalkerSampling = TalkerSampling(do_sample=False)
    join: int = 0  # tick at which the request arrives
    every: int = 0  # thinker tokens arrive one per `every` ticks (0: all at once)
    max_codes: int | None = None
    abort_at: int | None = None  # tick at which the client goes away


def drive(talker: Talker, jobs: list[Job], forced: dict | None = None):
    """A minimal scheduler: requests join when due and a slot is free, thinker tokens stream in,
    and every tick the talker steps whatever is ready. Returns {rid: (codes, logits, reason)}."""
    pending = sorted(jobs, key=lambda j: j.join)
    active: dict[str, tuple[Job, int]] = {}  # rid -> (job, tick joined)
    fed: dict[str, int] = {}
    result = {j.rid: ([], [], None) for j in jobs}
    for tick in range(10_000):
        if not pending and not active:
            return result
        for job in list(pending):
            if job.join <= tick and talker.num_free_slots:
                kwargs = dict(job.ref.request, sampling=job.sampling)
                if job.max_codes is not None:
                    kwargs["max_codes"] = job.max_codes
                talker.add_request(job.rid, **kwargs)
                pending.remove(job)
                active[job.rid], fed[job.rid] = (job, tick), 0
        for rid, (job, joined) in list(active.items()):
            if job.abort_at is not None and tick >= job.abort_at:
                talker.remove(rid)
                del active[rid]
                result[rid] = (*result[rid][:2], "aborted")
                continue
            due = (
                len(job.ref.reply)
                if job.every == 0
                else (tick - joined) // job.every + 1
            )
            while fed[rid] < min(due, len(job.ref.reply)):
                talker.add_thinker_token(rid, *job.ref.reply[fed[rid]])
                fed[rid] += 1
                if fed[rid] == len(job.ref.reply):
                    talker.finish_thinker(rid)
        ready = talker.ready()
        if not ready:
            continue
        force = None
        if forced is not None:
            force = {
                rid: forced[rid][len(result[rid][1])] for rid in ready if rid in forced
            }
        for rid, out in talker.step(
            ready, forced_codes=force, return_logits=True
        ).items():
            codes, logits, _ = result[rid]
            if out.code is not None:
                codes.append(out.code)
            logits.append(out.logits)
            if out.finished:
                result[rid] = (codes, logits, out.reason)
                del active[rid]
    raise AssertionError("drive did not finish")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_codes_match_transformers(talker, references, kind):
    ref = references[kind]
    assert len(ref.reply) == THINKER_TOKENS - 1 and len(ref.codes) > 0
    # Thinker tokens arriving one every other tick: the talker has to wait for them.
    codes, _, reason = drive(talker, [Job(kind, ref, every=2)])[kind]
    assert codes == ref.codes
    assert reason == ("length" if len(ref.codes) == TALKER_CODES else "stop")
    assert kind not in talker and talker.num_free_slots == talker.max_slots


class _ForceCodes:
    """Logits processor for transformers' generate: teacher-force a given code sequence."""

    def __init__(self, codes, prompt_len):
        self.codes, self.prompt_len = codes, prompt_len

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.codes[input_ids.shape[1] - self.prompt_len]] = 0.0
        return forced


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_logits_match_transformers(hf_model, talker, references, kind):
    from transformers import LogitsProcessorList

    ref = references[kind]
    steps = 12
    codes = torch.randint(
        0, 8192, (steps,), generator=torch.Generator().manual_seed(7)
    ).tolist()
    kwargs = {
        k: v.clone() if torch.is_tensor(v) else v for k, v in ref.talker_kwargs.items()
    }
    kwargs.update(
        max_new_tokens=steps, output_logits=True, return_dict_in_generate=True
    )
    prompt_len = kwargs["input_ids"].shape[1]
    with corrected_reference(hf_model):
        force = LogitsProcessorList([_ForceCodes(codes, prompt_len)])
        out = hf_model.talker.generate(**kwargs, logits_processor=force)
    assert out.sequences[0, prompt_len:].tolist() == codes
    expected = torch.cat(out.logits)  # raw logits per step, (steps, vocab)

    got_codes, logits, _ = drive(
        talker, [Job(kind, ref, every=1, max_codes=steps)], forced={kind: codes}
    )[kind]
    assert got_codes == codes
    diff = (torch.stack(logits) - expected).abs().max().item()
    print(f"{kind}: teacher-forced talker logits max abs diff {diff:.2e}")
    assert diff < 1e-4


@pytest.fixture(scope="module")
def hf_model_bf16(tiny_dir):
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(
        tiny_dir, dtype=torch.bfloat16
    ).eval()


@pytest.fixture(scope="module")
def talker_bf16(tiny_dir):
    return Talker.from_pretrained(
        tiny_dir, max_slots=4, max_len=256, dtype=torch.bfloat16
    )


# bf16 against transformers' talker in bf16 (same inputs, teacher-forced codes): the two run the same
# bf16 arithmetic in a different order (packed batch, SDPA with GQA instead of repeated KV heads), so
# their logits differ by bf16 rounding: at most BF16_LOGITS_ATOL (the logits here are O(1)) and the
# greedy code (argmax, codec_bos suppressed) the same at no fewer than BF16_GREEDY_AGREEMENT of steps.
BF16_LOGITS_ATOL = 5e-2
BF16_GREEDY_AGREEMENT = 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_teacher_forced_greedy_codes_match_transformers_bf16(
    hf_model_bf16, talker_bf16, talker, references, kind
):
    from transformers import LogitsProcessorList

    ref = references[kind]
    steps = 16
    codes = torch.randint(
        0, 8192, (steps,), generator=torch.Generator().manual_seed(7)
    ).tolist()
    kwargs = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v.clone())
        if torch.is_tensor(v)
        else v
        for k, v in ref.talker_kwargs.items()
    }
    kwargs.update(
        max_new_tokens=steps, output_logits=True, return_dict_in_generate=True
    )
    prompt_len = kwargs["input_ids"].shape[1]
    with corrected_reference(hf_model_bf16):
        force = LogitsProcessorList([_ForceCodes(codes, prompt_len)])
        out = hf_model_bf16.talker.generate(**kwargs, logits_processor=force)
    expected = torch.cat(out.logits).float()

    job = Job(kind, ref, every=1, max_codes=steps)
    got_codes, logits, _ = drive(talker_bf16, [job], forced={kind: codes})[kind]
    assert got_codes == codes
    got = torch.stack(logits)
    assert (
        talker_bf16.model.codec_head.weight.dtype
        == talker_bf16.kv.dtype
        == torch.bfloat16
    )

    def greedy(x):
        return (
            x.clone()
            .index_fill_(-1, torch.tensor([talker_bf16.codec_bos]), -math.inf)
            .argmax(-1)
        )

    diff = (got - expected).abs().max().item()
    agree = (greedy(got) == greedy(expected)).float().mean().item()
    fp32 = torch.stack(drive(talker, [job], forced={kind: codes})[kind][1])
    agree_fp32 = (greedy(got) == greedy(fp32)).float().mean().item()
    print(
        f"{kind}: bf16 vs transformers bf16: logits max abs diff {diff:.2e} (scale {expected.abs().max():.2f}), "
        f"greedy codes agree {agree:.0%}; bf16 vs fp32: max abs diff {(got - fp32).abs().max():.2e}, "
        f"greedy agree {agree_fp32:.0%}"
    )
    assert diff < BF16_LOGITS_ATOL
    assert agree >= BF16_GREEDY_AGREEMENT


def test_sampling_draws_from_transformers_processors(hf_model, processor, talker):
    """Sampling applies transformers' processors (repetition penalty, codec_bos suppressed,
    temperature, top-k, top-p) row by row with each row's own settings, in one batched call: the
    probabilities equal theirs. The draw is counter-based (omni_vllm.talker_sampler: a hash of
    seed, step and code, as vLLM's V2 sampler), so a seed gives other codes than transformers'
    global generator; its frequencies follow those probabilities, and seeds differ."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    sampler, vocab = talker.sampler, talker.sampler.vocab_size
    g = torch.Generator().manual_seed(0)
    settings = [
        TalkerSampling(seed=1),
        TalkerSampling(seed=2, top_k=5, top_p=1.0, temperature=1.3),
        TalkerSampling(seed=3, top_k=0, top_p=0.5, repetition_penalty=1.5),
        TalkerSampling(seed=4, top_k=300, top_p=0.95, temperature=0.6),
    ]
    seen = [torch.randint(0, vocab, (20,), generator=g) for _ in settings]
    for slot, (sampling, ids) in enumerate(zip(settings, seen)):
        sampler.open(slot, sampling, ids.tolist())
    logits = 3 * torch.randn(len(settings), vocab, generator=g)
    slots = torch.arange(len(settings))
    ours = sampler.distribution(slots, logits)
    for i, (s, ids) in enumerate(zip(settings, seen)):
        scores = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(
            ids[None], logits[i : i + 1].clone()
        )
        scores = SuppressTokensLogitsProcessor([talker.codec_bos])(ids[None], scores)
        scores = TemperatureLogitsWarper(s.temperature)(ids[None], scores)
        if s.top_k:
            scores = TopKLogitsWarper(s.top_k)(ids[None], scores)
        if s.top_p < 1.0:
            scores = TopPLogitsWarper(s.top_p)(ids[None], scores)
        expected = scores.softmax(-1)[0]
        assert torch.equal(ours[i] > 0, expected > 0), i
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=1e-5)

    # The draw's frequencies over many steps of one row follow its probabilities.
    from omni_vllm.talker_sampler import hashed_exponential

    draws = 20_000
    probs = ours[0]
    noise = hashed_exponential(
        torch.full((draws,), 1234), torch.arange(draws), sampler.vocab
    )
    codes = (probs[None] / noise).argmax(-1)
    freq = torch.bincount(codes, minlength=vocab) / draws
    assert (freq - probs).abs().max() < 0.02
    assert set(codes.tolist()) <= set(probs.nonzero()[:, 0].tolist())

    # Through the Talker: a seed's codes are its own, another seed's differ.
    ref = run_reference(hf_model, _inputs(processor, "text"), voice="Chelsie")
    one, _, _ = drive(talker, [Job("s", ref, sampling=TalkerSampling(seed=1234))])["s"]
    again, _, _ = drive(
        talker, [Job("s", ref, sampling=TalkerSampling(seed=1234), every=1)]
    )["s"]
    other, _, _ = drive(talker, [Job("s", ref, sampling=TalkerSampling(seed=99))])["s"]
    assert one == again and other != one


def test_mixed_batch_equals_each_alone(talker, references):
    """Five requests (all modalities, greedy and seeded sampling, two voices) join at different
    ticks with thinker tokens streaming at different rates, through 4 slots (so one waits and reuses
    a freed slot); one client aborts mid-way. Each request's codes are those it gets alone."""
    jobs = [
        Job("text", references["text"], TalkerSampling(seed=11), join=0, every=1),
        Job(
            "audio",
            references["audio"],
            TalkerSampling(do_sample=False),
            join=1,
            every=3,
        ),
        Job(
            "image",
            references["image"],
            TalkerSampling(seed=12, top_k=10, temperature=1.3),
            join=1,
            every=0,
            max_codes=8,
        ),
        Job(
            "video",
            references["video"],
            TalkerSampling(seed=13, repetition_penalty=1.3),
            join=4,
            every=2,
        ),
        Job(
            "video_audio",
            references["video_audio"],
            TalkerSampling(do_sample=False),
            join=2,
            every=1,
        ),
        Job(
            "gone",
            references["audio"],
            TalkerSampling(seed=14),
            join=3,
            every=1,
            abort_at=7,
        ),
    ]
    t0 = time.perf_counter()
    batched = drive(talker, jobs)
    t_batch = time.perf_counter() - t0
    assert talker.num_free_slots == talker.max_slots
    assert batched["gone"][2] == "aborted"
    for job in jobs[:-1]:
        alone = drive(
            talker, [Job(job.rid, job.ref, job.sampling, max_codes=job.max_codes)]
        )[job.rid]
        assert batched[job.rid][0] == alone[0], job.rid
        assert batched[job.rid][2] == alone[2]
        diff = (
            (torch.stack(batched[job.rid][1]) - torch.stack(alone[1]))
            .abs()
            .max()
            .item()
        )
        print(f"{job.rid}: batched vs alone logits max abs diff {diff:.2e}")
        assert diff < 1e-4
    assert len(batched["image"][0]) == 8 and batched["image"][2] == "length"
    assert (
        batched["audio"][0] == references["audio"].codes
    )  # greedy in a batch still matches transformers
    again = drive(talker, jobs)
    assert all(
        again[r][0] == batched[r][0] for r in batched
    )  # seeded sampling is reproducible
    print(f"mixed batch drive: {t_batch:.2f}s")


def test_waiting_unknown_voice_and_edge_cases(talker, references):
    ref = references["text"]
    with pytest.raises(ValueError, match="unknown voice 'Nobody'.*Chelsie.*Ethan"):
        talker.add_request("x", **dict(ref.request, voice="Nobody"))
    assert "x" not in talker

    talker.add_request("w", **ref.request)
    assert talker.ready() == []  # no reply element yet: it waits
    with pytest.raises(ValueError, match="not ready"):
        talker.step(["w"])
    talker.add_thinker_token("w", *ref.reply[0])
    assert (
        talker.step() and talker.ready() == []
    )  # prefill consumed reply[0]; step 1 waits
    talker.finish_thinker("w")  # the track goes on with tts_text_end, tts_text_pad, ...
    n = 1
    while "w" in talker:
        out = talker.step()["w"]
        n += 1
    assert out.finished and out.reason == "length" and n == TALKER_CODES

    # A thinker that stops at once still gives a talker run (tts_text_end, then pads).
    talker.add_request("z", **dict(ref.request, max_codes=3))
    talker.finish_thinker("z")
    outs = [talker.step()["z"] for _ in range(3)]
    assert outs[-1].finished and "z" not in talker


def test_loads_sharded_checkpoint(tmp_path, tiny_dir, talker):
    """`model.safetensors.index.json` checkpoints (as the real Qwen2.5-Omni ships) load the same."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_dir / "model.safetensors")
    shards = {
        "model-00001-of-00002.safetensors": {},
        "model-00002-of-00002.safetensors": {},
    }
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        shards[sorted(shards)[i % 2]][name] = tensor
    weight_map = {}
    for fname, part in shards.items():
        save_file(part, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    for fname in ("config.json", "spk_dict.pt"):
        shutil.copy(tiny_dir / fname, tmp_path / fname)
    sharded = Talker.from_pretrained(tmp_path, max_slots=1, max_len=64)
    ours = talker.model.state_dict()
    assert all(torch.equal(t, ours[k]) for k, t in sharded.model.state_dict().items())
    assert all(
        torch.equal(r, talker.text_rows[t]) for t, r in sharded.text_rows.items()
    )
    assert sorted(sharded.voices) == ["Chelsie", "Ethan"]
