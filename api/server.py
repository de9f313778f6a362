"""Run vLLM's OpenAI server with our routes (`omni_vllm.api.app.OmniEndpoints`) on it.

This is vLLM's own `run_server` (vllm/entrypoints/launchers/api_server/entry.py), step for step,
with two lines added: our routes are attached after `build_app` and initialised after
`init_app_state`. The command line is vLLM's (`make_arg_parser`) plus the flags of `add_omni_args`.
(`OmniEndpoints` is also a registered `vllm.endpoint_plugins` entry point: `VLLM_PLUGINS=omni_vllm
vllm serve ...` serves the same routes, with our settings from OMNI_VLLM_* environment variables.)
"""

from __future__ import annotations

import json
import os
import signal
from argparse import Namespace

import torch
from vllm.logger import init_logger

from omni_vllm.api.app import OmniEndpoints
from omni_vllm.api.settings import Settings, check_scale_out
from omni_vllm.memory import (
    SpeechMemoryError,
    SpeechPlan,
    plan_speech_memory,
    set_current_plan,
    speech_dtypes,
)
from omni_vllm.speech import SpeechConfig
from omni_vllm.streaming import StreamConfig

logger = init_logger("omni_vllm.api")

D = Settings()


def add_omni_args(parser):
    """Our flags: the speech path's, generated from SpeechConfig, and the HTTP front's."""
    SpeechConfig.add_cli_args(parser)
    g = parser.add_argument_group("omni-vllm (HTTP front)")
    g.add_argument(
        "--audio-id-ttl",
        type=float,
        default=D.audio_id_ttl,
        help="Seconds an assistant `audio.id` can be sent back in a later turn.",
    )
    g.add_argument(
        "--max-media-mb",
        type=float,
        default=D.max_media_mb,
        help="Largest inline media item (data URL / input_audio), MiB; larger is a 413.",
    )
    g.add_argument(
        "--max-audio-input-seconds",
        type=float,
        default=D.max_audio_input_seconds,
        help="Longest audio input, seconds; longer is a 413.",
    )
    g.add_argument(
        "--max-video-input-seconds",
        type=float,
        default=D.max_video_input_seconds,
        help="Longest inline video input, seconds; longer is a 413.",
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=D.max_image_pixels,
        help="Most pixels (width x height) of an image or video frame; more is a 413 (inline) or "
        "vLLM's 400 (fetched).",
    )
    g.add_argument(
        "--max-request-mb",
        type=float,
        default=D.max_request_mb,
        help="Largest request body, MiB; larger is a 413 before it is read.",
    )
    g.add_argument(
        "--audio-id-key",
        default=D.audio_id_key,
        help="Secret that signs assistant `audio.id`s; give every replica the same one so that any "
        "accepts the others' ids (prefer the environment variable OMNI_VLLM_AUDIO_ID_KEY: "
        "a flag shows in the process list). Unset: a random key per process.",
    )
    g.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="Fetch media URLs that resolve to loopback, private or link-local addresses too (by "
        "default they are a 400 and no connection is made; OMNI_VLLM_ALLOWED_MEDIA_NETWORKS "
        "opens chosen networks only).",
    )
    r = parser.add_argument_group("omni-vllm (/v1/realtime: OpenAI's Realtime API)")
    r.add_argument(
        "--realtime-max-sessions",
        type=int,
        default=D.realtime_max_sessions,
        help="Most realtime WebSocket sessions at once; one more is closed with code 1013 (try again "
        "later).",
    )
    r.add_argument(
        "--realtime-max-session-seconds",
        type=float,
        default=D.realtime_max_session_seconds,
        help="Longest realtime session, seconds; then it is closed with code 1008 saying so.",
    )
    r.add_argument(
        "--realtime-max-input-audio-seconds",
        type=float,
        default=D.realtime_max_input_audio_seconds,
        help="Most uncommitted input audio a realtime session buffers (and the longest audio item); "
        "an append beyond it is answered with an error event and dropped.",
    )
    r.add_argument(
        "--realtime-idle-seconds",
        type=float,
        default=D.realtime_idle_seconds,
        help="A realtime session with no client event and no reply running for this long is closed "
        "with code 1008 saying so.",
    )
    return parser


