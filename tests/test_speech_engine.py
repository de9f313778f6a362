"""SpeechEngine on the tiny checkpoint with a real vLLM AsyncLLM.

AsyncLLM always runs its EngineCore in a separate (spawned) process; VLLM_ENABLE_V1_MULTIPROCESSING
only affects the synchronous LLM class. One engine serves the whole module on one event loop (its
output task belongs to the loop that first used it); each test makes its own SpeechEngine (the
hidden-states sink is process-global) and shuts it down.

* Concurrent = alone: 16 requests at once (text, audio and image inputs, both voices, greedy thinker
  and talker, per-request noise seeds) give the token ids and talker codes of the one-at-a-time path
  (the thinker's rows collected from AsyncLLM, each request then fed alone to a separate Talker as
  the offline path does), and their audio pieces concatenate to `stream_decode` of those codes. Each
  request's first audio arrives while its thinker is still running (event order, not durations).
* Cancellation: of 32 requests, half are closed / cancelled / aborted mid-stream; afterwards talker
  slots, stream states, queued windows and AsyncLLM's unfinished requests are all back at zero.
* Back-pressure (refusals with their code and retry estimate), waiting: more requests than slots all
  served in arrival order, a waiter that goes away leaves the queue; unknown voice, a checkpoint
  without speech.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import torch

from omni_vllm.hidden_states import (
    HiddenStatesCollector,
    request_hidden_states,
    set_hidden_states_sink,
)
from omni_vllm.speech import (
    SpeechBusy,
    SpeechChunk,
    SpeechEngine,
    SpeechUnavailable,
    UnknownVoice,
)
from omni_vllm.streaming import StreamConfig, stream_decode
from omni_vllm.talker import Talker, TalkerSampling
from omni_vllm.testing import media
from omni_vllm.token2wav import Token2Wav

torch.set_num_threads(1)

MAX_TOKENS = (
    512  # thinker tokens per request (ignore_eos): the text outlasts the speech's start
)
# The 16-at-once test: long enough that every request's first window (decoded alone, one after another)
# comes before its text ends even when the suite has left the machine busy.
LONG_TOKENS = 1024
MAX_CODES = 48  # talker codes per request (random weights never stop on their own)
# A short first chunk so that audio starts early (after 24 codes); small vocoder contexts and 4 ODE
# points keep the tiny Token2Wav (BigVGAN above all) cheap on two cores.
STREAM = StreamConfig(
    first_chunk=12,
    chunk=24,
    left_context=12,
    look_ahead=12,
    vocoder_left=8,
    vocoder_right=8,
    num_steps=4,
)
GREEDY = TalkerSampling(do_sample=False)
ATOL = 1e-5

TEXTS = [
    "Hello, how are you today?",
    "Please describe this picture.",
    "What is the weather like?",
    "Tell me about the quick brown fox.",
    "Numbers: 0 1 2 3 4 5.",
    "Qwen Omni thinks in text and speaks.",
]


def engine_args(model) -> dict:
    return dict(
        model=str(model),
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=2**28,
        enforce_eager=True,
        enable_prefix_caching=False,
        limit_mm_per_prompt={"audio": 1, "image": 1, "video": 0},
        distributed_executor_backend="uni",
        disable_log_stats=True,
        seed=0,
    )


def start_engine(model):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(model)))


@dataclasses.dataclass
class Case:
    rid: str
    prompt: dict
    voice: str
    seed: int
    audio: bool = True


def make_cases(processor, n: int, prefix: str) -> list[Case]:
    """Text, audio (tones of several lengths) and image inputs, both voices."""
    cases = []
    for i in range(n):
        kind = ("text", "audio", "text", "image")[i % 4]
        content = [{"type": "text", "text": TEXTS[i % len(TEXTS)]}]
        mm = {}
        if kind == "audio":
            content.insert(0, {"type": "audio"})
            mm = {
                "audio": [
                    (
                        media.tone(0.6 + 0.2 * (i % 5), freq=220.0 + 40 * i),
                        media.AUDIO_SR,
                    )
                ]
            }
        elif kind == "image":
            content.insert(0, {"type": "image"})
            mm = {"image": [media.image(seed=i)]}
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt = {"prompt": text, **({"multi_modal_data": mm} if mm else {})}
        cases.append(
            Case(f"{prefix}{i}", prompt, ("Chelsie", "Ethan")[i % 2], 1000 + i)
        )
    return cases


def params(max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_dir, loop):
    async def make():
        return start_engine(tiny_checkpoint_dir)

    engine = loop.run_until_complete(make())
    yield engine
    engine.shutdown()
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


@pytest.fixture(scope="module")
def processor(tiny_checkpoint_dir):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def t2w(tiny_checkpoint_dir):
    return Token2Wav.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture
def speech_factory(engine, tiny_checkpoint_dir, loop):
    made = []

    def make(**kwargs) -> SpeechEngine:
        kwargs = {
            "device": "cpu",
            "stream_config": STREAM,
            "max_codes": MAX_CODES,
            "talker_max_len": 512,
            **kwargs,
        }
        made.append(SpeechEngine(engine, tiny_checkpoint_dir, **kwargs))
        return made[-1]

    yield make
    for s in made:
        loop.run_until_complete(s.shutdown())


@dataclasses.dataclass
class Outcome:
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    codes: list[int] = dataclasses.field(default_factory=list)
    audio: list[np.ndarray] = dataclasses.field(default_factory=list)
    final: SpeechChunk | None = None
    tokens_at_first_audio: int | None = (
        None  # thinker tokens received up to the first audio chunk
    )
    chunks: int = 0


async def consume(gen, out: Outcome, stop_after=None) -> Outcome:
    async for ch in gen:
        out.chunks += 1
        out.tokens += ch.token_ids
        out.text += ch.text
        out.codes += ch.audio_codes
        if ch.audio is not None:
            assert ch.audio.dtype == np.float32 and ch.audio.ndim == 1
            out.audio.append(ch.audio)
            if out.tokens_at_first_audio is None:
                out.tokens_at_first_audio = len(out.tokens)
        if ch.finished:
            out.final = ch
        if stop_after is not None and stop_after(out):
            break
    return out


def run_speech(speech, case: Case, max_tokens=MAX_TOKENS, **kw):
    return speech.generate(
        case.prompt,
        params(max_tokens),
        case.rid,
        audio=case.audio,
        voice=case.voice,
        talker_sampling=GREEDY,
        noise=case.seed,
        **kw,
    )


def assert_idle(speech, engine, loop):
    """Everything the speech path and the thinker hold is released."""
    loop.run_until_complete(speech.sync())  # the worker has applied every cancellation
    s = speech.stats()
    assert s["active_speaking"] == 0 and s["waiting"] == 0, s
    assert (
        s["talker_slots_used"] == 0
        and s["stream_states"] == 0
        and s["worker_requests"] == 0
    ), s
    assert s["queued_windows"] == 0, s
    assert s["thinker_unfinished"] == 0 and engine.get_num_unfinished_requests() == 0, s
    # The worker's own structures (it is idle now).
    w = speech._worker
    assert not w.talker.requests and w.talker.num_free_slots == w.talker.max_slots
    assert (
        not w.streamer.streams and not w.speakers and not w.ready_since and not w.inbox
    )
    assert not speech._jobs


# ------------------------------------------------------------------------------------------------


def reference(engine, loop, cases, talker, t2w, max_tokens=MAX_TOKENS):
    """The one-at-a-time speech path: the thinker's rows (collected from AsyncLLM), then each
    request alone through a separate Talker (fed as omni_vllm.offline does) and `stream_decode`."""
    collector = HiddenStatesCollector()
    previous = set_hidden_states_sink(collector)

    async def thinker(case):
        async for out in engine.generate(
            case.prompt, request_hidden_states(params(max_tokens)), case.rid + "-ref"
        ):
            pass
        return out

    async def all_thinkers():
        return await asyncio.gather(*(thinker(c) for c in cases))

    try:
        outs = dict(
            zip(
                [c.rid for c in cases],
                loop.run_until_complete(all_thinkers()),
                strict=True,
            )
        )
    finally:
        set_hidden_states_sink(previous)

    refs = {}
    for case in cases:
        out = outs[case.rid]
        ids = list(out.outputs[0].token_ids)
        if not case.audio:
            refs[case.rid] = (ids, None, None)
            continue
        rows = collector.rows(case.rid + "-ref")
        n = len(out.prompt_token_ids)
        talker.add_request(
            case.rid,
            prompt_ids=torch.tensor(out.prompt_token_ids),
            prompt_embeds=rows[:n, 0],
            prompt_hidden=rows[:n, 1],
            prompt_positions=collector.prompt_positions(case.rid + "-ref"),
            voice=case.voice,
            sampling=GREEDY,
            max_codes=MAX_CODES,
        )
        for row in rows[n:]:
            talker.add_thinker_token(case.rid, row[0], row[1])
        talker.finish_thinker(case.rid)
        codes = []
        while case.rid in talker:
            step = talker.step([case.rid])[case.rid]
            if step.code is not None:
                codes.append(step.code)
        refs[case.rid] = (
            ids,
            codes,
            stream_decode(t2w, codes, case.voice, case.seed, STREAM).numpy(),
        )
    return refs


def test_concurrent_requests_equal_one_at_a_time(
    engine, loop, processor, t2w, speech_factory, tiny_checkpoint_dir
):
    cases = make_cases(processor, 16, "c")
    cases += [
        dataclasses.replace(c, rid=f"t{i}", audio=False)
        for i, c in enumerate(cases[:2])
    ]  # text out only
    talker = Talker.from_pretrained(tiny_checkpoint_dir, max_slots=1, max_len=512)
    refs = reference(engine, loop, cases, talker, t2w, LONG_TOKENS)

    speech = speech_factory()
    assert speech.has_speech and sorted(speech.voices) == ["Chelsie", "Ethan"]

    async def all_at_once():
        return await asyncio.gather(
            *(consume(run_speech(speech, c, LONG_TOKENS), Outcome()) for c in cases)
        )

    results = dict(
        zip([c.rid for c in cases], loop.run_until_complete(all_at_once()), strict=True)
    )
    for case in cases:
        got, (ids, codes, wav) = results[case.rid], refs[case.rid]
        assert got.tokens == ids and len(ids) == LONG_TOKENS, case.rid
        assert (
            got.final is not None
            and got.final.finished
            and got.final.finish_reason == "length"
        )
        assert (
            got.final.completion_tokens == LONG_TOKENS and got.final.prompt_tokens > 10
        )
        if not case.audio:
            assert got.audio == [] and got.codes == [] and got.final.audio_tokens == 0
            continue
        assert (
            got.codes == codes and len(codes) == MAX_CODES == got.final.audio_tokens
        ), case.rid
        audio = np.concatenate(got.audio)
        assert audio.shape == wav.shape == (MAX_CODES * 2 * t2w.hop,)
        np.testing.assert_allclose(audio, wav, atol=ATOL, rtol=0, err_msg=case.rid)
        # Streamed: the first audio reached the consumer before the thinker's last token did.
        assert (
            got.tokens_at_first_audio is not None
            and got.tokens_at_first_audio < LONG_TOKENS
        ), case.rid
        assert len(got.audio) >= 2  # and in pieces
    stats = speech.stats()
    assert (
        stats["audio_requests"] == 16
        and stats["text_requests"] == 2
        and len(stats["ttfa_samples"]) == 16
    )
    assert stats["audio_seconds_total"] == pytest.approx(16 * MAX_CODES / 50)
    print(
        {c.rid: results[c.rid].tokens_at_first_audio for c in cases if c.audio}, stats
    )
    assert_idle(speech, engine, loop)


def test_cancellation_frees_everything(engine, loop, processor, speech_factory):
    speech = speech_factory(max_speaking=32)
    cases = make_cases(processor, 32, "x")

    async def scenario():
        async def close_early(case, when):
            gen = run_speech(speech, case, 64)
            out = await consume(gen, Outcome(), stop_after=when)
            await gen.aclose()  # the consumer goes away mid-stream
            return out

        async def cancel_task(case):
            task = asyncio.ensure_future(
                consume(run_speech(speech, case, 64), Outcome())
            )
            while speech.stats()["audio_samples_total"] == 0 and not task.done():
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return None

        async def abort_api(case):
            out = Outcome()
            gen = run_speech(speech, case, 64)
            async for ch in gen:
                out.chunks += 1
                if out.chunks == 2:
                    await speech.abort(case.rid)
                if ch.finished:
                    out.final = ch
            return out

        first_text = lambda o: len(o.tokens) > 0  # noqa: E731
        first_audio = lambda o: o.audio != []  # noqa: E731
        jobs = []
        for i, case in enumerate(cases):
            if i % 2 == 0:
                jobs.append(consume(run_speech(speech, case, 64), Outcome()))
            elif i % 8 == 1:
                jobs.append(close_early(case, first_text))
            elif i % 8 == 3:
                jobs.append(close_early(case, first_audio))
            elif i % 8 == 5:
                jobs.append(cancel_task(case))
            else:
                jobs.append(abort_api(case))
        return await asyncio.gather(*jobs)

    results = loop.run_until_complete(scenario())
    for i, (case, out) in enumerate(zip(cases, results, strict=True)):
        if i % 2 == 0:  # untouched requests complete normally beside the cancelled ones
            assert (
                out.final.finished
                and out.final.audio_tokens == MAX_CODES
                and len(out.tokens) == 64
            )
        elif i % 8 == 7:
            assert out.final.finished and out.final.finish_reason == "abort"
        elif out is not None:
            assert out.final is None or out.final.finished
    assert speech.stats()["aborted"] == 4
    assert_idle(speech, engine, loop)


def test_closing_aborts_the_thinker_at_once(engine, loop, processor, speech_factory):
    speech = speech_factory()
    case = make_cases(processor, 1, "a")[0]

    async def scenario():
        gen = speech.generate(
            case.prompt, params(2000), case.rid, audio=True, talker_sampling=GREEDY
        )
        await gen.__anext__()
        assert engine.get_num_unfinished_requests() == 1
        await gen.aclose()
        # Released before aclose returned: no thinker request, no speaking slot.
        assert engine.get_num_unfinished_requests() == 0
        assert speech.stats()["active_speaking"] == 0

    async def stop_at_final():
        # A consumer that stops at the final chunk without closing the generator: the request's
        # slot is already free when that chunk arrives.
        async for ch in speech.generate(
            case.prompt,
            params(8),
            case.rid,
            audio=True,
            talker_sampling=GREEDY,
            max_codes=12,
        ):
            if ch.finished:
                assert speech.stats()["active_speaking"] == 0 and ch.audio_tokens == 12
                break

    loop.run_until_complete(scenario())
    loop.run_until_complete(stop_at_final())
    assert_idle(speech, engine, loop)


def test_back_pressure(engine, loop, processor, speech_factory):
    speech = speech_factory(max_speaking=2, queue_timeout=30.0, max_waiting=1)
    a, b, c, d, e, f = make_cases(processor, 6, "b")
    order = []

    async def tracked(case, max_codes=None):
        out = Outcome()
        async for ch in speech.generate(
            case.prompt,
            params(64),
            case.rid,
            audio=True,
            talker_sampling=GREEDY,
            noise=case.seed,
            max_codes=max_codes,
        ):
            if out.chunks == 0:
                order.append((case.rid, "first"))
            out.chunks += 1
            out.tokens += ch.token_ids
            if ch.finished:
                out.final = ch
                order.append((case.rid, "final"))
        return out

    async def scenario():
        loop_ = asyncio.get_running_loop()
        long_a = loop_.create_task(tracked(a, 120))
        long_b = loop_.create_task(tracked(b, 120))
        while speech.stats()["active_speaking"] < 2:
            await asyncio.sleep(0.005)
        waiting = loop_.create_task(tracked(c))  # waits for a slot
        while speech.stats()["waiting"] < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(
            SpeechBusy
        ) as full:  # the wait queue is full: refused at once
            await tracked(d)
        assert (
            full.value.code == SpeechBusy.QUEUE_FULL and full.value.retry_after >= 1.0
        )
        speech.queue_timeout = 0.01
        speech.max_waiting = 2
        with pytest.raises(SpeechBusy) as late:  # waits briefly, then refused
            await tracked(e)
        assert (
            late.value.code == SpeechBusy.WAIT_TIMEOUT and late.value.retry_after >= 1.0
        )
        speech.queue_timeout = 30.0
        aborted = loop_.create_task(
            consume(run_speech(speech, f), Outcome())
        )  # waits behind c
        while speech.stats()["waiting"] < 2:
            await asyncio.sleep(0.005)
        await speech.abort(
            f.rid
        )  # leaves the queue: a final "abort" chunk, no thinker request
        out = await aborted
        assert (
            out.final.finished
            and out.final.finish_reason == "abort"
            and out.tokens == []
            and out.audio == []
        )
        assert speech.stats()["waiting"] == 1
        # Text keeps flowing while speech is at its limit.
        text = await consume(
            speech.generate(e.prompt, params(8), "text-while-busy"), Outcome()
        )
        assert (
            len(text.tokens) == 8
            and text.final.finished
            and speech.stats()["active_speaking"] == 2
        )
        return await asyncio.gather(long_a, long_b, waiting)

    outs = loop.run_until_complete(scenario())
    assert all(o.final.finished for o in outs)
    assert outs[0].final.audio_tokens == outs[1].final.audio_tokens == 120
    # The waiter was admitted only after a speaking request had finished.
    first_final = min(order.index((a.rid, "final")), order.index((b.rid, "final")))
    assert order.index((c.rid, "first")) > first_final
    s = speech.stats()
    assert s["refused"] == 2 and s["audio_requests"] == 3 and s["aborted"] == 1
    assert_idle(speech, engine, loop)


def test_waiting_requests_are_served_in_arrival_order(
    engine, loop, processor, speech_factory
):
    """Many more audio requests than slots: by default every one waits (no time limit) and all are
    served, admitted in arrival order; a waiter whose caller goes away leaves the queue at once and
    its thinker request is never started."""
    speech = speech_factory(max_speaking=2)
    assert speech.queue_timeout is None
    cases = make_cases(processor, 11, "q")
    queued, arrived = [], {}

    async def one(case):
        arrived[case.rid] = time.monotonic()
        gen = speech.generate(
            case.prompt,
            params(8),
            case.rid,
            audio=True,
            voice=case.voice,
            talker_sampling=GREEDY,
            noise=case.seed,
            max_codes=24,
            on_queued=lambda: queued.append(case.rid),
        )
        return await consume(gen, Outcome())

    async def scenario():
        tasks = [asyncio.get_running_loop().create_task(one(c)) for c in cases]
        await asyncio.sleep(0)  # every task has run up to its admission
        assert queued == [c.rid for c in cases[2:]]
        s = speech.stats()
        assert s["active_speaking"] == 2 and s["waiting"] == 9, s
        tasks[-1].cancel()  # its caller goes away while waiting
        with pytest.raises(asyncio.CancelledError):
            await tasks[-1]
        assert speech.stats()["waiting"] == 8
        return await asyncio.gather(*tasks[:-1])

    outs = loop.run_until_complete(scenario())
    for case, out in zip(cases, outs):
        assert (
            out.final.finished
            and out.final.finish_reason == "length"
            and out.final.audio_tokens == 24
        ), case.rid
        assert len(out.tokens) == 8
    waits = [out.final.queue_seconds for out in outs]
    assert waits[0] < 0.1 and waits[1] < 0.1 and all(w > 0 for w in waits[2:]), waits
    admitted = [arrived[c.rid] + w for c, w in zip(cases, waits)]
    assert all(b >= a - 1e-3 for a, b in zip(admitted, admitted[1:])), admitted  # FIFO
    s = speech.stats()
    assert s["audio_requests"] == 10 and s["refused"] == 0, (
        s
    )  # the cancelled waiter never started
    hold_seconds = speech._admission.hold_seconds
    mean_hold = sum(hold_seconds) / len(hold_seconds)
    assert len(hold_seconds) == 10 and speech.retry_after() == pytest.approx(
        max(1.0, mean_hold / 2)
    )
    print(f"waits {[round(w, 2) for w in waits]}, mean slot hold {mean_hold:.2f} s")
    assert_idle(speech, engine, loop)


def test_unknown_voice_is_refused_before_any_work(
    engine, loop, processor, speech_factory
):
    speech = speech_factory()
    case = make_cases(processor, 1, "v")[0]

    async def scenario():
        with pytest.raises(UnknownVoice):
            await speech.generate(
                case.prompt, params(), case.rid, audio=True, voice="Nobody"
            ).__anext__()
        assert (
            engine.get_num_unfinished_requests() == 0
            and speech.stats()["active_speaking"] == 0
        )

    loop.run_until_complete(scenario())
    with pytest.raises(UnknownVoice):
        speech_factory(default_voice="Nobody")


def test_checkpoint_without_speech(engine, loop, processor, tmp_path):
    """A text-only export (no talker / token2wav / spk_dict.pt): has_speech False, audio refused
    with SpeechUnavailable, text served. (The speech engine reads only the speech modules from the
    directory; the module's AsyncLLM, which serves the same thinker, answers the text.)"""
    from omni_vllm.testing.tiny import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path / "text-only", speech=False)
    speech = SpeechEngine(engine, model, device="cpu")
    case = make_cases(processor, 1, "n")[0]

    async def scenario():
        try:
            assert not speech.has_speech and speech.voices == []
            with pytest.raises(SpeechUnavailable):
                await speech.generate(
                    case.prompt, params(), case.rid, audio=True
                ).__anext__()
            out = await consume(
                speech.generate(case.prompt, params(8), case.rid), Outcome()
            )
            assert len(out.tokens) == 8 and out.final.finished and out.audio == []
            assert out.final.completion_tokens == 8 and out.final.audio_tokens == 0
            assert engine.get_num_unfinished_requests() == 0
        finally:
            await speech.shutdown()

    loop.run_until_complete(scenario())


