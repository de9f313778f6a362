"""The smallest version-guarded changes to vLLM that omni-vllm needs, one module per patch.

Each patch module says what it changes, why, and which vLLM versions it was checked against,
and calls `require_vllm` before touching anything, so that an unchecked vLLM fails loudly.
"""

from __future__ import annotations


def require_vllm(checked: tuple[str, ...], patch: str, risk: str) -> None:
    """Raise unless the installed vLLM is one of `checked`; `risk` says what would go wrong."""
    import vllm

    if vllm.__version__ not in checked:
        raise RuntimeError(
            f"omni-vllm patch {patch} was checked on vLLM {', '.join(checked)} only, but vLLM "
            f"{vllm.__version__} is installed. {risk} Re-read the patched code in this vLLM, then "
            "add the version to the patch's CHECKED_VLLM_VERSIONS."
        )