def parse_args(argv: list[str], device_total: int | None = None) -> Namespace:
    """vLLM's serve arguments plus ours, with the speech memory settled (`plan_speech`;
    `device_total` simulates the speech GPU's size in tests)."""
    from vllm.entrypoints.launchers.cli_args import (
        make_arg_parser,
        validate_parsed_serve_args,
    )
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = add_omni_args(
        make_arg_parser(
            FlexibleArgumentParser(
                description="omni-vllm: vLLM's OpenAI-compatible server with speech output for Qwen2.5-Omni."
            )
        )
    )
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    try:
        check_scale_out(args)
    except ValueError as e:
        parser.error(str(e))
    plan_speech(args, argv, device_total)
    # URL-fetched media gets the same limits, through vLLM's own settings (unless set already).
    os.environ.setdefault(
        "VLLM_MAX_AUDIO_CLIP_FILESIZE_MB", str(max(1, int(args.max_media_mb)))
    )
    os.environ.setdefault(
        "VLLM_MAX_AUDIO_DECODE_DURATION_S",
        str(max(1, int(args.max_audio_input_seconds))),
    )
    os.environ.setdefault("VLLM_MAX_IMAGE_PIXELS", str(args.max_image_pixels))
    if args.allow_private_media_urls:
        from omni_vllm.api.media_fetch import ENV_ALLOW_PRIVATE

        os.environ[ENV_ALLOW_PRIVATE] = "1"
    return args


def plan_speech(
    args: Namespace, argv: list[str], device_total: int | None = None
) -> SpeechPlan | None:
    """Settle the speech path's memory before vLLM claims its share of the GPU (see
    omni_vllm.memory): print the estimate, write the chosen `max_speaking` and budget back into
    `args`, and lower vLLM's `gpu_memory_utilization` by the speech share when both use one device.
    `device_total` simulates the speech device's size (tests); None asks the platform.
    Returns None for a model that has no speech path. Raises SystemExit with the message of a
    budget that cannot hold the speech path (unless --allow-text-only)."""
    from vllm.platforms import current_platform

    try:
        config = speech_config(args)
    except (
        Exception
    ) as e:  # not a transformers config: vLLM will say what it makes of the model
        logger.warning(
            "no speech memory plan: cannot read %s's config (%s)", args.model, e
        )
        return None
    if config is None:
        return None
    device = args.speech_device or (
        "cuda" if current_platform.is_cuda_alike() else "cpu"
    )
    if device == "cuda":
        device = "cuda:0"
    on_gpu = device.startswith("cuda")
    index = int(device.partition(":")[2] or 0) if on_gpu else None
    if on_gpu and device_total is None:
        device_total = current_platform.get_device_total_memory(index)
    # vLLM's workers of this node use its first tp x pp x (local) dp devices.
    dp = getattr(args, "data_parallel_size_local", None) or args.data_parallel_size
    shared = (
        on_gpu and index < args.tensor_parallel_size * args.pipeline_parallel_size * dp
    )
    dtypes = speech_dtypes(args.speech_dtype, thinker_dtype(args, config))
    try:
        plan = plan_speech_memory(
            config,
            device=device,
            device_total=device_total if on_gpu else None,
            shared=shared,
            talker_dtype=dtypes["talker"],
            token2wav_dtype=dtypes["token2wav"],
            vocoder_dtype=dtypes["vocoder"],
            max_model_len=args.max_model_len
            or config.thinker_config.text_config.max_position_embeddings,
            max_codes=args.max_audio_tokens,
            max_len=args.talker_max_len,
            max_speaking=args.max_speaking,
            budget_gb=args.speech_gpu_memory_gb,
            gpu_memory_utilization=args.gpu_memory_utilization
            if _given(argv, "--gpu-memory-utilization", "--device-memory-utilization")
            else None,
            vllm_utilization=args.gpu_memory_utilization,
            stream=StreamConfig(**args.speech_stream_config or {}),
        )
    except SpeechMemoryError as e:
        if not args.allow_text_only:
            raise SystemExit(f"omni-vllm: {e}") from None
        logger.warning(
            "speech path disabled, serving text only (--allow-text-only): %s", e
        )
        args.speech_disabled = str(e)
        set_current_plan(None, disabled=str(e))
        return None
    logger.info("%s", plan.report())
    set_current_plan(plan)
    args.max_speaking = plan.max_speaking
    args.talker_max_len = plan.talker_max_len
    if plan.budget is not None:
        args.speech_gpu_memory_gb = plan.budget / 2**30
    if plan.gpu_memory_utilization is not None:
        args.gpu_memory_utilization = plan.gpu_memory_utilization
    return plan