def test_runaway_guard_caps_speech_after_the_text(
    engine, loop, processor, speech_factory
):
    """Random weights never sample the stop code: once the thinker is done, the speech is capped at
    max(RUNAWAY_FLOOR_CODES, ratio x text tokens) codes, ends "length" and is counted; off, the request's
    own cap applies."""
    from omni_vllm.speech import RUNAWAY_FLOOR_CODES

    case = make_cases(processor, 1, "g")[0]
    for ratio, expected in (
        (4.0, RUNAWAY_FLOOR_CODES),
        (None, RUNAWAY_FLOOR_CODES + 60),
    ):
        speech = speech_factory(max_codes_per_text_token=ratio)
        assert speech.runaway_cap(3) == (None if ratio is None else RUNAWAY_FLOOR_CODES)
        assert speech.runaway_cap(1000) == (None if ratio is None else 4000)
        out = loop.run_until_complete(
            consume(
                run_speech(
                    speech,
                    case,
                    max_tokens=3,
                    max_codes=expected + 60 if ratio else expected,
                ),
                Outcome(),
            )
        )
        assert len(out.tokens) == 3 and out.final.finish_reason == "length"
        assert len(out.codes) == out.final.audio_tokens == expected
        assert speech.stats()["runaway_capped"] == (1 if ratio else 0)
        loop.run_until_complete(speech.shutdown())


