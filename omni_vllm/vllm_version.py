"""The vLLM versions omni-vllm runs on, and the one start-up error for any other.

omni-vllm changes a few private parts of vLLM (patches/) and calls a few of its private names
(api/compat.py); each was read against the versions in `SUPPORTED`, and pyproject's `cpu` and
`gpu` extras pin exactly these (tests/test_vllm_version.py holds the three together). Versions
compare as PEP 440 releases without their local part: a local build of a supported release
(`0.32.0+cpu`, `0.32.0+cu130`) is that release; any other release (0.32.1, 0.33.0rc1,
0.32.0.post1, a dev build) is not supported, since a patch release may change the patched code.

An unsupported vLLM stops start-up with one error (`check`, first thing in the plugin's
`register()`, which vLLM runs before it builds anything) naming the supported versions and the
override: `OMNI_VLLM_ALLOW_UNTESTED_VLLM=1` starts anyway, with one warning per process, for
whoever is trying a new vLLM release (who then re-reads the patched code, and adds the version
here, to each patch's `CHECKED_VLLM_VERSIONS` and to the extras).
"""

from __future__ import annotations

import logging
import os

SUPPORTED = ("0.32.0",)
ALLOW_ENV = "OMNI_VLLM_ALLOW_UNTESTED_VLLM"

_warned: set[str] = set()


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not one omni-vllm was checked against (and no override is set)."""


def release(version: str):
    """`version` as a comparable release without its local part (`0.32.0+cpu` -> 0.32.0); the
    text itself where it is no PEP 440 version (then it matches nothing but itself)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(Version(version).public)
    except InvalidVersion:
        return version


def is_supported(version: str, supported: tuple[str, ...] = SUPPORTED) -> bool:
    return release(version) in {release(v) for v in supported}


def untested_allowed() -> bool:
    """Whether OMNI_VLLM_ALLOW_UNTESTED_VLLM asks to start on an unsupported vLLM."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def installed() -> str:
    import vllm

    return vllm.__version__


def check(
    version: str | None = None,
    supported: tuple[str, ...] = SUPPORTED,
    what: str = "omni-vllm",
    risk: str = "",
) -> bool:
    """True where `version` (default: the installed vLLM) is supported; False where it is not but
    the override is set (warned once per process and `what`); otherwise UnsupportedVLLMVersion,
    whose message names the supported versions and the override. `risk`: what could go wrong."""
    version = installed() if version is None else version
    if is_supported(version, supported):
        return True
    names = " or ".join(supported)
    if untested_allowed():
        if what not in _warned:
            _warned.add(what)
            logging.getLogger("omni_vllm").warning(
                "%s is checked on vLLM %s only; running on vLLM %s because %s is set. %s",
                what,
                names,
                version,
                ALLOW_ENV,
                risk,
            )
        return False
    raise UnsupportedVLLMVersion(
        f"{what} is checked on vLLM {names} only, but vLLM {version} is installed. "
        + (risk + " " if risk else "")
        + "Install a supported one (scripts/setup.sh, or pip install -e '.[cpu]' / '.[gpu]', "
        f"pins it), or set {ALLOW_ENV}=1 to start on this one untested."
    )
