"""Every private vLLM name our server uses, in one place, behind a version guard.

vLLM's private methods change between releases without notice. Our code calls these wrappers
only; each says which vLLM name it stands for, and a missing one fails with an error naming it
(rather than an AttributeError deep in a request). They were checked against the vLLM versions of
`omni_vllm.vllm_version.SUPPORTED`, which the plugin's start-up check enforces; a vLLM let through
by its override (OMNI_VLLM_ALLOW_UNTESTED_VLLM) is served with a warning at import.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import vllm
from vllm.logger import init_logger

from omni_vllm.vllm_version import SUPPORTED, is_supported

logger = init_logger("omni_vllm.api")

TESTED = " or ".join(SUPPORTED)  # the vLLM versions these wrappers were checked against


def check_version(version: str = vllm.__version__) -> bool:
    """Whether `version` is one these wrappers were checked against; warns if not (it may still
    work)."""
    ok = is_supported(version)
    if not ok:
        warnings.warn(
            f"omni-vllm is tested with vLLM {TESTED}; this is vLLM {version}: "
            "its private names used in api/compat.py may have changed",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


class VLLMCompatError(RuntimeError):
    """A private vLLM name we rely on is missing in the installed vLLM."""


def _require(owner: Any, name: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        where = (
            getattr(owner, "__qualname__", None)
            or getattr(owner, "__name__", None)
            or type(owner).__qualname__
        )
        raise VLLMCompatError(
            f"vLLM {vllm.__version__} has no {where}.{name}, which omni-vllm uses "
            f"(tested with vLLM {TESTED}); see api/compat.py"
        ) from None


def prompt_len(serving_chat, engine_input) -> int:
    """Tokens of a rendered prompt (`OpenAIServingChat._extract_prompt_len`)."""
    return _require(serving_chat, "_extract_prompt_len")(engine_input)


def base_request_id(serving_chat, raw_request, default: str | None = None) -> str:
    """The request id vLLM would use: X-Request-Id, else `default`, else random
    (`OpenAIServingChat._base_request_id`)."""
    return _require(serving_chat, "_base_request_id")(raw_request, default)


async def check_model(serving_chat, request):
    """None if vLLM serves `request.model`, else its ErrorResponse (404)
    (`OpenAIServingChat._check_model`)."""
    return await _require(serving_chat, "_check_model")(request)


async def vllm_chat_completion(request, raw_request):
    """vLLM's own chat completions route, without its decorators, which our route has applied
    already (`inspect.unwrap` of `chat_completion.api_router.create_chat_completion`)."""
    from vllm.entrypoints.openai.chat_completion import api_router

    return await inspect.unwrap(_require(api_router, "create_chat_completion"))(
        request, raw_request
    )


def check_media_connector(connector_cls) -> None:
    """omni_vllm.api.media_fetch overrides `MediaConnector._load_file_url`: it must still exist."""
    _require(connector_cls, "_load_file_url")


check_version()