def test_lost_hidden_state_rows_end_the_speech_with_an_error(
    engine, loop, processor, speech_factory, monkeypatch
):
    """Rows that do not continue where the last ended (here one chunk lost on its way, as when
    vLLM's scheduler drops a step's output and nothing re-sends it) end that request's speech
    with an error: no audio from shifted rows; its slot, worker state and thinker request are
    freed, and a request beside it is untouched."""
    import omni_vllm.hidden_states as hs

    speech = speech_factory()
    sink, seen = hs._sink, []

    def lose_one(chunk):
        seen.append(chunk.request_id)
        if chunk.request_id == "gap0" and seen.count("gap0") == 3:
            return  # the third chunk of gap0 never arrives
        sink(chunk)

    monkeypatch.setattr(hs, "_sink", lose_one)
    lost, kept = make_cases(processor, 2, "gap")

    async def main():
        failing = asyncio.ensure_future(
            consume(run_speech(speech, lost, max_tokens=32), Outcome())
        )
        fine = await consume(run_speech(speech, kept, max_tokens=32), Outcome())
        with pytest.raises(hs.HiddenStatesOutOfOrder, match="a gap"):
            await failing
        return fine

    fine = loop.run_until_complete(main())
    assert fine.final is not None and fine.final.finish_reason == "length"
    assert fine.codes and fine.audio
    assert_idle(speech, engine, loop)


