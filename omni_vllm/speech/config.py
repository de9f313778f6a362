"""SpeechConfig: every setting of the speech path, in one dataclass passed whole.

As vLLM's config classes (vllm/config/*.py): one attribute docstring per field, which is also
the help text of the command-line flag generated from it (`add_cli_args`, through vLLM's own
`get_kwargs`, the way `EngineArgs.add_cli_args` builds its flags). A few flags keep the names
they had before this class existed (`--max-audio-tokens` sets `max_codes`): `CLI_NAMES`.
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from omni_vllm.memory import SpeechDtype
from omni_vllm.streaming import StreamConfig
from omni_vllm.voices import DEFAULT_VOICE_ALIASES


@dataclass
class SpeechConfig:
    """The speech path's settings (SpeechEngine, its worker and the talker)."""

    device: str | None = None
    """Device of the talker and Token2Wav; unset: cuda if available, else cpu."""

    max_speaking: int | None = None
    """Most requests producing audio at once, the most one talker step batches; more wait for a
    slot. Not a memory reservation (the talker's KV pool is sized by the budget). Unset: 64 beside
    vLLM, 256 on a GPU of its own, 32 on CPU, fewer if the pool holds fewer (printed at start-up)."""

    max_queued_windows: int = 256
    """While this many decodable Token2Wav windows wait, the talker pauses and no new speaker is
    admitted (bounds the codes held ahead of the decoder)."""

    stream_config: StreamConfig = field(default_factory=StreamConfig)
    """Streaming Token2Wav windows, JSON of omni_vllm.streaming.StreamConfig fields, e.g.
    '{"first_chunk": 12}'; unset: its defaults (first audio after 48 codes)."""

    default_voice: str = "Chelsie"
    """Voice when a request names none (Chelsie or Ethan, case-insensitive, or an alias)."""

    voice_aliases: dict[str, str] = field(
        default_factory=lambda: dict(DEFAULT_VOICE_ALIASES)
    )
    """Other names of the checkpoint's voices, JSON {alias: voice} (case-insensitive), accepted
    wherever a voice is named. Default: OpenAI's built-in voices, alloy, coral, marin, nova, sage
    and shimmer as Chelsie, ash, ballad, cedar, echo, fable, onyx and verse as Ethan; '{}': none."""

    queue_timeout: float | None = None
    """Server-side limit on the wait for a speaking slot (a 503 with Retry-After, or an error
    event in a stream); unset: no limit, the client's timeout decides."""

    max_waiting: int = 1024
    """Most audio requests waiting for a speaking slot (they wait, in arrival order, as long as
    their client stays connected); more get a 503 with Retry-After."""

    max_codes: int = 4096
    """Most talker codec tokens per request (50 per second of speech)."""

    max_codes_per_text_token: float | None = 40.0
    """Runaway guard: once the text is complete, its speech may have at most this many codes per
    text token (at least 100, 2 s); a talker that never stops is cut there, with finish_reason
    "length". Speech is 50 codes/s, replies ~3-4 tokens/s. 0: off."""

    talker_max_len: int | None = None
    """Most talker positions per request (prompt tokens + speech codes); a longer prompt asking for
    audio is refused with a 400. Unset: the talker config's max_position_embeddings, at most
    --max-model-len + --max-audio-tokens."""

    window_delay: float = 0.05
    """Seconds a ready Token2Wav window may wait for others to share its batched call."""

    log_interval: float = 10.0
    """Seconds between the speech worker's progress logs."""

    speech_dtype: SpeechDtype = "auto"
    """dtype of the talker and Token2Wav. auto: the talker in the thinker's dtype, Token2Wav in
    float32 (the reference); bfloat16: both in bf16."""

    gpu_memory_gb: float | None = None
    """GiB the speech path (talker weights and KV, Token2Wav) may use on its device; on the device
    vLLM uses, taken out of vLLM's share (a lower default --gpu-memory-utilization). Unset: 25% of
    a GPU shared with vLLM, 90% of a GPU of its own; the talker's KV pool gets what is left."""

    allow_text_only: bool = False
    """If the speech path cannot load (out of memory, bad tensors), serve text only (logged)
    instead of stopping at start-up."""

    enforce_eager: bool = False
    """Run the speech path eagerly: no CUDA graphs for talker decode steps or Token2Wav window
    calls (as vLLM's --enforce-eager for the thinker). Off the GPU it is always eager."""

    kv_cache_tokens: int | None = None
    """The talker's KV positions over all requests (no flag: the server derives it from
    max_speaking and talker_max_len); unset: the talker's default."""

    def __post_init__(self) -> None:
        # JSON from the command line or the environment (a dict), or None: the defaults.
        self.stream_config = _stream_config(self.stream_config)
        if (
            self.max_speaking is not None and self.max_speaking < 1
        ) or self.max_queued_windows < 1:
            raise ValueError("max_speaking and max_queued_windows must be >= 1")

    # ------------------------------------------------------------------------- command line

    @classmethod
    def cli_fields(cls) -> dict[str, str]:
        """{field: its flag's dest} of every field that has a flag."""
        return {
            f.name: CLI_NAMES.get(f.name, f.name)
            for f in dataclasses.fields(cls)
            if f.name not in NO_FLAG
        }

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one flag per field (help: the field's docstring) to `parser`, in a group."""
        from vllm.engine.arg_utils import get_kwargs

        kwargs = get_kwargs(cls)
        group = parser.add_argument_group(
            "omni-vllm speech", "Settings of the speech path (SpeechConfig)."
        )
        for name, dest in cls.cli_fields().items():
            kw = kwargs[name]
            if (
                name == "stream_config"
            ):  # JSON of some of its fields (a dict); unset: None, the defaults
                kw.update(
                    default=None, type=json.loads, help=kw["help"].split("\n\n")[0]
                )
            group.add_argument(f"--{dest.replace('_', '-')}", dest=dest, **kw)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "SpeechConfig":
        """The config of parsed flags (fields whose flag `args` lacks keep their default)."""
        values = {
            name: getattr(args, dest)
            for name, dest in cls.cli_fields().items()
            if hasattr(args, dest)
        }
        return cls(**values)


# Flags that kept the names they had before SpeechConfig ({field: flag dest}).
CLI_NAMES = {
    "device": "speech_device",
    "stream_config": "speech_stream_config",
    "queue_timeout": "max_wait_seconds",
    "max_codes": "max_audio_tokens",
    "max_codes_per_text_token": "max_audio_tokens_per_text_token",
    "log_interval": "speech_log_interval",
    "gpu_memory_gb": "speech_gpu_memory_gb",
    "enforce_eager": "speech_enforce_eager",
}
NO_FLAG = frozenset({"kv_cache_tokens"})


def _stream_config(value: StreamConfig | dict | None) -> StreamConfig:
    if value is None:
        return StreamConfig()
    return value if isinstance(value, StreamConfig) else StreamConfig(**value)
