"""The system programs some tests need (Debian packages), and the one reason they skip without one.

scripts/setup.sh installs the missing ones with apt-get where it can (as root, where apt-get is)
and otherwise says once, at the start of the run, which ones are missing and why. Every test that
needs a missing one then skips with the same reason, whichever program it is and wherever the
test asks for it (a fixture, the test itself, a helper), so a machine without them gives skips
that say what to install, never errors.
"""

from __future__ import annotations

import os
import shutil

import pytest

# Program -> what the tests use it for (the Debian package has the program's name).
TOOLS = {
    "espeak-ng": "speaks the phrases the audio-input, realtime and playground tests listen to",
    "nginx": "balances the replicas test",
    "chromium": "runs the playground page",
}
# nginx is in /usr/sbin, which a non-root user's PATH may lack.
_SBIN = "/usr/sbin:/sbin"


def find(tool: str) -> str | None:
    """The program's path, or None where it is not installed. OMNI_VLLM_CHROMIUM names another
    Chromium binary."""
    assert tool in TOOLS, tool
    if tool == "chromium" and os.environ.get("OMNI_VLLM_CHROMIUM"):
        return shutil.which(os.environ["OMNI_VLLM_CHROMIUM"])
    return shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


def reason(tool: str) -> str:
    """Why a test that needs `tool` skipped: the same words for every test and program."""
    return (
        f"{tool} is not installed (it {TOOLS[tool]}): scripts/setup.sh installs it with "
        f"apt-get when run as root; otherwise `sudo apt-get install {tool}`"
    )


def require(tool: str) -> str:
    """The program's path; the calling test skips (`reason`) where it is not installed."""
    found = find(tool)
    if found is None:
        pytest.skip(reason(tool))
    return found