@pytest.mark.slow
def test_preempt_pool_of_three_requests_serves_twelve(
    engine, loop, processor, speech_factory
):
    """A talker KV pool that holds about 3 of these requests serves 12 speaking at once: every
    reply is complete (all its codes up to the requested cap; nobody is cut off for memory),
    preemptions are counted, and each request's codes and audio equal those of a pool that
    never fills."""
    from omni_vllm.talker_kv_cache import round_up

    cases = [dataclasses.replace(c, audio=True) for c in make_cases(processor, 12, "p")]

    def run(speech) -> dict[str, Outcome]:
        async def everyone():
            outs = await asyncio.gather(
                *(consume(run_speech(speech, c), Outcome()) for c in cases)
            )
            return dict(zip([c.rid for c in cases], outs))

        return loop.run_until_complete(everyone())

    roomy = speech_factory(max_speaking=12)
    lengths = {}
    talker = roomy._worker.talker
    add = talker.add_request

    def recording(rid, **kwargs):
        lengths[rid] = len(kwargs["prompt_ids"])
        return add(rid, **kwargs)

    talker.add_request = recording
    want = run(roomy)
    assert roomy.stats()["talker_preemptions"] == 0
    per_request = round_up(sum(lengths.values()) // len(lengths) + MAX_CODES + 2, 16)
    pool = max(3 * per_request, round_up(max(lengths.values()) + MAX_CODES + 2, 16))
    tight = speech_factory(max_speaking=12, kv_cache_tokens=pool)
    got = run(tight)
    stats = tight.stats()
    print(
        f"pool {pool} positions ({per_request} per request): "
        f"{stats['talker_preemptions']} preemptions"
    )
    assert stats["talker_preemptions"] > 0
    for c in cases:
        g, w = got[c.rid], want[c.rid]
        assert g.final.finish_reason in ("stop", "length"), c.rid
        assert g.codes == w.codes and len(g.codes) == MAX_CODES, c.rid
        np.testing.assert_allclose(
            np.concatenate(g.audio), np.concatenate(w.audio), atol=1e-5
        )
    assert_idle(tight, engine, loop)
