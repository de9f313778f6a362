"""Reading the speech path's tensors straight from a Hugging Face Qwen2.5-Omni checkpoint.

vLLM loads `thinker.*`; the talker and Token2Wav live outside vLLM and read their own tensors
(`talker.*`, `token2wav.*`, a few rows of the thinker's token embedding) from the same files,
under the checkpoint's own names, reading only the shards that hold them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

THINKER_EMBEDDING = "thinker.model.embed_tokens.weight"


# What the speech path reads from a checkpoint; vLLM fetches the weights (into the same place).
SPEECH_FILES = (
    "config.json",
    "spk_dict.pt",
    "*.safetensors",
    "model.safetensors.index.json",
)


def local_checkpoint(
    model: str | Path, *, revision: str | None = None, download_dir: str | None = None
) -> Path:
    """The directory of `model`: a path, or a Hugging Face id at `revision`.

    For an id, the files the speech path reads are taken from the same snapshot vLLM loads the
    thinker from (`--revision`, and `--download-dir` or else the Hugging Face cache, `HF_HOME`),
    so nothing is downloaded twice: vLLM has fetched the weights already, only `spk_dict.pt` and
    `config.json` may be new there. `HF_HUB_OFFLINE=1` reads the cache only.
    """
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(model),
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=list(SPEECH_FILES),
        )
    )


def engine_checkpoint(vllm_config) -> Path:
    """The checkpoint directory an engine serves (its model, `--revision` and `--download-dir`)."""
    return local_checkpoint(
        vllm_config.model_config.model,
        revision=vllm_config.model_config.revision,
        download_dir=vllm_config.load_config.download_dir,
    )


def tensor_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for single-file and sharded checkpoints."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no `in`)


def load_prefixed(model_dir: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """All tensors named `prefix*`, with the prefix stripped. Raises if there are none."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in tensor_files(model_dir).items():
        if name.startswith(prefix):
            by_file.setdefault(path, []).append(name)
    if not by_file:
        raise ValueError(
            f"{model_dir} holds no {prefix}* weights: a checkpoint without the speech modules "
            "(thinker only) cannot produce audio"
        )
    state = {}
    for path, names in by_file.items():
        with safe_open(str(path), "pt") as f:
            for name in names:
                state[name[len(prefix) :]] = f.get_tensor(name)
    return state


def load_embedding_rows(
    model_dir: str | Path, token_ids: list[int]
) -> dict[int, torch.Tensor]:
    """Rows of the thinker's token embedding, read without loading the whole table."""
    from safetensors import safe_open

    path = tensor_files(model_dir).get(THINKER_EMBEDDING)
    if path is None:
        raise ValueError(f"{model_dir}: no {THINKER_EMBEDDING} in the checkpoint")
    with safe_open(str(path), "pt") as f:
        table = f.get_slice(THINKER_EMBEDDING)
        return {tid: table[tid : tid + 1][0] for tid in token_ids}
