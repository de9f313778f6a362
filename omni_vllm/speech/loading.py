"""Loading the speech path of a checkpoint: the talker and Token2Wav, on their device and dtypes,
with errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5OmniConfig

from omni_vllm.checkpoint import tensor_files
from omni_vllm.errors import SpeechLoadError, SpeechUnavailable
from omni_vllm.talker import Talker
from omni_vllm.token2wav import Token2Wav
from omni_vllm.voices import speakers_file

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
    limit = config.talker_config.max_position_embeddings
    talker_kwargs = dict(
        device=device,
        dtype=dtypes["talker"],
        max_slots=max_slots,
        max_codes=max_codes,
        max_len=min(max_len or limit, limit),
        kv_cache_tokens=kv_cache_tokens,
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