def speech_config(args: Namespace):
    """The checkpoint's Qwen2_5OmniConfig if it has a speech path (else None), read as vLLM will
    (local folder or hub id, --revision, --download-dir)."""
    from transformers import AutoConfig, Qwen2_5OmniConfig

    config = AutoConfig.from_pretrained(
        args.model,
        revision=args.revision,
        cache_dir=args.download_dir,
        trust_remote_code=args.trust_remote_code,
    )
    if not isinstance(config, Qwen2_5OmniConfig) or not getattr(
        config, "enable_audio_output", True
    ):
        return None
    return config


def thinker_dtype(args: Namespace, config) -> torch.dtype:
    """The thinker's dtype as vLLM will choose it (`--dtype`, `auto`: the checkpoint's)."""
    if args.dtype not in (None, "auto"):
        return getattr(
            torch, {"half": "float16", "float": "float32"}.get(args.dtype, args.dtype)
        )
    dtype = (
        getattr(config.thinker_config, "dtype", None)
        or getattr(config, "dtype", None)
        or torch.bfloat16
    )
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _given(argv: list[str], *flags: str) -> bool:
    names = {a.split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--")}
    return any(f in names for f in flags)


async def run_server(args: Namespace, **uvicorn_kwargs) -> None:
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    from vllm.utils.system_utils import decorate_logs

    decorate_logs("APIServer", skip_if_decorated=True)

    def _interrupt_init(*_) -> None:  # SIGTERM before uvicorn installs its handlers
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    if (log_config := get_uvicorn_log_config(args)) is not None:
        uvicorn_kwargs["log_config"] = log_config
    async with build_async_engine_client(args) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(args, supported_tasks, engine_client.model_config)
        # With VLLM_PLUGINS naming us, vLLM has attached and will initialise our endpoint plugin itself.
        omni = next(
            (
                p
                for p in getattr(app.state, "endpoint_plugins", [])
                if isinstance(p, OmniEndpoints)
            ),
            None,
        )
        ours = omni is None
        if ours:
            omni = OmniEndpoints()
            omni.attach_router(app)
        await init_app_state(engine_client, app.state, args, supported_tasks)
        if ours:
            await omni.init_state(engine_client, app.state, args)
        _ready_banner(args, app.state.openai_serving_models.base_model_paths[0].name)
        shutdown_task = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
            **uvicorn_kwargs,
        )
        await omni.shutdown()
    try:  # as vLLM: await the HTTP server's shutdown only after the engine is gone
        await shutdown_task
    finally:
        sock.close()


def _ready_banner(args: Namespace, model: str) -> None:
    """Where the server listens and a request to copy and paste (the socket is bound already)."""
    from vllm.logger import init_logger

    host = "127.0.0.1" if args.host in (None, "", "0.0.0.0", "::") else args.host
    url = f"http{'s' if args.ssl_certfile else ''}://{host}:{args.port}/v1"
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "modalities": ["text", "audio"],
            "audio": {"voice": "Chelsie", "format": "wav"},
        }
    )
    auth = " -H 'Authorization: Bearer $OPENAI_API_KEY'" if args.api_key else ""
    init_logger("omni_vllm.api").info(
        "omni-vllm is ready at %s (model %r). Try it:\n"
        "  curl %s/chat/completions -H 'Content-Type: application/json'%s -d '%s'\n"
        "  python -c \"from openai import OpenAI; c = OpenAI(base_url='%s', api_key='-'); "
        "r = c.chat.completions.create(model='%s', messages=[{'role': 'user', 'content': 'Say hello.'}], "
        "modalities=['text', 'audio'], audio={'voice': 'Chelsie', 'format': 'wav'}); "
        'print(r.choices[0].message.audio.transcript)"',
        url,
        model,
        url,
        auth,
        body,
        url,
        model,
    )


def main(argv: list[str]) -> None:
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    uvloop.run(run_server(parse_args(argv)))
