"""`OmniLLM`: the offline batch API. vLLM-style prompts in; text, token ids and speech out.

The thinker runs in vLLM (`vllm.LLM`, our registered model class); requests that speak ask the
engine for their hidden states (omni_vllm.hidden_states). The talker then turns all replies of
the batch into codec codes together, and Token2Wav decodes all of them in one batched call.
This is the non-streaming path: the speech engine (omni_vllm.speech) streams instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_vllm.checkpoint import engine_checkpoint
from omni_vllm.errors import SpeechUnavailable
from omni_vllm.hidden_states import (
    HiddenStatesCollector,
    check_speech_config,
    request_hidden_states,
    set_hidden_states_sink,
)
from omni_vllm.memory import speech_dtypes
from omni_vllm.speech.loading import default_device, load_speech_modules
from omni_vllm.talker import Talker, TalkerSampling
from omni_vllm.token2wav import SAMPLE_RATE, Token2Wav
from omni_vllm.voices import resolve_voice

# Engine settings that suit the speech path; any of them can be overridden by the caller.
ENGINE_DEFAULTS = dict(
    enable_prefix_caching=False,
    limit_mm_per_prompt={"audio": 4, "image": 4, "video": 1},
)


@dataclass
class OmniOutput:
    """One request's result. `audio` is float32 mono at `sample_rate`, None for text-only."""

    request_id: str
    text: str
    token_ids: list[int]
    audio: np.ndarray | None = None
    codes: list[int] = field(default_factory=list)
    sample_rate: int = SAMPLE_RATE


class OmniLLM:
    """Qwen2.5-Omni offline: `generate(prompts, voice=...)` returns text and speech per prompt."""

    def __init__(
        self,
        model: str,
        *,
        voice: str = "Chelsie",
        speech_device: str | None = None,
        speech_dtype: str = "auto",
        **engine_kwargs,
    ):
        """`speech_dtype`: the talker's and Token2Wav's, as the server's `--speech-dtype` (`auto`:
        the talker in the thinker's dtype, Token2Wav in float32; `float32`; `bfloat16`)."""
        from vllm import LLM

        self.llm = LLM(model, **{**ENGINE_DEFAULTS, **engine_kwargs})
        vllm_config = self.llm.llm_engine.vllm_config
        try:  # refused here, before any request runs, if the thinker cannot send its hidden states
            check_speech_config(vllm_config)
        except ValueError as e:
            raise SpeechUnavailable(str(e)) from None
        self.model_dir = engine_checkpoint(
            vllm_config
        )  # the engine's revision and download dir
        self.default_voice = voice
        self.speech_device = speech_device or default_device()
        self.speech_dtypes = speech_dtypes(
            speech_dtype, self.llm.llm_engine.model_config.dtype
        )
        self._talker: Talker | None = None
        self._token2wav: Token2Wav | None = None

    def _speech_modules(self) -> tuple[Talker, Token2Wav]:
        """Talker and Token2Wav, loaded on first use; a clear error if the checkpoint has none."""
        if self._talker is None:
            try:
                self._talker, self._token2wav = load_speech_modules(
                    self.model_dir,
                    device=self.speech_device,
                    dtypes=self.speech_dtypes,
                    max_slots=16,
                    max_len=4096,
                    kv_cache_tokens=None,
                    max_codes=4096,
                )
            except SpeechUnavailable as e:
                raise SpeechUnavailable(
                    f"this checkpoint cannot speak (no talker/token2wav weights or voices): {e}"
                ) from e
        return self._talker, self._token2wav

    @property
    def voices(self) -> list[str]:
        return self._speech_modules()[1].voices

    def generate(
        self,
        prompts,
        sampling_params=None,
        *,
        voice: str | Sequence[str] | None = None,
        audio: bool = True,
        talker_sampling: TalkerSampling | Sequence[TalkerSampling] = TalkerSampling(),
        max_codes: int | None = None,
        noise: Sequence | None = None,
    ) -> list[OmniOutput]:
        """Generate for a batch of prompts (as `vllm.LLM.generate` takes them).

        `voice` and `talker_sampling` may be one value for all or one per prompt; `noise` gives
        Token2Wav's initial noise per prompt (tensor, generator or seed; see omni_vllm.token2wav).
        With `audio=False` this is plain vLLM generation.
        """
        from vllm import SamplingParams

        prompts = prompts if isinstance(prompts, list) else [prompts]
        n = len(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * n
        if not audio:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            return [
                OmniOutput(
                    o.request_id, o.outputs[0].text, list(o.outputs[0].token_ids)
                )
                for o in outs
            ]

        talker, token2wav = self._speech_modules()
        voices = (
            [voice or self.default_voice] * n
            if voice is None or isinstance(voice, str)
            else list(voice)
        )
        voices = [
            resolve_voice(v, token2wav.voices) for v in voices
        ]  # UnknownVoice before any work is done
        samplings = (
            [talker_sampling] * n
            if isinstance(talker_sampling, TalkerSampling)
            else list(talker_sampling)
        )

        collector = HiddenStatesCollector()
        previous = set_hidden_states_sink(collector)
        try:
            outs = self.llm.generate(
                prompts,
                [request_hidden_states(copy.copy(p)) for p in params],
                use_tqdm=False,
            )
        finally:
            set_hidden_states_sink(previous)

        codes = talk(talker, outs, collector, voices, samplings, max_codes)
        waves = token2wav.decode([codes[o.request_id] for o in outs], voices, noise)
        return [
            OmniOutput(
                o.request_id,
                o.outputs[0].text,
                list(o.outputs[0].token_ids),
                audio=w.numpy(),
                codes=codes[o.request_id],
            )
            for o, w in zip(outs, waves, strict=True)
        ]


def talk(talker, outs, collector, voices, samplings, max_codes) -> dict[str, list[int]]:
    """Codes for every finished thinker reply in `outs` (rows in `collector`), the talker running
    as many at a time as it has slots."""
    pending = list(zip(outs, voices, samplings, strict=True))
    codes: dict[str, list[int]] = {o.request_id: [] for o in outs}
    while pending or len(talker.ready()):
        while pending and talker.num_free_slots:
            out, voice, sampling = pending.pop(0)
            rid = out.request_id
            rows = collector.rows(rid)
            n_prompt = len(out.prompt_token_ids)
            talker.add_request(
                rid,
                prompt_ids=torch.tensor(out.prompt_token_ids),
                prompt_embeds=rows[:n_prompt, 0],
                prompt_hidden=rows[:n_prompt, 1],
                prompt_positions=collector.prompt_positions(rid),
                voice=voice,
                sampling=sampling,
                max_codes=max_codes,
            )
            talker.add_thinker_rows(rid, rows[n_prompt:])
            talker.finish_thinker(rid)
        for rid, step in talker.step().items():
            if step.code is not None:
                codes[rid].append(step.code)
    return codes
