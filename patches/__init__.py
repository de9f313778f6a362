"""The smallest version-guarded changes to vLLM that omni-vllm needs, one module per patch.

Each patch module says what it changes, why, and which vLLM versions it was checked against,
and calls `require_vllm` before touching anything, so that an unchecked vLLM fails loudly (the
plugin's `register()` has refused it already, with one error: omni_vllm/vllm_version.py).
"""

from __future__ import annotations


def require_vllm(checked: tuple[str, ...], patch: str, risk: str) -> None:
    """Raise unless the installed vLLM is one of `checked` (local builds of it included, see
    omni_vllm.vllm_version) or OMNI_VLLM_ALLOW_UNTESTED_VLLM is set (then one warning);
    `risk` says what would go wrong."""
    from omni_vllm import vllm_version

    vllm_version.check(
        supported=checked,
        what=f"omni-vllm patch {patch}",
        risk=f"{risk} Re-read the patched code in this vLLM, then add the version to the "
        "patch's CHECKED_VLLM_VERSIONS.",
    )
