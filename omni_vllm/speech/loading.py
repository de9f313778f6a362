"""Loading the speech path of a checkpoint: the talker and Token2Wav, on their device and dtypes,
with errors that say what to change; and SpeechEngine's load-or-serve-text-only decision and its
startup log, so that omni_vllm.speech.engine is only the async front."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5OmniConfig

from omni_vllm.checkpoint import tensor_files
from omni_vllm.errors import SpeechLoadError, SpeechUnavailable
from omni_vllm.hidden_states import check_speech_config
from omni_vllm.memory import speech_dtypes
from omni_vllm.speech.config import SpeechConfig
from omni_vllm.talker import Talker
from omni_vllm.token2wav import Token2Wav, fast_cuda_defaults
from omni_vllm.voices import speakers_file

logger = logging.getLogger("omni_vllm.speech")

_FIX_MEMORY = (
    "give it more memory with --speech-gpu-memory-gb (on the GPU vLLM uses), lower --max-speaking or "
    "--talker-max-len, use --speech-dtype bfloat16, put it on its own GPU with --speech-device cuda:1, "
    "or serve text only with --allow-text-only"
)


def default_device() -> str:
    """Where the speech path runs when no device is given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_speech_modules(
    model_dir: str | Path,
    *,
    device: str | torch.device,
    dtypes: dict,
    max_slots: int,
    max_len: int | None,
    kv_cache_tokens: int | None,
    max_codes: int,
    enforce_eager: bool = False,
) -> tuple[Talker, Token2Wav]:
    """The talker and Token2Wav of a checkpoint, on `device`, in `dtypes` (omni_vllm.memory.speech_dtypes).

    Raises SpeechUnavailable for a checkpoint without speech modules (a text-only export), and
    SpeechLoadError, naming the flag to change, for one whose speech path does not load: out of
    memory, tensors that do not match the config (missing, unexpected, wrong shape), a dtype the
    device cannot run."""
    model_dir, device = Path(model_dir), torch.device(device)
    speakers_file(model_dir)  # SpeechUnavailable without one
    if not any(name.startswith("talker.") for name in tensor_files(model_dir)):
        raise SpeechUnavailable(
            f"{model_dir} holds no talker.* weights (a thinker-only checkpoint)"
        )
    for role, dtype in dtypes.items():
        if dtype is not None and dtype not in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
        ):
            raise SpeechLoadError(
                f"the {role} cannot run in {dtype}: use --speech-dtype float32 or bfloat16"
            )
        if (
            dtype == torch.bfloat16
            and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise SpeechLoadError(
                f"{device} has no bfloat16 support: use --speech-dtype float32"
            )
    config = Qwen2_5OmniConfig.from_pretrained(model_dir)
    # TF32 matmuls for Token2Wav's float32 DiT on CUDA (its docstring says why and how good)
    fast_cuda_defaults(device)
    limit = config.talker_config.max_position_embeddings
    talker_kwargs = dict(
        device=device,
        dtype=dtypes["talker"],
        max_slots=max_slots,
        max_codes=max_codes,
        max_len=min(max_len or limit, limit),
        kv_cache_tokens=kv_cache_tokens,
        enforce_eager=enforce_eager,
    )
    token2wav_kwargs = dict(
        device=device, dtype=dtypes["token2wav"], vocoder_dtype=dtypes["vocoder"]
    )
    try:
        talker = Talker.from_pretrained(model_dir, **talker_kwargs)
        return talker, Token2Wav.from_pretrained(model_dir, **token2wav_kwargs)
    except torch.OutOfMemoryError as e:
        raise SpeechLoadError(
            f"out of memory loading the speech path on {device} ({e}): {_FIX_MEMORY}"
        ) from e
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, RuntimeError) and "state_dict" not in str(
            e
        ):  # not load_state_dict's: a bug, show it
            raise
        raise SpeechLoadError(
            f"the speech modules' tensors in {model_dir} do not match its config ({str(e).strip()[:800]}): "
            "fetch the checkpoint again (--revision, --download-dir) or serve text only with --allow-text-only"
        ) from e


def load_speech_path(
    model_dir: Path,
    config: SpeechConfig,
    *,
    device: torch.device,
    thinker_dtype: torch.dtype,
    vllm_config: Any = None,
    text_only_reason: str | None = None,
) -> tuple[Talker | None, Token2Wav | None, str | None]:
    """SpeechEngine's speech path: (talker, token2wav, None), or (None, None, why) to serve text
    only: `text_only_reason` given (nothing is loaded), an engine configuration in which the
    thinker cannot send its hidden states, a checkpoint without speech modules, or (with
    `config.allow_text_only`, logged) a SpeechLoadError, which is raised otherwise."""
    try:
        if text_only_reason is not None:
            raise SpeechUnavailable(text_only_reason)
        if vllm_config is not None:
            try:
                check_speech_config(vllm_config)
            except ValueError as e:
                raise SpeechUnavailable(str(e)) from None
        talker, token2wav = load_speech_modules(
            model_dir,
            device=device,
            dtypes=speech_dtypes(config.speech_dtype, thinker_dtype),
            max_slots=config.max_speaking,
            max_len=config.talker_max_len,
            kv_cache_tokens=config.kv_cache_tokens,
            max_codes=config.max_codes,
            enforce_eager=config.enforce_eager,
        )
        return talker, token2wav, None
    except SpeechUnavailable as e:
        return None, None, str(e)
    except SpeechLoadError as e:
        if not config.allow_text_only:
            raise
        logger.error("speech engine: %s; serving text only (--allow-text-only)", e)
        return None, None, str(e)


def log_speech_path(
    model_dir: Path,
    device: torch.device,
    config: SpeechConfig,
    talker: Talker,
    token2wav: Token2Wav,
    seconds: float,
) -> None:
    """The startup line of a speaking SpeechEngine: what was loaded, its limits and windows."""
    cfg, tcfg = config.stream_config, talker.model.config
    logger.info(
        "speech engine: talker (%d layers, hidden %d, %s) and token2wav (DiT %d layers, %s) loaded from "
        "%s on %s in %.1f s; voices %s (default %s); max_speaking=%d, max_queued_windows=%d, "
        "max_codes=%d, talker_max_len=%d; stream: first chunk %d codes, chunk %d, DiT context "
        "%d back / %d ahead, vocoder %d/%d frames, %d ODE points; first audio after %d codes "
        "(%.2f s of speech)",
        tcfg.num_hidden_layers,
        tcfg.hidden_size,
        talker.dtype,
        len(token2wav.dit.transformer_blocks),
        next(token2wav.dit.parameters()).dtype,
        model_dir,
        device,
        seconds,
        ", ".join(token2wav.voices),
        config.default_voice,
        config.max_speaking,
        config.max_queued_windows,
        config.max_codes,
        talker.max_len,
        cfg.first,
        cfg.chunk,
        cfg.left_context,
        cfg.look_ahead,
        cfg.vocoder_left,
        cfg.vocoder_right,
        cfg.num_steps,
        cfg.first_audio_codes(),
        cfg.first_audio_codes() / 50,
    )
